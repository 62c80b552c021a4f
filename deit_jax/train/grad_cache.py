"""Exact gradient accumulation for losses over the whole batch (GradCache, Gao et al. 2021).

A contrastive loss couples every example of a batch with every other (each caption is a
negative of every other image), so the gradient of a batch of 1,024 is not the mean of four
batches of 256 computed alone. GradCache keeps the whole batch's loss with the memory of one
micro-batch's activations:

1. embed every micro-batch without gradients (activations freed after each);
2. compute the loss of the whole batch from all the embeddings, and its gradient with respect to
   the embeddings (and to the parameters the loss reads directly: logit scales, projections);
3. re-run each micro-batch's embedding with gradients and pull the embeddings' gradient slice
   back through it (a VJP), summing the parameter gradients.

Steps 1 and 3 run the same function on the same micro-batch with the same random key, so the
result equals the gradient of the whole batch computed at once, up to float summation order.
Micro-batches are strided (`batch[j::k]`), so that each holds an equal share of every device's
rows when the batch is sharded over devices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def split(batch: PyTree, k: int) -> PyTree:
    """(k * m, ...) leaves -> (k, m, ...): micro-batch j is rows j, j + k, j + 2k, ..."""

    def one(x):
        if x.shape[0] % k:
            raise ValueError(f"a batch of {x.shape[0]} does not split into {k} micro-batches")
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(one, batch)


def merge(stacked: PyTree) -> PyTree:
    """The inverse of `split`: (k, m, ...) -> (k * m, ...) in the original row order."""
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), stacked)


def value_and_grad(
    embed: Callable[[PyTree, PyTree, jax.Array], PyTree],
    loss: Callable[[PyTree, PyTree], tuple[jax.Array, Any]],
    params: PyTree,
    batch: PyTree,
    rng: jax.Array,
    k: int,
) -> tuple[tuple[jax.Array, Any], PyTree]:
    """`((loss, aux), grads)` of `loss(params, embed(params, batch))` over the whole batch,
    computed with `k` micro-batches (GradCache; the module doc).

    Args:
      embed: `(params, micro_batch, rng) -> embeddings` (a pytree of arrays whose leading axis
        is the micro-batch's rows).
      loss: `(params, embeddings) -> (scalar, aux)` on the whole batch's embeddings, rows in
        the batch's order.
      params: what both read; the gradient is with respect to it.
      batch: the whole batch, leading axis k * m.
      rng: one key; micro-batch j embeds with `fold_in(rng, j)` in both passes.
      k: micro-batches (1: plain `jax.value_and_grad`, the same numbers).
    """
    keys = jax.vmap(lambda j: jax.random.fold_in(rng, j))(jnp.arange(k))
    if k == 1:
        whole = lambda p: loss(p, embed(p, batch, keys[0]))  # noqa: E731
        return jax.value_and_grad(whole, has_aux=True)(params)

    micro = split(batch, k)
    frozen = jax.lax.stop_gradient(params)
    embedded = jax.lax.map(lambda xs: embed(frozen, xs[0], xs[1]), (micro, keys))
    (value, aux), (loss_grads, embedding_grads) = jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True
    )(params, merge(embedded))
    cotangents = split(embedding_grads, k)

    def pull_back(total, xs):
        one_batch, key, cotangent = xs
        _, vjp = jax.vjp(lambda p: embed(p, one_batch, key), params)
        (grads,) = vjp(cotangent)
        return jax.tree.map(jnp.add, total, grads), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    embed_grads, _ = jax.lax.scan(pull_back, zeros, (micro, keys, cotangents))
    return (value, aux), jax.tree.map(jnp.add, loss_grads, embed_grads)
