"""A registry model as the teacher: weights from a deit_jax directory or a PyTorch file, run
frozen (eval mode, `stop_gradient`) inside the jitted train and eval steps
(`deit_jax.teacher.forward`)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from deit_jax.errors import CheckpointError
from deit_jax.models import create_model, input_size, model_options
from deit_jax.weights.load import load_weights
from deit_jax.weights.state_dict import abstract_variables


def build_flax_teacher(
    config: ml_collections.ConfigDict, num_classes: int, *, shapes: bool = False
) -> tuple[nn.Module, Any]:
    """The registry teacher `config.teacher.name` with the weights `config.teacher.checkpoint`;
    with `shapes` (a plan), at the registry's sizes and the run's classes, its variables as
    shapes, no file read."""
    if shapes:
        logits = config.distillation.kind != "feature" and "num_classes" in model_options(
            config.teacher.name
        )
        variables, overrides = None, {"num_classes": num_classes} if logits else {}
    else:
        variables, overrides = load_weights(config.teacher.checkpoint, config.teacher.name)
    overrides = {**overrides, "dtype": jnp.dtype(config.dtype)}
    if "img_size" in model_options(config.teacher.name):
        overrides["img_size"] = config.teacher.img_size or overrides.get(
            "img_size", config.data.img_size
        )
    teacher = create_model(config.teacher.name, **overrides)
    if variables is None:
        variables = abstract_variables(teacher)
    h, w = input_size(teacher)
    images = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
    predicted = jax.eval_shape(lambda v, x: teacher.apply(v, x, train=False), variables, images)
    # Feature distillation matches pooled features, not classes: any teacher will do.
    if config.distillation.kind != "feature" and predicted.shape[-1] != num_classes:
        raise CheckpointError(
            f"The teacher {config.teacher.checkpoint!r} predicts {predicted.shape[-1]} classes but "
            f"data set {config.data.name!r} has {num_classes}; fine-tune or convert the teacher "
            "for this data set (python -m deit_jax.convert ... --num-classes N)."
        )
    return teacher, variables
