"""ResNet (He et al., 2016) as timm's `ResNet` builds `resnet18` / `resnet50`.

7x7 stride-2 stem (`conv1`, `bn1`), 3x3 stride-2 max pool, four stages of `BasicBlock`s or
`Bottleneck`s (stride 2 in the first block of stages 2-4, on the 3x3 conv), global average pool,
linear classifier `fc`. Names mirror timm's state dict: the PyTorch block `layer2.0` is the Flax
module `layer2_0`, its shortcut `downsample.0` (1x1 conv) / `downsample.1` (BN) are
`downsample_0` / `downsample_1`. Logical axis names and BatchNorm behaviour: see
`deit_jax.models.blocks`.

Init as timm: kaiming normal (fan_out) convs, zero-initialised last BN of every residual branch,
PyTorch's default init for `fc`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deit_jax.models.blocks import BatchNorm, check_images, classifier, conv
from deit_jax.models.layers import Dtype
from deit_jax.models.registry import register_model

_EXPANSION = {"basic": 1, "bottleneck": 4}


class Block(nn.Module):
    """`BasicBlock` (two 3x3 convs) or `Bottleneck` (1x1, strided 3x3, 1x1 with 4x expansion)."""

    planes: int
    stride: int
    kind: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out = self.planes * _EXPANSION[self.kind]
        if self.kind == "basic":
            convs = [(self.planes, 3, self.stride), (out, 3, 1)]
        else:
            convs = [(self.planes, 1, 1), (self.planes, 3, self.stride), (out, 1, 1)]
        shortcut = x
        for i, (features, kernel, stride) in enumerate(convs, start=1):
            x = conv(features, kernel, stride=stride, name=f"conv{i}", **kw)(x)
            last = i == len(convs)
            x = BatchNorm(zero_init=last, **kw, name=f"bn{i}")(x, train=train)
            if not last:
                x = nn.relu(x)
        if self.stride != 1 or shortcut.shape[-1] != out:
            shortcut = conv(out, 1, stride=self.stride, name="downsample_0", **kw)(shortcut)
            shortcut = BatchNorm(**kw, name="downsample_1")(shortcut, train=train)
        return nn.relu(x + shortcut)


class ResNet(nn.Module):
    """timm's `ResNet` with its default (non-D, no-SE) options.

    Call with NHWC float images (any size; `img_size` is the size the weights expect);
    returns logits (B, num_classes). `train=True` uses and updates BatchNorm batch statistics.
    """

    layers: tuple[int, ...] = (3, 4, 6, 3)
    block: str = "bottleneck"  # or "basic"
    num_classes: int = 1000
    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        check_images(images, self.in_chans, type(self).__name__)
        if self.block not in _EXPANSION:
            raise ValueError(f"Unknown ResNet block {self.block!r}; use one of {list(_EXPANSION)}.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(64, 7, stride=2, name="conv1", **kw)(images.astype(self.dtype))
        x = nn.relu(BatchNorm(**kw, name="bn1")(x, train=train))
        # PyTorch's MaxPool2d(3, 2, padding=1) pads with -inf, as reduce_window does.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, depth in enumerate(self.layers):
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                x = Block(64 * 2**i, stride, self.block, **kw, name=f"layer{i + 1}_{j}")(
                    x, train=train
                )
        x = x.mean(axis=(1, 2))
        if not self.is_initializing():  # init returns only the weights
            self.sow("intermediates", "pre_logits", x)  # timm's forward_head(pre_logits=True)
        return classifier(self.num_classes, x.shape[-1], **kw)(x)


register_model("resnet18", ResNet, layers=(2, 2, 2, 2), block="basic")
register_model("resnet34", ResNet, layers=(3, 4, 6, 3), block="basic")
register_model("resnet50", ResNet, layers=(3, 4, 6, 3), block="bottleneck")
register_model("resnet101", ResNet, layers=(3, 4, 23, 3), block="bottleneck")
