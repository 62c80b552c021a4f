"""Feature distillation's learned projection (timm's `FeatureDistillationTask`).

When the student's pooled pre-logit width differs from the teacher's, a linear layer maps the
student's features to the teacher's width before the MSE. Its parameters train with the student,
by the same optimiser, as the extra subtree `params["projection"]` of the train state: present
only for `distillation.kind="feature"` with differing widths, so every other run's checkpoint
layout is unchanged. `student_params` strips it before the student's forward, and the exported
inference weights (`deit_jax.train.run_weights`) leave it out.

A CLIP student's FD and ICL (`deit_jax.losses_pair`) keep their own parameters in the same
subtree (`PairProjections`): per teacher, the projections of its image and text embeddings to
the teacher's width and ICL's logit scale.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from deit_jax import losses_pair
from deit_jax.models import feature_width
from deit_jax.models.layers import Dtype, torch_default_conv_init

PROJECTION = "projection"


class Projection(nn.Module):
    """`nn.Linear(in_features, out_features)` with PyTorch's default init, as timm creates it."""

    in_features: int
    out_features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel_init, bias_init = torch_default_conv_init(self.in_features)
        return nn.Dense(
            self.out_features,
            kernel_init=nn.with_logical_partitioning(kernel_init, ("embed", None)),
            bias_init=nn.with_logical_partitioning(bias_init, (None,)),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="fc",
        )(x)

    def init_params(self, rng: jax.Array) -> Any:
        return self.init(rng, jnp.zeros((1, self.in_features), jnp.float32))["params"]


class _TeacherHeads(nn.Module):
    """One teacher's share of `PairProjections`: the student's image and text embeddings at the
    teacher's width (two `Projection`s, CLIP-KD's `visual_proj` and `text_proj`; none when the
    widths match) and ICL's log scale (with `icl`)."""

    student_width: int
    teacher_width: int
    icl: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image: jax.Array, text: jax.Array) -> tuple[jax.Array, ...]:
        if self.student_width != self.teacher_width:
            image = Projection(self.student_width, self.teacher_width, self.dtype, name="image")(
                image
            )
            text = Projection(self.student_width, self.teacher_width, self.dtype, name="text")(text)
        scale = None
        if self.icl:
            log_scale = self.param(
                "icl_logit_scale",
                nn.with_logical_partitioning(
                    nn.initializers.constant(losses_pair.ICL_SCALE_INIT), ()
                ),
                (),
                jnp.float32,
            )
            scale = losses_pair.icl_scale(log_scale)
        return image.astype(jnp.float32), text.astype(jnp.float32), scale


class PairProjections(nn.Module):
    """A CLIP student's own parameters for FD and ICL, trained with it in
    `params["projection"]`: for teacher m (`teacher{m}`, ensemble members in order), the
    projections of its embeddings to that teacher's width (where it differs) and, with ICL, the
    teacher's own ICL logit scale. `__call__(image, text)` -> per teacher `(image, text, scale)`:
    the student's (raw, float32) embeddings at the teacher's width, and ICL's multiplier (None
    without ICL)."""

    student_width: int
    teacher_widths: tuple[int, ...]
    icl: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image: jax.Array, text: jax.Array) -> list[tuple[jax.Array, ...]]:
        return [
            _TeacherHeads(self.student_width, width, self.icl, self.dtype, name=f"teacher{m}")(
                image, text
            )
            for m, width in enumerate(self.teacher_widths)
        ]

    def init_params(self, rng: jax.Array) -> Any:
        x = jnp.zeros((1, self.student_width), jnp.float32)
        return self.init(rng, x, x)["params"]


def build_pair_projections(
    student_width: int, teacher_widths: tuple[int, ...], *, fd: bool, icl: bool, dtype=jnp.float32
) -> PairProjections | None:
    """A CLIP student's FD/ICL parameters (`PairProjections`), or None when they have none: no
    FD or ICL, or FD alone against teachers of the student's width (so that such a run's train
    state, and every run without FD or ICL, keeps the layout it had)."""
    if not (fd or icl) or (not icl and all(w == student_width for w in teacher_widths)):
        return None
    return PairProjections(student_width, tuple(teacher_widths), icl, dtype)


def build_projection(student: nn.Module, teacher_width: int) -> Projection | None:
    """The projection from the student's feature width to the teacher's (`teacher_width`: the
    live teacher's `feature_width`, or a cache's embedding width); None when they match.

    Raises a ValueError naming the model when the student exposes no pooled features.
    """
    student_width = feature_width(student)
    if student_width == teacher_width:
        return None
    return Projection(student_width, teacher_width, dtype=getattr(student, "dtype", jnp.float32))


def projection_for(
    config: ml_collections.ConfigDict, model, teacher, cache_width: int = 0
) -> Projection | None:
    """The run's projection: for `distillation.kind="feature"`, to `cache_width` (the width of
    the embeddings in `config.teacher.cache`), else to the live teacher's; None for every other
    kind."""
    if config.distillation.kind != "feature":
        return None
    return build_projection(model, cache_width or feature_width(teacher))


def student_params(params: Any) -> Any:
    """The student's own parameters: `params` without the projection subtree."""
    if isinstance(params, dict) and PROJECTION in params:
        return {k: v for k, v in params.items() if k != PROJECTION}
    return params


def project(projection: Projection | None, params: Any, features: jax.Array) -> jax.Array:
    """The student's features at the teacher's width (unchanged without a projection)."""
    if projection is None:
        return features
    return projection.apply({"params": params[PROJECTION]}, features)
