"""RegNetY (Radosavovic et al., 2020) as timm defines it: the DeiT reference's convnet teachers.

`regnety_160` (RegNetY-16GF, 83.6M parameters) is the teacher of the DeiT paper. Stage widths,
depths and group widths are generated from timm's `RegNetCfg` numbers (w0, wa, wm, depth,
group_size) by the same quantised linear rule (`regnet_stages`).

Each stage `s{i}` has blocks `b{j}` (1-based, as timm): 1x1 conv -> 3x3 grouped conv (stride 2 in
the first block of a stage) -> squeeze-excitation (`se/fc1`, `se/fc2`, reduced to 1/4 of the
block's input width) -> 1x1 conv with zero-initialised BN, plus a 1x1 conv + BN shortcut
(`downsample`) where the shape changes, then ReLU. Names mirror timm's modules (`stem/conv`,
`s1/b1/conv1/bn`, `head/fc`), so `deit_jax.weights.timm_keys` maps timm state dicts by rule.
Logical axis names and BatchNorm behaviour: see `deit_jax.models.blocks`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deit_jax.models.blocks import ConvNormAct, check_images, classifier, conv
from deit_jax.models.layers import Dtype
from deit_jax.models.registry import register_model


def regnet_stages(
    w0: int, wa: float, wm: float, depth: int, group_size: int, quant: int = 8
) -> dict[str, tuple[int, ...]]:
    """Per-stage `widths`, `depths`, `group_sizes` from RegNet's design-space parameters.

    A port of timm's `generate_regnet` + `adjust_widths_groups_comp` (bottleneck ratio 1), in
    float32 as timm computes it, so the rounding lands on the same widths.
    """
    f32 = np.float32
    widths_cont = np.arange(depth, dtype=f32) * f32(wa) + f32(w0)
    exps = np.round(np.log(widths_cont / f32(w0)) / f32(np.log(wm)))
    block_widths = np.round(f32(w0) * np.power(f32(wm), exps) / f32(quant)) * f32(quant)
    widths, depths = np.unique(block_widths.astype(np.int64), return_counts=True)
    group_sizes = [min(group_size, int(w)) for w in widths]
    # Widths become multiples of the group width (Python round, as timm's quantize_float).
    widths = [int(round(int(w) / g) * g) for w, g in zip(widths, group_sizes, strict=True)]
    return dict(
        widths=tuple(widths),
        depths=tuple(int(d) for d in depths),
        group_sizes=tuple(group_sizes),
    )


class SqueezeExcite(nn.Module):
    """timm's `SEModule`: global average -> 1x1 conv -> ReLU -> 1x1 conv -> sigmoid gate."""

    reduced: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        s = x.mean(axis=(1, 2), keepdims=True)
        s = nn.relu(conv(self.reduced, 1, name="fc1", **kw)(s))
        s = conv(x.shape[-1], 1, name="fc2", **kw)(s)
        return x * nn.sigmoid(s)


class Bottleneck(nn.Module):
    """RegNetY block; SE sits after the grouped conv (unlike SE-ResNet, after conv3)."""

    features: int
    stride: int
    group_size: int
    se_ratio: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        in_chs, out = x.shape[-1], self.features
        shortcut = x
        x = ConvNormAct(out, 1, **kw, name="conv1")(x, train=train)
        groups = out // self.group_size
        x = ConvNormAct(out, 3, self.stride, groups, **kw, name="conv2")(x, train=train)
        if self.se_ratio:
            # timm sizes the SE bottleneck from the block's input width, not the conv width.
            x = SqueezeExcite(int(round(in_chs * self.se_ratio)), **kw, name="se")(x)
        x = ConvNormAct(out, 1, act=False, zero_init_bn=True, **kw, name="conv3")(x, train=train)
        if in_chs != out or self.stride != 1:
            shortcut = ConvNormAct(out, 1, self.stride, act=False, **kw, name="downsample")(
                shortcut, train=train
            )
        return nn.relu(x + shortcut)


class _Stage(nn.Module):
    """timm's `RegStage`: `depth` blocks `b1..b{depth}`, the first one strided."""

    features: int
    depth: int
    group_size: int
    se_ratio: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.depth):
            stride = 2 if j == 0 else 1
            x = Bottleneck(
                self.features, stride, self.group_size, self.se_ratio, **kw, name=f"b{j + 1}"
            )(x, train=train)
        return x


class _Head(nn.Module):
    """timm's `ClassifierHead` after average pooling: `fc`, init normal(0, 0.01) and zero bias."""

    num_classes: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return classifier(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype)(x)


class RegNet(nn.Module):
    """RegNet (Y variants when `se_ratio` > 0), timm's `RegNet` with its default options.

    Call with NHWC float images (any size; `img_size` is the size the weights expect);
    returns logits (B, num_classes). `train=True` uses and updates BatchNorm batch statistics.
    """

    widths: tuple[int, ...]
    depths: tuple[int, ...]
    group_sizes: tuple[int, ...]
    se_ratio: float = 0.25
    stem_width: int = 32
    num_classes: int = 1000
    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        check_images(images, self.in_chans, type(self).__name__)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ConvNormAct(self.stem_width, 3, 2, **kw, name="stem")(
            images.astype(self.dtype), train=train
        )
        stages = zip(self.widths, self.depths, self.group_sizes, strict=True)
        for i, (width, depth, group_size) in enumerate(stages):
            x = _Stage(width, depth, group_size, self.se_ratio, **kw, name=f"s{i + 1}")(
                x, train=train
            )
        x = x.mean(axis=(1, 2))
        if not self.is_initializing():  # init returns only the weights
            self.sow("intermediates", "pre_logits", x)  # timm's forward_head(pre_logits=True)
        return _Head(self.num_classes, **kw, name="head")(x)


# timm's model_cfgs: (w0, wa, wm, group_size, depth), all with se_ratio 0.25.
_REGNETY = {
    "regnety_002": (24, 36.44, 2.49, 8, 13),
    "regnety_004": (48, 27.89, 2.09, 8, 16),
    "regnety_006": (48, 32.54, 2.32, 16, 15),
    "regnety_008": (56, 38.84, 2.4, 16, 14),
    "regnety_016": (48, 20.71, 2.65, 24, 27),
    "regnety_032": (80, 42.63, 2.66, 24, 21),
    "regnety_040": (96, 31.41, 2.24, 64, 22),
    "regnety_064": (112, 33.22, 2.27, 72, 25),
    "regnety_080": (192, 76.82, 2.19, 56, 17),
    "regnety_120": (168, 73.36, 2.37, 112, 19),
    "regnety_160": (200, 106.23, 2.48, 112, 18),
    "regnety_320": (232, 115.89, 2.53, 232, 20),
}

for _name, (_w0, _wa, _wm, _gs, _depth) in _REGNETY.items():
    register_model(_name, RegNet, se_ratio=0.25, **regnet_stages(_w0, _wa, _wm, _depth, _gs))
