"""How far soft distillation from a top-k teacher cache is from the full teacher distribution.

The cache keeps the teacher's k largest log-probabilities (float16 by default) and rebuilds the
rest as TinyViT does: the leftover mass spread evenly over the other classes
(`deit_jax.teacher.cache.full_log_probs`). This script measures, on synthetic teachers over
100 and 1000 classes, the relative difference of the soft distillation term (the DeiT
reference's KL x tau^2 / (B x C), `deit_jax.losses.distillation_loss`) between the full
teacher and the rebuilt one, and the cosine between the two terms' gradients with respect to the
student's logits (what training follows), for k = 1, 5, 10 and the class count, at tau 1 and 3.

Teachers: logits ~ N(0, s^2) with s chosen so the teacher's mean top-1 probability is about 0.5
("moderate") or 0.9 ("confident"), like a trained ImageNet teacher on augmented crops; the student
is the teacher's logits plus N(0, 1) noise (a student halfway through training).

    python benchmarks/teacher_cache_topk.py     # a few seconds on a CPU
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deit_jax import losses  # noqa: E402
from deit_jax.teacher import cache  # noqa: E402

BATCH = 512


def teacher_logits(rng: np.random.Generator, classes: int, top1: float) -> np.ndarray:
    """Random logits scaled so that the mean top-1 probability is close to `top1`."""
    base = rng.normal(size=(BATCH, classes))
    lo, hi = 0.1, 50.0
    for _ in range(40):  # bisection on the scale
        scale = (lo + hi) / 2
        p = jax.nn.softmax(jnp.asarray(base * scale), -1)
        lo, hi = (scale, hi) if float(p.max(-1).mean()) < top1 else (lo, scale)
    return (base * scale).astype(np.float32)


def soft_term(student: jax.Array, teacher: jax.Array, tau: float) -> tuple[float, jax.Array]:
    """The soft distillation term and its gradient with respect to the student's logits."""

    def term(s):
        _, parts = losses.distillation_loss(
            s, s, teacher, jnp.zeros_like(s), kind="soft", alpha=1.0, tau=tau
        )
        return parts["distillation"]

    value, grad = jax.value_and_grad(term)(student)
    return float(value), grad.ravel()


def cosine(a: jax.Array, b: jax.Array) -> float:
    return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def main() -> None:
    rng = np.random.default_rng(0)
    print(
        "| classes | teacher | tau | k | storage | soft term, full | rebuilt | relative diff "
        "| gradient cosine |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for classes in (100, 1000):
        for name, top1 in (("moderate", 0.5), ("confident", 0.9)):
            t = jnp.asarray(teacher_logits(rng, classes, top1))
            s = t + jnp.asarray(rng.normal(size=t.shape).astype(np.float32))
            logp = jax.nn.log_softmax(t, -1)
            for tau in (1.0, 3.0):
                full, full_grad = soft_term(s, t, tau)
                for k in (1, 5, 10, classes):
                    for dtype in ("float16", "float32") if k == 10 else ("float16",):
                        values, index = jax.lax.top_k(logp, k)
                        values = jnp.asarray(np.asarray(values, dtype), jnp.float32)
                        rebuilt_logp = cache.full_log_probs(values, index, classes)
                        rebuilt, grad = soft_term(s, rebuilt_logp, tau)
                        print(
                            f"| {classes} | {name} | {tau:g} | {k} | {dtype} | {full:.4e} "
                            f"| {rebuilt:.4e} | {abs(rebuilt - full) / full:.2%} "
                            f"| {cosine(grad, full_grad):.4f} |"
                        )


if __name__ == "__main__":
    main()
