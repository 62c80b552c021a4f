"""Which frozen teacher a run gets: none, a registry model (`flax_teacher`), CLIP's zero-shot
classifier (`clip.zero_shot`) or an ensemble of these (`config.teacher.members`, mixed by
`forward.mixed_logits`). Models from other frameworks (`torch_teacher`) run only in the cache
writer (`cache.write`)."""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import ml_collections

from deit_jax.config import members
from deit_jax.errors import UserError
from deit_jax.teacher import flax_teacher
from deit_jax.teacher.clip import zero_shot
from deit_jax.teacher.forward import Ensemble


def build_teacher(
    config: ml_collections.ConfigDict, num_classes: int, workdir: str | None = None
) -> tuple[nn.Module | Ensemble | None, Any]:
    """The frozen teacher of a training run and its variables, or `(None, {})` without one.

    Without distillation there is none; a run that reads a teacher cache builds one only when
    every teacher can run here (a checkpoint, framework flax or clip), to report teacher
    accuracy and agreement. A CLIP teacher (`framework="clip"`,
    deit_jax/teacher/clip/zero_shot.py) keeps its zero-shot head in `workdir`.
    """
    if config.distillation.kind == "none":
        return None, {}
    names = members.member_names(config)
    teachers = [members.member_config(config, n).teacher for n in names] or [config.teacher]
    readable = all(t.checkpoint and t.framework in ("flax", "clip") for t in teachers)
    if config.teacher.cache and not readable:
        return None, {}
    # A PyTorch teacher cannot run here; the config rules let it teach through a cache only.
    return build_jax_teacher(config, num_classes, workdir)


def build_jax_teacher(
    config: ml_collections.ConfigDict, num_classes: int, workdir: str | None
) -> tuple[nn.Module | Ensemble, Any]:
    """The frozen teacher that runs in JAX (train step, eval step, cache writer): CLIP's
    zero-shot classifier (`framework="clip"`, its head kept in `workdir`), a registry model, or
    an ensemble of these. A one-member ensemble is that member, built as a single teacher."""
    names = members.member_names(config)
    if len(names) == 1:
        return _build_member(config, names[0], num_classes, workdir)
    if names:
        built = [
            # Each CLIP member keeps its own head, in its own directory.
            _build_member(
                config, n, num_classes, os.path.join(workdir, f"member_{n}") if workdir else None
            )
            for n in names
        ]
        tau = float(config.distillation.tau) if config.distillation.kind == "soft" else 1.0
        ensemble = Ensemble(
            members=tuple(t for t, _ in built),
            weights=tuple(members.member_weights(config)),
            temperature=tau,
            num_classes=num_classes,
        )
        return ensemble, tuple(v for _, v in built)
    if config.teacher.framework == "clip":
        return zero_shot.build_clip_teacher(config, num_classes, workdir)
    return flax_teacher.build_flax_teacher(config, num_classes)


def _build_member(
    config: ml_collections.ConfigDict, name: str, num_classes: int, workdir: str | None
) -> tuple[nn.Module, Any]:
    """Member `name` of the ensemble, built as the single teacher of its own config; a problem
    with it (weights for other classes, a missing file) names the member."""
    try:
        return build_jax_teacher(members.member_config(config, name), num_classes, workdir)
    except UserError as e:
        raise type(e)(f"Member {name!r} of config.teacher.members: {e}") from None
