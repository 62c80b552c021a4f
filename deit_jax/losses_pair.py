"""The losses of a CLIP student on image-caption pairs (the `clip_student` task), beside its
teacher's in-batch logits: each a weight of `config.distillation.pair_weights`, any combination.

- `clip`: CLIP's contrastive loss (`losses.clip_contrastive_loss`, open_clip's `ClipLoss`);
- `kl`: the teacher's in-batch image-text distribution, both directions
  (`losses.in_batch_distillation_loss`; for an ensemble, `ensemble_in_batch_distillation_loss`:
  the members' softmaxes averaged, MobileCLIP's `--distill-average-after-softmax`);
- `fd`: feature distillation, CLIP-KD's `fd_loss` (`pair_feature_loss`);
- `icl`: interactive contrastive learning, CLIP-KD's `icl_loss`
  (`interactive_contrastive_loss`), with its own learnable logit scale.

Pure `jnp` functions of embeddings and logits, safe under `jax.jit`; every loss is computed in
float32 and returns a float32 scalar. The only deit_jax import is `losses` (the floor below): the
in-batch logits, CLIP's loss and the single teacher's KL are shared, not rewritten, so that a
run with the default weights computes exactly what it did before these losses existed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from deit_jax import losses

# name -> what it is; `config.distillation.pair_weights.<name>` is its weight.
PAIR_LOSSES = {
    "clip": "CLIP's contrastive loss on the student's in-batch logits (open_clip's ClipLoss)",
    "kl": "KL to the teacher's in-batch image-text softmax, both directions (at distillation.tau)",
    "fd": "MSE between the L2-normalised student and teacher embeddings (CLIP-KD's FD)",
    "icl": "the student's embeddings against the teacher's other tower (CLIP-KD's ICL)",
}
# The losses that compare the student with a teacher: they need `distillation.kind="in_batch"`.
TEACHER_PAIR_LOSSES = ("kl", "fd", "icl")
# ICL's own (log) logit scale starts where CLIP's does, ln(1 / 0.07) (exp: 14.3); clamped at 100.
ICL_SCALE_INIT = math.log(1 / 0.07)
MAX_SCALE = 100.0


def resolve_pair_weights(
    kind: str, alpha: float, given: Mapping[str, float | None]
) -> dict[str, float]:
    """The weight of each of `PAIR_LOSSES` for a run with `distillation.kind` and `.alpha`.

    A weight that is not given (None) keeps the meaning `kind` and `alpha` had before the
    weights existed: `kind="in_batch"` is `clip = 1 - alpha, kl = alpha`, `kind="none"` is
    `clip = 1, kl = 0`; `fd` and `icl` default to 0. So an unchanged config trains the same
    numbers, and `--config.distillation.pair_weights.fd=2000` adds FD to whatever it was."""
    distilling = kind == "in_batch"
    defaults = {
        "clip": 1 - alpha if distilling else 1.0,
        "kl": alpha if distilling else 0.0,
        "fd": 0.0,
        "icl": 0.0,
    }
    return {k: float(defaults[k] if given.get(k) is None else given[k]) for k in PAIR_LOSSES}


def normalise(x: jax.Array) -> jax.Array:
    """`F.normalize(x, dim=-1)`: x / max(|x|, 1e-12), in float32."""
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def icl_scale(log_scale: jax.Array) -> jax.Array:
    """ICL's logit multiplier from its (log) parameter: `min(exp(p), 100)`, as a CLIP's own."""
    return jnp.minimum(jnp.exp(jnp.asarray(log_scale, jnp.float32)), MAX_SCALE)


def diagonal_cross_entropy(logits: jax.Array) -> jax.Array:
    """`F.cross_entropy(logits, arange(B))`: the batch mean of -log softmax(row i)[i], each row
    classifying its own pair's column among the batch's."""
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    return -jnp.mean(jnp.diagonal(logp))


# --------------------------------------------------------------------------- kl: ensembles


def ensemble_log_targets(
    teacher_logits: Sequence[jax.Array], weights: Sequence[float], tau: float
) -> jax.Array:
    """(B, B) log of the ensemble's target rows: `log sum_m w_m softmax(t_m / tau)` over each
    row of each member's in-batch logits `t_m` (each at its own teacher's logit scale), the
    weights normalised to sum 1. Averaged after the softmax, as MobileCLIP's
    `dot_ensemble_features` does (it weighs members equally: w_m = 1 / M); computed as a
    log-sum-exp of the members' log-softmaxes, so that no probability underflows to a log of 0.
    The text->image targets are this function of the transposed logits."""
    total = float(sum(weights))
    logp = jnp.stack(
        [jax.nn.log_softmax(jnp.asarray(t, jnp.float32) / tau, axis=-1) for t in teacher_logits]
    )
    w = jnp.asarray([float(w) / total for w in weights], jnp.float32)[:, None, None]
    return jax.nn.logsumexp(logp, axis=0, b=w)


def kl_to_log_targets(student_logits: jax.Array, log_targets: jax.Array, tau: float) -> jax.Array:
    """`F.kl_div(log_softmax(s / tau, 1), p, reduction="batchmean")` for target rows `p` given
    as logs: sum_j p (log p - log q) over each row, averaged over the rows."""
    log_q = jax.nn.log_softmax(jnp.asarray(student_logits, jnp.float32) / tau, axis=-1)
    log_p = jax.lax.stop_gradient(log_targets)
    return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


def ensemble_in_batch_distillation_loss(
    student_logits: jax.Array,
    teacher_logits: Sequence[jax.Array],
    weights: Sequence[float],
    *,
    tau: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The in-batch KL of `losses.in_batch_distillation_loss` to an ensemble of teachers: image
    ->text, the KL of the student's rows to `ensemble_log_targets` of the members' (B, B)
    logits; text->image, the same on the transposes; the loss is their mean.

    One teacher is `losses.in_batch_distillation_loss` itself (the same numbers as a run
    without an ensemble, bit for bit). Returns `(loss, {"image_to_text", "text_to_image"})`."""
    if len(teacher_logits) == 1:
        return losses.in_batch_distillation_loss(student_logits, teacher_logits[0], tau=tau)
    s = jnp.asarray(student_logits, jnp.float32)
    transposed = [jnp.asarray(t, jnp.float32).T for t in teacher_logits]
    parts = {
        "image_to_text": kl_to_log_targets(
            s, ensemble_log_targets(teacher_logits, weights, tau), tau
        ),
        "text_to_image": kl_to_log_targets(
            s.T, ensemble_log_targets(transposed, weights, tau), tau
        ),
    }
    return (parts["image_to_text"] + parts["text_to_image"]) / 2, parts


# --------------------------------------------------------------------------- fd and icl (CLIP-KD)


def pair_feature_loss(
    student_image: jax.Array,
    student_text: jax.Array,
    teacher_image: jax.Array,
    teacher_text: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CLIP-KD's feature distillation (winycg/CLIP-KD, src/open_clip/loss.py, `KDClipLoss`):

        fd = F.mse_loss(normalize(s_image), normalize(t_image))
           + F.mse_loss(normalize(s_text), normalize(t_text))

    each MSE the mean over every element (batch x width, `F.mse_loss`'s default), the two towers
    summed, not averaged. The student's embeddings are its raw ones (CLIP-KD's student forward
    with `distill=True` does not normalise), already through the learned projection to the
    teacher's width when the widths differ (`visual_proj`, `text_proj`), then normalised; the
    teacher's are normalised (its forward's `normalize=True`). The teacher side is frozen.
    Returns `(fd, {"image": ..., "text": ...})`."""
    parts = {}
    for name, s, t in (
        ("image", student_image, teacher_image),
        ("text", student_text, teacher_text),
    ):
        t = jax.lax.stop_gradient(normalise(t))
        parts[name] = jnp.mean(jnp.square(normalise(s) - t))
    return parts["image"] + parts["text"], parts


def interactive_contrastive_loss(
    student_image: jax.Array,
    student_text: jax.Array,
    teacher_image: jax.Array,
    teacher_text: jax.Array,
    scale: jax.Array | float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CLIP-KD's interactive contrastive learning (`KDClipLoss.icl_loss`): the student's image
    embeddings classify the teacher's caption embeddings and the student's caption embeddings
    the teacher's image embeddings, each against the diagonal:

        icl = (CE(scale * n(s_image) @ n(t_text).T, arange(B))
             + CE(scale * n(s_text) @ n(t_image).T, arange(B))) / 2

    with `n` = normalise, the student's embeddings projected as for FD, and `scale` ICL's own
    learnable multiplier. CLIP-KD's `cross_logit_scale` (init ln(1 / 0.07)) multiplies the
    logits as it is, without exp or clamp (2.66 at init); here the parameter is a log scale like
    every CLIP's, `icl_scale(p) = min(exp(p), 100)` (14.3 at init), so that it means what the
    student's and the teacher's scales mean. The teacher side is frozen; the gradient reaches the
    student, its projection and the scale.
    Returns `(icl, {"image_to_text": ..., "text_to_image": ...})`."""
    t_image = jax.lax.stop_gradient(normalise(teacher_image))
    t_text = jax.lax.stop_gradient(normalise(teacher_text))
    parts = {
        "image_to_text": diagonal_cross_entropy(scale * normalise(student_image) @ t_text.T),
        "text_to_image": diagonal_cross_entropy(scale * normalise(student_text) @ t_image.T),
    }
    return (parts["image_to_text"] + parts["text_to_image"]) / 2, parts


def weighted_mean(values: Sequence[jax.Array], weights: Sequence[float]) -> jax.Array:
    """sum_m w_m v_m / sum_m w_m: an ensemble's FD or ICL from its members' (one: the value)."""
    if len(values) == 1:
        return values[0]
    total = float(sum(weights))
    return sum(v * (float(w) / total) for v, w in zip(values, weights, strict=True))
