"""A teacher ensemble read from several caches of one stream, mixed in the input pipeline.

`--config.teacher.cache=A,B,C --config.teacher.cache_weights=0.5,0.3,0.2`: each member's cache is
written once, by the ordinary writer, for the same training stream; a student run reads them
all and mixes them per batch in the prefetch thread, so changing the weights runs no teacher.
The weights are no part of any fingerprint; each cache is checked against the run's stream as a
single cache is (so against the others), and a cache of another stream is refused naming it.

The target is the weighted mean of the members' probabilities, as big_vision's distillation
trainer averages its teachers (an ensemble in probability space) and ml-dr's ImageNet+ stores
its four teachers' mean:

  soft:  p = sum_i w_i softmax(logp_i / T), given to the loss as logits T log p, so that the
         loss's own softmax(. / T) gives back p;
  hard:  argmax_c sum_i w_i softmax(logp_i)_c.

`logp_i` is member i's rebuilt log-probabilities (its stored top-k, the leftover mass spread
evenly over the other classes, as for a single cache: exact when k is the class count), w the
weights normalised to sum 1. One cache is read as before, without any of this.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from deit_jax import data
from deit_jax.config import teacher_rules
from deit_jax.teacher.cache.read import CacheReader, member_readers


def full_log_probs(logp: np.ndarray, index: np.ndarray, num_classes: int) -> np.ndarray:
    """NumPy (float64) twin of `targets.full_log_probs`, for the host-side mix."""
    logp = logp.astype(np.float64)
    batch, k = logp.shape
    full = np.zeros((batch, num_classes))
    if k < num_classes:
        rest = np.maximum(1.0 - np.exp(logp).sum(-1, keepdims=True), 1e-12)
        full[:] = np.log(rest / (num_classes - k))
    full[np.arange(batch)[:, None], index] = logp
    return full


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def mix(
    outputs: list[dict[str, np.ndarray]],
    weights: list[float],
    num_classes: int,
    *,
    kind: str,
    tau: float,
) -> dict[str, np.ndarray]:
    """The members' cached outputs of one batch as one target in the cache's batch format:
    `teacher_logp` (B, C) and `teacher_index` (B, C), classes by falling probability (so that the
    step's hard target, the first index, is the mixture's argmax)."""
    temperature = tau if kind == "soft" else 1.0
    probs = sum(
        w
        * _softmax(full_log_probs(o["teacher_logp"], o["teacher_index"], num_classes) / temperature)
        for w, o in zip(weights, outputs, strict=True)
    )
    logits = temperature * np.log(np.maximum(probs, 1e-300))
    order = np.argsort(-logits, axis=-1, kind="stable")
    return {
        "teacher_logp": np.take_along_axis(logits, order, -1).astype(np.float32),
        "teacher_index": order.astype(np.int32),
    }


class MixedCacheReader:
    """`reader(epoch, step)` -> the mixed target of that batch's rows (see the module doc)."""

    def __init__(self, config: ml_collections.ConfigDict, train_data: data.TrainIterator):
        self.paths, self.readers = member_readers(config, train_data)
        self.weights = teacher_rules.cache_weights(config.teacher.cache_weights, len(self.paths))
        self.num_classes = train_data.num_classes
        self.kind = config.distillation.kind
        self.tau = float(config.distillation.tau)

    def check_coverage(self, start_step: int, total_steps: int) -> None:
        for reader in self.readers:
            reader.check_coverage(start_step, total_steps)

    def __call__(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        outputs = [reader(epoch, step) for reader in self.readers]
        return mix(outputs, self.weights, self.num_classes, kind=self.kind, tau=self.tau)

    def __str__(self) -> str:
        return ", ".join(
            f"{p} (weight {w:.3g})" for p, w in zip(self.paths, self.weights, strict=True)
        )


def open_reader(
    config: ml_collections.ConfigDict, train_data: data.TrainIterator
) -> CacheReader | MixedCacheReader | None:
    """The run's cache reader: none, one cache's, or an ensemble's (several caches)."""
    paths = teacher_rules.cache_paths(config.teacher.cache)
    if not paths:
        return None
    return (
        CacheReader(config, train_data) if len(paths) == 1 else MixedCacheReader(config, train_data)
    )
