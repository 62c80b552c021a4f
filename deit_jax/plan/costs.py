"""What a plan counts besides the compiled step: the bytes of a checkpoint and of the teacher
cache, the width of the teacher's embeddings, and the teacher's forward on its own (whose FLOPs
are the live teacher's share of the step's)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from deit_jax import data
from deit_jax.config import tasks
from deit_jax.models import feature_width
from deit_jax.teacher.clip.two_towers import PairTeacher
from deit_jax.teacher.flax_teacher import build_flax_teacher
from deit_jax.teacher.forward import teacher_logits


def _bytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def state_bytes(state: Any) -> dict[str, int]:
    """A checkpoint's bytes over all devices: the parameters, the optimiser state, the EMA."""
    out = {
        "params": _bytes(state.params),
        "optimizer": _bytes(state.opt_state),
        "ema": _bytes(state.ema_params),
    }
    return out | {"total": _bytes(state)}


def embedding_width(config: ml_collections.ConfigDict, teacher: Any, num_classes: int) -> int:
    """The width of the teacher's embeddings a cache of this config stores (0: none)."""
    task = tasks.task_of(config)
    if task.cache == tasks.PAIR_EMBEDDINGS:
        if isinstance(teacher, PairTeacher):
            return int(teacher.clip.embed_dim)
        from deit_jax.models import model_options

        return int(model_options(config.teacher.name)["embed_dim"])
    if not config.teacher.cache_embeddings and config.distillation.kind != "feature":
        return 0
    if teacher is None:
        teacher = build_flax_teacher(config, num_classes, shapes=True)[0]
    return int(feature_width(teacher))


def cache_bytes(
    config: ml_collections.ConfigDict,
    info: data.DatasetInfo,
    total_steps: int | None,
    embedding_dim: int,
) -> int | None:
    """The bytes `--config.mode=teacher_cache` of this config writes (every step of the run, the
    layout of `deit_jax.teacher.cache.store`); 0 for a run without a teacher; None when the
    data's size is unknown."""
    if config.distillation.kind == "none":
        return 0
    if total_steps is None:
        return None
    t = config.teacher
    embedding = embedding_dim * np.dtype(t.cache_embedding_dtype).itemsize
    if tasks.task_of(config).cache == tasks.PAIR_EMBEDDINGS:
        per_example = 2 * embedding
    else:
        index = 2 if info.num_classes <= 32767 else 4
        topk = min(int(t.cache_topk), info.num_classes)
        per_example = topk * (np.dtype(t.cache_dtype).itemsize + index) + embedding
    return int(total_steps * config.batch_size * per_example)


def teacher_forward(teacher: Any):
    """`fn(teacher_variables, batch)`: the frozen teacher's forward on a train batch alone."""
    if isinstance(teacher, PairTeacher):
        return lambda v, b: teacher.apply(v, b["image"], b.get("teacher_text", b["text"]))
    return lambda v, b: teacher_logits(teacher, v, b["image"])
