"""Which frozen teacher a run gets: none, a registry model (`flax_teacher`) or CLIP's zero-shot
classifier (`clip.zero_shot`). Models from other frameworks (`torch_teacher`) run only in the
cache writer (`cache.write`)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import ml_collections

from deit_jax.teacher import flax_teacher
from deit_jax.teacher.clip import zero_shot


def build_teacher(
    config: ml_collections.ConfigDict, num_classes: int, workdir: str | None = None
) -> tuple[nn.Module | None, Any]:
    """The frozen teacher of a training run and its variables, or `(None, {})` without one.

    Without distillation there is none; a run that reads a teacher cache builds one only when
    `config.teacher.checkpoint` is also given (to report teacher accuracy and agreement).
    A CLIP teacher (`framework="clip"`, deit_jax/teacher/clip/zero_shot.py) keeps its zero-shot
    head in `workdir`.
    """
    if config.distillation.kind == "none":
        return None, {}
    readable = config.teacher.checkpoint and config.teacher.framework in ("flax", "clip")
    if config.teacher.cache and not readable:
        return None, {}
    # A PyTorch teacher cannot run here; the config rules let it teach through a cache only.
    return build_jax_teacher(config, num_classes, workdir)


def build_jax_teacher(
    config: ml_collections.ConfigDict, num_classes: int, workdir: str | None
) -> tuple[nn.Module, Any]:
    """The frozen teacher that runs in JAX (train step, eval step, cache writer): CLIP's
    zero-shot classifier (`framework="clip"`, its head kept in `workdir`) or a registry model."""
    if config.teacher.framework == "clip":
        return zero_shot.build_clip_teacher(config, num_classes, workdir)
    return flax_teacher.build_flax_teacher(config, num_classes)
