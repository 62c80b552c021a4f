"""Feature distillation's learned projection (timm's `FeatureDistillationTask`).

When the student's pooled pre-logit width differs from the teacher's, a linear layer maps the
student's features to the teacher's width before the MSE. Its parameters train with the student,
by the same optimiser, as the extra subtree `params["projection"]` of the train state: present
only for `distillation.kind="feature"` with differing widths, so every other run's checkpoint
layout is unchanged. `student_params` strips it before the student's forward, and the exported
inference weights (`deit_jax.train.run_weights`) leave it out.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

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
