"""Layers and initialisers shared by every model family (DeiT, CLIP, the convnets).

Each initialiser reproduces the PyTorch module it stands for, so that a model trained here from
scratch starts as timm's or open_clip's would; each layer keeps the parameter names and layouts
of its Flax or PyTorch counterpart, so that checkpoints convert by rule (`deit_jax.weights`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]


def trunc_normal(std: float = 0.02) -> Initializer:
    """timm's `trunc_normal_(std=std)`: normal(0, std) truncated to [-2, 2] (absolute bounds)."""

    def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, dtype) * std

    return init


def torch_default_conv_init(fan_in: int) -> tuple[Initializer, Initializer]:
    """PyTorch's default Conv2d and Linear init (kaiming_uniform, a=sqrt(5)): kernel and bias."""
    bound = fan_in**-0.5

    def uniform(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return uniform, uniform


def partitioned(init: Initializer, axes: tuple[str | None, ...]) -> Initializer:
    """`init` with logical axis names on the parameter it creates (`deit_jax.sharding`)."""
    return nn.with_logical_partitioning(init, axes)


def layer_norm(name: str, epsilon: float, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
    """A LayerNorm over the model width ('embed'): eps 1e-6 in DeiT, PyTorch's 1e-5 in CLIP."""
    return nn.LayerNorm(
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=partitioned(nn.initializers.ones, ("embed",)),
        bias_init=partitioned(nn.initializers.zeros, ("embed",)),
        name=name,
    )


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, written as PyTorch writes it: x * (1 + erf(x / sqrt(2))) / 2.

    `jax.nn.gelu(approximate=False)` computes the same function through `erfc`, which XLA's CPU
    backend evaluates about 2.5x slower than `erf` (benchmarks/NOTES.md).
    """
    return x * 0.5 * (1.0 + jax.lax.erf(x * jnp.asarray(0.5**0.5, x.dtype)))


def l2_normalize(x: jax.Array) -> jax.Array:
    """`x` divided by its L2 norm over the last axis (CLIP's embeddings, its zero-shot head)."""
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class DenseParams(nn.Module):
    """The kernel (in, out) and bias (out,) of an `nn.Dense`, returned instead of applied.

    For layers whose kernel is reshaped per head before the matmul (DeiT's `qkv` and `proj`,
    CLIP's `in_proj` and `out_proj`, and CLIP's MLP): the parameters keep the names, shapes and
    layout of `nn.Dense`, so checkpoints convert as for any linear layer. `kernel_init` defaults
    to timm's truncated normal (std 0.02); the bias starts at zero.
    """

    in_features: int
    out_features: int
    axes: tuple[str, str]
    kernel_init: Initializer = trunc_normal(0.02)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        kernel = self.param(
            "kernel",
            partitioned(self.kernel_init, self.axes),
            (self.in_features, self.out_features),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            partitioned(nn.initializers.zeros, (self.axes[1],)),
            (self.out_features,),
            self.param_dtype,
        )
        return kernel.astype(self.dtype), bias.astype(self.dtype)
