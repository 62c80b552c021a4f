"""Training losses (the reference `DistillationLoss` and its base criteria) and eval metrics.

Pure `jnp` functions of logits, safe under `jax.jit`, with no other deit_jax import: the config
rules (`deit_jax.config.rules`) take the names they accept, and their messages, from the tables
below (name -> what it is), the train and
eval steps (`deit_jax.train.steps`) call the functions. Logits may be bfloat16 (mixed-precision
training); every loss is computed in float32 and returns a float32 scalar.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

DISTILLATION_KINDS = {
    "none": "no teacher",
    "soft": "logit KD, any student",
    "hard": "logit KD on the teacher's argmax, any student",
    "feature": "pooled features through a learned projection",
    "in_batch": "a CLIP teacher of a CLIP student: KL, FD, ICL (distillation.pair_weights)",
}
KL_REDUCTIONS = {
    "numel": "summed KL / (batch x classes), the DeiT reference",
    "batchmean": "summed KL / batch, Hinton and timm's tasks",
}
BASE_LOSSES = {"ce": "soft-target cross-entropy", "bce": "DeiT III's binary cross-entropy"}
FEATURE_LOSSES = {"mse": "timm's FeatureDistillationTask", "cosine": "1 - cosine similarity"}


def _log_softmax(logits: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)


def _check_logits(name: str, logits: jax.Array, num_classes: int | None = None) -> None:
    if logits.ndim != 2:
        raise ValueError(f"{name} must be (batch, classes) logits, got shape {logits.shape}.")
    if num_classes is not None and logits.shape[-1] != num_classes:
        raise ValueError(
            f"{name} has {logits.shape[-1]} classes, expected {num_classes} "
            "(do the student, the teacher and the targets use the same class count?)."
        )


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """Integer labels to targets with off-value eps/C and on-value 1 - eps + eps/C (timm)."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over the batch of sum(-targets * log_softmax(logits)): timm's SoftTargetCrossEntropy."""
    _check_logits("logits", logits)
    if targets.shape != logits.shape:
        raise ValueError(
            f"targets must be a (batch, classes) distribution shaped like the logits "
            f"{logits.shape}, got {targets.shape}. Integer labels: use smooth_one_hot(labels, C) "
            "or label_smoothing_cross_entropy."
        )
    loss = jnp.sum(-jnp.asarray(targets, jnp.float32) * _log_softmax(logits), axis=-1)
    return jnp.mean(loss)


def label_smoothing_cross_entropy(
    logits: jax.Array, labels: jax.Array, smoothing: float = 0.1
) -> jax.Array:
    """timm's LabelSmoothingCrossEntropy: (1 - eps) * NLL + eps * mean_c(-log p_c), batch mean.

    Equal to `soft_target_cross_entropy(logits, smooth_one_hot(labels, C, eps))`.
    """
    _check_logits("logits", logits)
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}.")
    logp = _log_softmax(logits)
    nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    smooth = -jnp.mean(logp, axis=-1)
    return jnp.mean((1.0 - smoothing) * nll + smoothing * smooth)


def check_kl_reduction(kl_reduction: str) -> None:
    """The soft term's reduction must be one of `KL_REDUCTIONS` (the config rules accept those)."""
    if kl_reduction not in KL_REDUCTIONS:
        raise ValueError(
            f"Unknown kl_reduction {kl_reduction!r}: use 'numel' (the DeiT reference: summed KL "
            "/ (batch x classes)) or 'batchmean' (Hinton's KD and timm's tasks: summed KL / batch)."
        )


def binary_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """DeiT III's base criterion: `BCEWithLogitsLoss()(logits, targets.gt(0.0))`.

    The (mixed) targets are binarised first, as the reference does: every class with a positive
    target weight is a positive. The mean runs over the batch and the classes. Label smoothing
    would make every class positive, so it must be off (train.py ignores it with this loss).
    """
    _check_logits("logits", logits)
    if targets.shape != logits.shape:
        raise ValueError(
            f"targets must be (batch, classes) like the logits {logits.shape}, got {targets.shape}."
        )
    x = jnp.asarray(logits, jnp.float32)
    positive = (targets > 0).astype(jnp.float32)
    # max(x, 0) - x * y + log(1 + exp(-|x|)): PyTorch's numerically stable form.
    return jnp.mean(jnp.maximum(x, 0.0) - x * positive + jnp.log1p(jnp.exp(-jnp.abs(x))))


def base_loss(name: str, logits: jax.Array, targets: jax.Array) -> jax.Array:
    """The class head's criterion `config.loss`: "ce" (soft-target CE) or "bce" (DeiT III)."""
    if name == "ce":
        return soft_target_cross_entropy(logits, targets)
    if name == "bce":
        return binary_cross_entropy(logits, targets)
    raise ValueError(f"Unknown config.loss {name!r}; use one of {', '.join(BASE_LOSSES)}.")


def distillation_loss(
    cls_logits: jax.Array,
    dist_logits: jax.Array | None,
    teacher_logits: jax.Array | None,
    targets: jax.Array,
    *,
    kind: str,
    alpha: float,
    tau: float,
    kl_reduction: str = "numel",
    student_features: jax.Array | None = None,
    teacher_features: jax.Array | None = None,
    base_criterion: str = "ce",
    feature_loss: str = "mse",
    tau_squared: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The reference `DistillationLoss`, generalised to any student; returns `(total, {"base":
    ..., "distillation": ...})`.

    The distillation term acts on the distillation head when the student has one
    (`dist_logits`), else on its single class head (`dist_logits=None`: logit KD of a plain
    ViT, ResNet, RegNet, ...). The base term is always on the class head.

    Args:
      cls_logits: (B, C) class-token (or single) head logits of the student.
      dist_logits: (B, C) distillation-token head logits, or None for a single-head student.
      teacher_logits: (B, C) teacher logits (or log-probabilities) on the same (mixed) images;
        never differentiated. Unused for kinds "none" and "feature".
      targets: (B, C) target distribution, already mixed and label-smoothed.
      kind: "none" (total = base), "soft" (KL to the tempered teacher), "hard" (CE to the
        teacher's argmax, no smoothing) or "feature" (MSE between `student_features` and
        `teacher_features`, timm's `FeatureDistillationTask`).
      alpha: weight of the distillation term: total = (1 - alpha) * base + alpha * distillation.
        timm's tasks weigh the terms independently, `task_w * base + distill_w * kd`: their
        complementary mode (only `task_loss_weight` given) is alpha = 1 - task_w; independent
        weights are `(task_w + distill_w) * total` with alpha = distill_w / (task_w + distill_w),
        i.e. the same gradients up to a learning-rate factor of task_w + distill_w.
      tau: softmax temperature of the soft kind; the KL is scaled by tau**2.
      kl_reduction: how the soft kind's summed KL is divided: "numel" by B * C (the DeiT
        reference) or "batchmean" by B (Hinton et al., timm's `LogitDistillationTask` and
        `TokenDistillationTask`); they differ by the factor C.
      student_features: (B, D) pooled pre-logit features of the student, already projected to
        the teacher's width (kind "feature" only).
      teacher_features: (B, D) pooled pre-logit features of the teacher (kind "feature" only).
      base_criterion: the class head's loss, `base_loss`'s name ("ce" or "bce").
      feature_loss: the feature kind's distance, "mse" or "cosine" (`feature_distillation_loss`).
      tau_squared: whether the soft KL is multiplied by tau**2 (Hinton, the DeiT reference,
        timm); False gives the plain `F.kl_div(..., reduction=...)` of a KL-only loop.
    """
    if kind not in DISTILLATION_KINDS:
        raise ValueError(
            f"Unknown distillation kind {kind!r}; set config.distillation.kind to one of "
            f"{', '.join(DISTILLATION_KINDS)}."
        )
    check_kl_reduction(kl_reduction)
    if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"Distillation alpha must be in [0, 1], got {alpha}.")
    if isinstance(tau, (int, float)) and tau <= 0:
        raise ValueError(f"Distillation temperature tau must be > 0, got {tau}.")

    base = base_loss(base_criterion, cls_logits, targets)
    if kind == "none":
        return base, {"base": base, "distillation": jnp.zeros((), jnp.float32)}
    if kind == "feature":
        distill = feature_distillation_loss(student_features, teacher_features, feature_loss)
        return (1.0 - alpha) * base + alpha * distill, {"base": base, "distillation": distill}

    if teacher_logits is None:
        raise ValueError(
            f"Distillation kind {kind!r} needs the teacher's logits: set a teacher "
            "(config.teacher.*), or set kind='none'."
        )
    num_classes = cls_logits.shape[-1]
    # A single-head student distils through its only head.
    student_logits = cls_logits if dist_logits is None else dist_logits
    _check_logits("dist_logits", student_logits, num_classes)
    _check_logits("teacher_logits", teacher_logits, num_classes)
    teacher_logits = jax.lax.stop_gradient(teacher_logits)

    if kind == "soft":
        # F.kl_div(log_softmax(s/T), log_softmax(t/T), reduction='sum', log_target=True).
        log_s = _log_softmax(jnp.asarray(student_logits, jnp.float32) / tau)
        log_t = _log_softmax(jnp.asarray(teacher_logits, jnp.float32) / tau)
        kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s))
        count = student_logits.size if kl_reduction == "numel" else student_logits.shape[0]
        distill = kl * (tau * tau if tau_squared else 1.0) / count
    else:
        teacher_labels = jnp.argmax(teacher_logits, axis=-1)
        logp = _log_softmax(student_logits)
        distill = -jnp.mean(jnp.take_along_axis(logp, teacher_labels[:, None], axis=-1))

    total = (1.0 - alpha) * base + alpha * distill
    return total, {"base": base, "distillation": distill}


def soft_kl_per_example(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    tau: float,
    kl_reduction: str,
    tau_squared: bool = True,
) -> jax.Array:
    """(B,) per-example soft distillation terms whose batch mean is the "soft" loss's value:
    KL(softmax(t / tau) || softmax(s / tau)) (* tau**2 with `tau_squared`), divided by the class
    count for "numel".

    For evaluation (the teacher-student KL on held-out images): masked sums of these, divided
    by the example count, give the training term's definition over the whole eval set.
    """
    check_kl_reduction(kl_reduction)
    log_s = _log_softmax(jnp.asarray(student_logits, jnp.float32) / tau)
    log_t = _log_softmax(jnp.asarray(teacher_logits, jnp.float32) / tau)
    kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1) * (tau * tau if tau_squared else 1.0)
    return kl / student_logits.shape[-1] if kl_reduction == "numel" else kl


def feature_distillation_loss(
    student_features: jax.Array | None,
    teacher_features: jax.Array | None,
    kind: str = "mse",
) -> jax.Array:
    """The teacher side frozen: "mse", the mean squared error over every element
    (`F.mse_loss`, timm's FeatureDistillationTask); "cosine", the batch mean of
    1 - cos(student, teacher) (`1 - F.cosine_similarity(s, t, eps=1e-8).mean()`): insensitive
    to the features' scale, e.g. for a CLIP teacher's image embedding."""
    if kind not in FEATURE_LOSSES:
        raise ValueError(
            f"Unknown feature loss {kind!r}; set config.distillation.feature_loss to one of "
            f"{', '.join(FEATURE_LOSSES)}."
        )
    if student_features is None or teacher_features is None:
        raise ValueError(
            "Distillation kind 'feature' needs the student's (projected) and the teacher's "
            "pooled pre-logit features (deit_jax.models.pooled_features)."
        )
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"Student features {student_features.shape} and teacher features "
            f"{teacher_features.shape} differ in shape: project the student's features to the "
            "teacher's width (deit_jax.train.projection.Projection)."
        )
    teacher_features = jax.lax.stop_gradient(jnp.asarray(teacher_features, jnp.float32))
    student_features = jnp.asarray(student_features, jnp.float32)
    if kind == "cosine":
        # PyTorch's cosine_similarity: x.y / max(|x| |y|, eps).
        norms = jnp.linalg.norm(student_features, axis=-1) * jnp.linalg.norm(
            teacher_features, axis=-1
        )
        cos = jnp.sum(student_features * teacher_features, -1) / jnp.maximum(norms, 1e-8)
        return 1.0 - jnp.mean(cos)
    return jnp.mean(jnp.square(student_features - teacher_features))


def topk_correct(
    logits: jax.Array, labels: jax.Array, ks: Sequence[int] = (1, 5)
) -> dict[str, jax.Array]:
    """Per-example float 0/1 hits `{"top1": (B,), "top5": (B,), ...}`, for masked sums.

    A k above the class count counts as the class count (every prediction is then a hit).
    """
    _check_logits("logits", logits)
    num_classes = logits.shape[-1]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}.")
    _, top = jax.lax.top_k(jnp.asarray(logits, jnp.float32), min(max(ks), num_classes))
    hits = top == labels[:, None].astype(top.dtype)
    return {
        f"top{k}": jnp.any(hits[:, : min(k, num_classes)], axis=-1).astype(jnp.float32) for k in ks
    }


# --------------------------------------------------------------------------- image-text pairs


def in_batch_logits(
    image_embeddings: jax.Array, text_embeddings: jax.Array, scale: jax.Array | float
) -> jax.Array:
    """CLIP's (B, B) image->text logits of a batch of pairs: `scale * normalise(image) @
    normalise(text).T` (its transpose is text->image). Over the global batch: under `jit` with
    batch-sharded embeddings, XLA brings the other devices' text embeddings to each device
    itself, so a sharded step needs no host gather."""
    image = jnp.asarray(image_embeddings, jnp.float32)
    text = jnp.asarray(text_embeddings, jnp.float32)
    image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    return scale * image @ text.T


def in_batch_distillation_loss(
    student_logits: jax.Array, teacher_logits: jax.Array, *, tau: float = 1.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The teacher's in-batch image-text logits distilled into the student's, both directions:
    image->text is `F.kl_div(log_softmax(s / T, 1), softmax(t / T, 1), reduction="batchmean")`
    on the (B, B) logits, text->image the same on their transposes; the loss is their mean.
    Returns `(loss, {"image_to_text": ..., "text_to_image": ...})`."""
    s, t = jnp.asarray(student_logits, jnp.float32), jnp.asarray(teacher_logits, jnp.float32)
    parts = {}
    for name, (s_dir, t_dir) in {"image_to_text": (s, t), "text_to_image": (s.T, t.T)}.items():
        kl = soft_kl_per_example(s_dir, t_dir, tau=tau, kl_reduction="batchmean", tau_squared=False)
        parts[name] = kl.mean()
    return (parts["image_to_text"] + parts["text_to_image"]) / 2, parts


def clip_contrastive_loss(logits_per_image: jax.Array) -> jax.Array:
    """CLIP's own loss (open_clip's `ClipLoss`): the mean of the image->text and text->image
    cross-entropies against the diagonal (each image's own caption)."""
    logits = jnp.asarray(logits_per_image, jnp.float32)
    diagonal = jnp.arange(logits.shape[0])
    image_to_text = -jnp.take_along_axis(_log_softmax(logits), diagonal[:, None], -1).mean()
    text_to_image = -jnp.take_along_axis(_log_softmax(logits.T), diagonal[:, None], -1).mean()
    return (image_to_text + text_to_image) / 2


def retrieval_hits(
    logits_per_image: jax.Array, ks: tuple[int, ...] = (1, 5), text_ids: jax.Array | None = None
) -> dict[str, jax.Array]:
    """(B,) recall@k hits of a batch of pairs: `image_to_text_r{k}` is 1 where image i's own
    caption is among its k highest-scored captions, `text_to_image_r{k}` where caption i's own
    image is among the k highest-scored images (columns). Ties count against the pair (a strict
    rank).

    `text_ids` (B,): captions with the same id are the same text (e.g. class-level captions):
    counted once among the captions an image ranks, and a caption's hit is any image it is paired
    with. Without them every caption is its own text (CLIP's and COCO's usual recall)."""
    logits = jnp.asarray(logits_per_image, jnp.float32)
    b = logits.shape[0]
    ids = jnp.arange(b) if text_ids is None else jnp.asarray(text_ids)
    same = ids[:, None] == ids[None, :]  # (B, B): pairs i and j have the same text
    # Image i ranks texts, each once: its first caption column stands for every copy.
    first = jnp.argmax(same, axis=1)  # each row's first column with its text
    column_counts = jnp.arange(b) == first  # column j is the first with its text
    rank_i2t = _rank(logits, same, column_counts[None, :])
    rank_t2i = _rank(logits.T, same, jnp.ones((1, b), bool))
    hits = {}
    for k in ks:
        hits[f"image_to_text_r{k}"] = (rank_i2t < k).astype(jnp.float32)
        hits[f"text_to_image_r{k}"] = (rank_t2i < k).astype(jnp.float32)
    return hits


def _rank(scores: jax.Array, own: jax.Array, counts: jax.Array) -> jax.Array:
    """(B,) rank of each row's best-scored `own` entry among the entries where `counts`: those
    not its own scoring higher, or the same at a lower index."""
    index = jnp.arange(scores.shape[1])
    best = jnp.max(jnp.where(own, scores, -jnp.inf), axis=1, keepdims=True)
    at = jnp.argmax(own & (scores == best), axis=1)[:, None]  # where the best own entry is
    beats = (scores > best) | ((scores == best) & (index[None, :] < at))
    return jnp.sum(beats & ~own & counts, axis=1)
