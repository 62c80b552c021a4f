"""The convolution of every deit_jax convnet, with grouped convolutions chosen per backend.

XLA's CPU backend runs a convolution with `feature_group_count > 1` 5-7x slower than the same
work written as one dense convolution per group (RegNetY's 3x3 convs: 15-24 GFLOP/s against
50-140; benchmarks/NOTES.md, jax #23713). `conv_general` therefore lowers a grouped convolution
on the CPU as `groups` dense convolutions over channel slices, concatenated, and keeps XLA's
native `feature_group_count` on GPU and TPU. The choice is made when the function is lowered for
a platform (`jax.lax.platform_dependent`), so one traced model serves every backend. Both give
the same numbers as `lax.conv_general_dilated(..., feature_group_count=groups)` (to rounding).
Unpadded 1x1 convolutions likewise run as matmuls on the CPU. Both forms pay most under XLA's
CPU defaults, which hand convolutions to YNNPACK; deit_jax's own steps compile without YNNPACK
(`deit_jax.jit`), where the split still makes the RegNetY-16GF forward ~20% faster than XLA's
grouped conv and the matmuls run even with XLA's 1x1 convs (the same RegNetY forward compiled
each way in one process: benchmarks/NOTES.md, "The convnet teacher on CPU").

`Conv` is `flax.linen.Conv` for the square, explicitly padded convolutions the convnets use,
with the same parameters (`kernel` (kh, kw, in / groups, out), `bias` (out,)), so converted
weights keep their layout and names.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from deit_jax.models.layers import Dtype, Initializer

Padding = Sequence[tuple[int, int]]
_DIMS = ("NHWC", "HWIO", "NHWC")


def _native(x: jax.Array, kernel: jax.Array, strides, padding, groups: int) -> jax.Array:
    return lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=_DIMS, feature_group_count=groups
    )


def _split(x: jax.Array, kernel: jax.Array, strides, padding, groups: int) -> jax.Array:
    """One dense convolution per group, concatenated along channels (the CPU's fast form)."""
    cin, cout = x.shape[-1] // groups, kernel.shape[-1] // groups
    outs = [
        lax.conv_general_dilated(
            x[..., g * cin : (g + 1) * cin],
            kernel[..., g * cout : (g + 1) * cout],
            strides,
            padding,
            dimension_numbers=_DIMS,
        )
        for g in range(groups)
    ]
    return jnp.concatenate(outs, axis=-1)


def _pointwise(x: jax.Array, kernel: jax.Array, strides) -> jax.Array:
    """A 1x1 unpadded convolution as one matmul over the (strided) pixels."""
    if strides != (1, 1):
        x = x[:, :: strides[0], :: strides[1]]
    return x @ kernel.reshape(kernel.shape[2], kernel.shape[3])


def conv_general(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int],
    padding: Padding,
    groups: int = 1,
    impl: str = "auto",
) -> jax.Array:
    """An NHWC x HWIO convolution with `groups` feature groups.

    `impl`: "auto" (per backend, at lowering: on the CPU grouped convs split and unpadded 1x1
    convs as matmuls, XLA's convolution elsewhere), "native" (XLA's `feature_group_count`) or
    "split" (per-group dense convolutions).
    """
    strides, padding = tuple(strides), tuple(tuple(p) for p in padding)
    if x.shape[-1] % groups or kernel.shape[-1] % groups or x.shape[-1] != kernel.shape[2] * groups:
        raise ValueError(
            f"Input channels {x.shape[-1]}, kernel {tuple(kernel.shape)} and groups {groups} do "
            "not fit: the kernel's input dimension times groups must equal the input channels."
        )
    if impl not in ("auto", "native", "split"):
        raise ValueError(f"Unknown conv impl {impl!r}; use 'auto', 'native' or 'split'.")
    pointwise = kernel.shape[:2] == (1, 1) and all(p == (0, 0) for p in padding)
    if impl == "native" or (groups == 1 and not (impl == "auto" and pointwise)):
        return _native(x, kernel, strides, padding, groups)
    if impl == "split":
        return _split(x, kernel, strides, padding, groups)
    # On the CPU, 1x1 convolutions also run faster as matmuls than through XLA's (YNNPACK)
    # convolution (RegNetY-16GF forward 20% faster; benchmarks/NOTES.md).
    cpu = _split if groups > 1 else lambda x, k, s, p, g: _pointwise(x, k, s)
    return lax.platform_dependent(
        x,
        kernel,
        cpu=lambda x, k: cpu(x, k, strides, padding, groups),
        default=lambda x, k: _native(x, k, strides, padding, groups),
    )


class Conv(nn.Module):
    """A square conv with explicit symmetric padding; `flax.linen.Conv`'s parameters."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    groups: int = 1
    use_bias: bool = False
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, in_chs = self.kernel_size, x.shape[-1]
        if in_chs % self.groups:
            raise ValueError(f"{in_chs} input channels are not divisible by {self.groups} groups.")
        kernel = self.param(
            "kernel",
            self.kernel_init,
            (k, k, in_chs // self.groups, self.features),
            self.param_dtype,
        )
        pad = ((self.padding, self.padding),) * 2
        y = conv_general(
            x.astype(self.dtype), kernel.astype(self.dtype), (self.stride,) * 2, pad, self.groups
        )
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y
