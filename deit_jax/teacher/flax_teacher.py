"""A registry model as the teacher: weights from a deit_jax directory or a PyTorch file, run
frozen (eval mode, `stop_gradient`) inside the jitted train and eval steps."""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from deit_jax import checkpoint, convert, convert_clip
from deit_jax.errors import CheckpointError, ConfigError, WeightsNotFoundError
from deit_jax.models import create_model, input_size, model_options, pooled_features


def compute_dtype(name: str) -> Any:
    if name not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype must be 'float32' or 'bfloat16', got {name!r}.")
    return jnp.dtype(name)


def load_weights(path: str, model_name: str) -> tuple[Any, dict[str, Any]]:
    """`(variables, model_overrides)` from a deit_jax weights directory or a PyTorch /
    safetensors checkpoint file (or, for CLIP, a transformers CLIP directory), whose overrides
    are what the file says about the model (`convert.inferred_overrides`: a CLIP's sizes and
    activation; empty for the others, the registered defaults)."""
    if os.path.isdir(path) and not convert_clip.is_hf_dir(path):
        variables, metadata = checkpoint.load_variables(path)
        if metadata["model_name"] != model_name:
            raise CheckpointError(
                f"{path!r} holds weights of {metadata['model_name']!r}, not {model_name!r}; set "
                "the model name to match the weights."
            )
        return variables, metadata["model_overrides"]
    if not os.path.exists(path):
        raise WeightsNotFoundError(
            f"Weights {path!r} do not exist: give a deit_jax weights directory (from python -m "
            "deit_jax.convert, or the `weights` directory of a finished run) or a .pth / "
            ".safetensors file."
        )
    return convert.load_with_overrides(path, model_name)


def build_flax_teacher(
    config: ml_collections.ConfigDict, num_classes: int
) -> tuple[nn.Module, Any]:
    """The registry teacher `config.teacher.name` with the weights `config.teacher.checkpoint`."""
    if not config.teacher.checkpoint:
        raise ConfigError(
            f"distillation.kind={config.distillation.kind!r} needs a trained teacher: set "
            "--config.teacher.checkpoint to a weights directory (python -m deit_jax.convert, or "
            "the `weights` directory of a finished deit_jax run) or a .pth/.safetensors file, "
            "or use --config.distillation.kind=none."
        )
    variables, overrides = load_weights(config.teacher.checkpoint, config.teacher.name)
    overrides = {**overrides, "dtype": compute_dtype(config.dtype)}
    if "img_size" in model_options(config.teacher.name):
        overrides["img_size"] = config.teacher.img_size or overrides.get(
            "img_size", config.data.img_size
        )
    teacher = create_model(config.teacher.name, **overrides)
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


def _teacher_images(teacher: nn.Module, images: jax.Array) -> jax.Array:
    h, w = input_size(teacher)
    if images.shape[1:3] != (h, w):
        images = jax.image.resize(images, (images.shape[0], h, w, images.shape[3]), "bilinear")
    return images


def teacher_logits(teacher: nn.Module, teacher_variables: Any, images: jax.Array) -> jax.Array:
    """Frozen teacher forward in eval mode, at the teacher's own input size if it differs."""
    logits = teacher.apply(teacher_variables, _teacher_images(teacher, images), train=False)
    return jax.lax.stop_gradient(logits.astype(jnp.float32))


def teacher_features(teacher: nn.Module, teacher_variables: Any, images: jax.Array) -> jax.Array:
    """The frozen teacher's pooled pre-logit features (B, D), as `teacher_logits` runs it."""
    _, features, _ = pooled_features(
        teacher, teacher_variables, _teacher_images(teacher, images), train=False
    )
    return jax.lax.stop_gradient(features.astype(jnp.float32))
