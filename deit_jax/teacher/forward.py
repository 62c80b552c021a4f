"""The frozen teacher inside a step: the stream's images as it takes them, its logits, its
features.

The student's batches are normalised with `config.augment.mean/std` and sized
`config.data.img_size`; a teacher trained with another normalisation (CLIP's, a timm model's
`pretrained_cfg`) or at another resolution gets them mapped first (`renormalization`,
`resized`). Pure functions of a module and its variables (no weights are read here), for the
train and eval steps and the cache writer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deit_jax.models import input_size, pooled_features


def renormalization(
    stream_mean: Sequence[float],
    stream_std: Sequence[float],
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel `(scale, shift)` (float64) with `x * scale + shift` = the stream's image `x`
    (normalised with `stream_mean/std`) normalised with `mean/std` instead:
    `(x * stream_std + stream_mean - mean) / std`."""
    stream_mean, stream_std = np.asarray(stream_mean), np.asarray(stream_std)
    mean, std = np.asarray(mean), np.asarray(std)
    return stream_std / std, (stream_mean - mean) / std


def resized(teacher: nn.Module, images: jax.Array) -> jax.Array:
    """`images` at the teacher's input size (bilinear), unchanged when they have it already."""
    h, w = input_size(teacher)
    if images.shape[1:3] != (h, w):
        images = jax.image.resize(images, (images.shape[0], h, w, images.shape[3]), "bilinear")
    return images


@dataclasses.dataclass(frozen=True)
class Ensemble:
    """Several frozen teachers that teach as one (built by `deit_jax.teacher.build`); its
    variables are a tuple, one tree per member, and its logits `mixed_logits` of theirs."""

    members: tuple[nn.Module, ...]
    weights: tuple[float, ...]  # summing to 1
    temperature: float  # the run's tau for soft distillation, else 1
    num_classes: int


def mixed_logits(
    member_logits: Sequence[jax.Array], weights: Sequence[float], temperature: float
) -> jax.Array:
    """`T log sum_i w_i softmax(l_i / T)`: logits whose `softmax(. / T)` is the weighted mean of
    the members' probabilities at temperature T (and whose argmax is its argmax). In log space,
    so that no probability underflows; a zero weight drops its member exactly."""
    logp = jnp.stack([jax.nn.log_softmax(x / temperature, axis=-1) for x in member_logits])
    log_w = jnp.log(jnp.asarray(weights, jnp.float32))[:, None, None]
    return temperature * jax.nn.logsumexp(logp + log_w, axis=0)


def teacher_logits(
    teacher: nn.Module | Ensemble, teacher_variables: Any, images: jax.Array
) -> jax.Array:
    """Frozen teacher forward in eval mode, at the teacher's own input size if it differs; an
    ensemble's members each at theirs, mixed (`mixed_logits`)."""
    if isinstance(teacher, Ensemble):
        outputs = [
            teacher_logits(member, variables, images)
            for member, variables in zip(teacher.members, teacher_variables, strict=True)
        ]
        return mixed_logits(outputs, teacher.weights, teacher.temperature)
    logits = teacher.apply(teacher_variables, resized(teacher, images), train=False)
    return jax.lax.stop_gradient(logits.astype(jnp.float32))


def teacher_outputs(
    teacher: nn.Module, teacher_variables: Any, images: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The frozen teacher's logits (B, C) and pooled pre-logit features (B, D), from one
    forward pass, each as `teacher_logits` and `teacher_features` give it."""
    logits, features, _ = pooled_features(
        teacher, teacher_variables, resized(teacher, images), train=False
    )
    return (
        jax.lax.stop_gradient(logits.astype(jnp.float32)),
        jax.lax.stop_gradient(features.astype(jnp.float32)),
    )


def teacher_features(teacher: nn.Module, teacher_variables: Any, images: jax.Array) -> jax.Array:
    """The frozen teacher's pooled pre-logit features (B, D), as `teacher_logits` runs it."""
    return teacher_outputs(teacher, teacher_variables, images)[1]
