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
from deit_jax.config.defaults import TEACHER_CLIP, TEACHER_FLAX
from deit_jax.errors import UserError
from deit_jax.teacher import flax_teacher
from deit_jax.teacher.clip import zero_shot
from deit_jax.teacher.forward import Ensemble


def build_teacher(
    config: ml_collections.ConfigDict,
    num_classes: int,
    workdir: str | None = None,
    *,
    shapes: bool = False,
) -> tuple[nn.Module | Ensemble | None, Any]:
    """The frozen teacher of a training run and its variables, or `(None, {})` without one.

    Without distillation there is none; a run that reads a teacher cache builds one only when
    every teacher can run here (a checkpoint, framework flax or clip), to report teacher
    accuracy and agreement. A CLIP teacher (`framework="clip"`,
    deit_jax/teacher/clip/zero_shot.py) keeps its zero-shot head in `workdir`. With `shapes`
    (a plan): the same teacher, its variables as shapes, no file read.
    """
    if config.distillation.kind == "none":
        return None, {}
    ensemble = members.members_of(config)
    teachers = [m.config.teacher for m in ensemble] or [config.teacher]
    readable = all(t.checkpoint and t.framework in (TEACHER_FLAX, TEACHER_CLIP) for t in teachers)
    if config.teacher.cache and not readable:
        return None, {}
    # A PyTorch teacher cannot run here; the config rules let it teach through a cache only.
    return build_jax_teacher(config, num_classes, workdir, ensemble, shapes=shapes)


def build_jax_teacher(
    config: ml_collections.ConfigDict,
    num_classes: int,
    workdir: str | None,
    ensemble: list[members.Member] | None = None,
    *,
    shapes: bool = False,
) -> tuple[nn.Module | Ensemble, Any]:
    """The frozen teacher that runs in JAX (train step, eval step, cache writer): CLIP's
    zero-shot classifier (`framework="clip"`, its head kept in `workdir`), a registry model, or
    an ensemble of these (`ensemble`: `config`'s members, when the caller has them). A
    one-member ensemble is that member, built as a single teacher."""
    ensemble = members.members_of(config) if ensemble is None else ensemble
    if len(ensemble) == 1:
        return _build_member(ensemble[0], num_classes, workdir, shapes)
    if ensemble:
        built = [
            # Each CLIP member keeps its own head, in its own directory.
            _build_member(
                m,
                num_classes,
                os.path.join(workdir, f"member_{m.name}") if workdir else None,
                shapes,
            )
            for m in ensemble
        ]
        tau = float(config.distillation.tau) if config.distillation.kind == "soft" else 1.0
        mixed = Ensemble(
            members=tuple(t for t, _ in built),
            weights=tuple(m.weight for m in ensemble),
            temperature=tau,
            num_classes=num_classes,
        )
        return mixed, tuple(v for _, v in built)
    if config.teacher.framework == TEACHER_CLIP:
        return zero_shot.build_clip_teacher(config, num_classes, workdir, shapes=shapes)
    return flax_teacher.build_flax_teacher(config, num_classes, shapes=shapes)


def _build_member(
    member: members.Member, num_classes: int, workdir: str | None, shapes: bool
) -> tuple[nn.Module, Any]:
    """`member`, built as the single teacher of its own config; a problem with it (weights for
    other classes, a missing file) names the member."""
    try:
        return build_jax_teacher(member.config, num_classes, workdir, [], shapes=shapes)
    except UserError as e:
        raise type(e)(f"Member {member.name!r} of config.teacher.members: {e}") from None
