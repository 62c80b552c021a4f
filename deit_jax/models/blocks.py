"""Convnet building blocks shared by every convnet (ResNet, RegNetY, `cnn_small`).

The blocks reproduce PyTorch semantics so that converted timm weights give the same logits:
explicit symmetric padding `((stride - 1) + (kernel - 1)) // 2` (timm's `get_padding`, never
'SAME'), and `BatchNorm` with PyTorch's running statistics (momentum 0.1, eps 1e-5, unbiased
running variance).

Module names follow timm's (`ConvNormAct` holds `conv` and `bn`), so
`deit_jax.weights.timm_keys` maps state dicts by rule; a Flax name `features_2` stands for the
PyTorch list index `features.2`.

Logical axis names on parameters (unknown names are replicated by the sharding rules):
  conv kernels   (None, None, 'conv_in', 'conv_out')   conv biases, BN scale/bias ('conv_out',)
  classifier     ('embed', 'classes')                   classifier bias ('classes',)

BatchNorm: `train=True` normalises with the batch statistics and updates the 'batch_stats'
collection (apply with `mutable=['batch_stats']`); `train=False` uses the running averages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from deit_jax.models.conv import Conv
from deit_jax.models.layers import Dtype, Initializer, torch_default_conv_init

CONV_AXES = (None, None, "conv_in", "conv_out")


def kaiming_fan_out(groups: int = 1) -> Initializer:
    """normal(0, sqrt(2 / fan_out)) for an HWIO kernel; fan_out = kh * kw * out / groups.

    This is timm's init: RegNet divides fan_out by the group count, ResNet's
    `kaiming_normal_(mode='fan_out')` does not (its convs here are ungrouped, so groups=1).
    """

    def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
        kh, kw, _, out = shape
        std = (2.0 / (kh * kw * out // groups)) ** 0.5
        # Drawn flat, then reshaped: XLA:CPU takes seconds to compile threefry for some 4-D
        # shapes (e.g. (3, 3, 8, 16)), which made initialising a RegNet take minutes.
        return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape) * std

    return init


def classifier(
    num_classes: int,
    fan_in: int | None = None,
    *,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str = "fc",
) -> nn.Dense:
    """The pooled-features classifier `fc` of the convnets.

    With `fan_in`, PyTorch's default `nn.Linear` init (uniform, bound 1/sqrt(fan_in), as ResNet
    and the small CNN use); without it, timm's `ClassifierHead` init of RegNet (normal(0, 0.01)
    weights, zero bias).
    """
    if fan_in is None:
        kernel_init, bias_init = nn.initializers.normal(0.01), nn.initializers.zeros
    else:
        kernel_init, bias_init = torch_default_conv_init(fan_in)
    return nn.Dense(
        num_classes,
        kernel_init=nn.with_logical_partitioning(kernel_init, ("embed", "classes")),
        bias_init=nn.with_logical_partitioning(bias_init, ("classes",)),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def conv(
    features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    groups: int = 1,
    use_bias: bool = False,
    kernel_init: Initializer | None = None,
    name: str,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> Conv:
    """A square conv with PyTorch's symmetric padding (not 'SAME', which pads stride-2 convs
    asymmetrically and so shifts every output pixel against PyTorch's). Grouped convs run as
    `deit_jax.models.conv.conv_general` chooses for the backend."""
    return Conv(
        features,
        kernel_size,
        stride=stride,
        padding=((stride - 1) + (kernel_size - 1)) // 2,
        groups=groups,
        use_bias=use_bias,
        kernel_init=nn.with_logical_partitioning(kernel_init or kaiming_fan_out(groups), CONV_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class BatchNorm(nn.Module):
    """PyTorch's `BatchNorm2d` on NHWC inputs; statistics are kept and computed in float32.

    `momentum` uses the Flax convention (weight of the old running value): 0.9 is PyTorch's 0.1.
    Unlike `flax.linen.BatchNorm`, the running variance is updated with the unbiased batch
    variance, as PyTorch does, so a model trained here and exported behaves the same in timm.
    Under `jax.jit` with a batch-sharded input the statistics are over the global batch.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    zero_init: bool = False  # timm zero-inits the last BN of a residual branch
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        c = x.shape[-1]
        scale_init = nn.initializers.zeros if self.zero_init else nn.initializers.ones
        scale = self.param(
            "scale", nn.with_logical_partitioning(scale_init, ("conv_out",)), (c,), self.param_dtype
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
            (c,),
            self.param_dtype,
        )
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        if train:
            xf = x.astype(jnp.float32)
            mean = xf.mean(axis=(0, 1, 2))
            var = jnp.square(xf - mean).mean(axis=(0, 1, 2))  # two passes: no cancellation
            if not self.is_initializing():
                n = x.size // c
                m = self.momentum
                running_mean.value = m * running_mean.value + (1 - m) * mean
                running_var.value = m * running_var.value + (1 - m) * var * (n / max(n - 1, 1))
        else:
            mean, var = running_mean.value, running_var.value
        # One multiply-add per activation: normalisation and affine folded per channel.
        mul = scale.astype(jnp.float32) * jax.lax.rsqrt(var + self.epsilon)
        shift = bias.astype(jnp.float32) - mean * mul
        return x * mul.astype(self.dtype) + shift.astype(self.dtype)


class ConvNormAct(nn.Module):
    """conv -> BatchNorm -> optional ReLU, named like timm's `ConvNormAct` (`conv`, `bn`)."""

    features: int
    kernel_size: int
    stride: int = 1
    groups: int = 1
    act: bool = True
    zero_init_bn: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(
            self.features,
            self.kernel_size,
            stride=self.stride,
            groups=self.groups,
            name="conv",
            **kw,
        )(x)
        x = BatchNorm(zero_init=self.zero_init_bn, **kw, name="bn")(x, train=train)
        return nn.relu(x) if self.act else x


def check_images(images: jax.Array, in_chans: int, model: str) -> None:
    """Convnets take any spatial size; only the layout and the channel count must fit."""
    if images.ndim != 4 or images.shape[-1] != in_chans:
        raise ValueError(
            f"{model} expects NHWC images with {in_chans} channels, got shape "
            f"{tuple(images.shape)}. Transpose NCHW inputs with x.transpose(0, 2, 3, 1); for "
            "grayscale images repeat the channel (or create the model with in_chans=1)."
        )
