"""What the train step takes from a batch's cached top-k: the teacher's logits for the loss.

Pure `jnp` (no TensorStore, no config), so that the train step imports only this of the cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections


def required_topk(config: ml_collections.ConfigDict) -> int:
    """The smallest k a run's loss can use: 1 for hard, `teacher.cache_topk` for soft."""
    return 1 if config.distillation.kind == "hard" else int(config.teacher.cache_topk)


def full_log_probs(logp: jax.Array, index: jax.Array, num_classes: int) -> jax.Array:
    """(B, C) teacher log-probabilities rebuilt from the top-k (TinyViT): the leftover mass
    1 - sum(top-k) spread evenly over the other C - k classes; exact when k == C."""
    logp = logp.astype(jnp.float32)
    batch, k = logp.shape
    fill = jnp.zeros((batch, 1), jnp.float32)
    if k < num_classes:
        rest = jnp.maximum(1.0 - jnp.exp(logp).sum(-1, keepdims=True), 1e-12)
        fill = jnp.log(rest / (num_classes - k))
    full = jnp.broadcast_to(fill, (batch, num_classes))
    return full.at[jnp.arange(batch)[:, None], index].set(logp)


def cached_teacher_logits(batch: dict[str, jax.Array], num_classes: int, kind: str) -> jax.Array:
    """What the loss takes as teacher logits, from a batch's cached top-k.

    Hard distillation gets a one-hot of the stored top-1 class (its argmax is exactly the live
    teacher's); soft, the rebuilt log-probabilities (softmax-invariant, so `tau` applies as to
    logits).
    """
    index = batch["teacher_index"]
    if kind == "hard":
        return jax.nn.one_hot(index[:, 0], num_classes, dtype=jnp.float32)
    return full_log_probs(batch["teacher_logp"], index, num_classes)
