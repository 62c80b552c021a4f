"""The config rules of distillation and the teacher (a section of `deit_jax.config.rules`'s
table, `TEACHER_RULES`), the parsers of the teacher cache's keys (`cache_paths`, `cache_weights`,
`epoch_range`), and an ensemble's members, each checked as the single teacher of its own config
(`with_member_problems`).
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Any

from deit_jax import losses
from deit_jax.config import members, predicates
from deit_jax.config.defaults import TEACHER_CLIP, TEACHER_FRAMEWORKS, TEACHER_TORCH
from deit_jax.config.predicates import (
    LABEL_FREE,
    WEIGHTS,
    Context,
    Rule,
    choice,
    error_of,
    in_range,
    int_at_least,
    is_int,
    label_free,
    one_of,
    parses,
    problem_rule,
    registered,
)
from deit_jax.data import labels
from deit_jax.models.registry import list_models

# --------------------------------------------------------------------------- predicates


def _teacher_given(v: Any, c: Context) -> bool:
    # A run that reads a teacher cache needs no teacher; the cache writer always does.
    if c.get("mode") == "teacher_cache":
        return bool(v)
    return not c.distilling or c.teacher_from_run or bool(v) or _reads_cache(c)


def _reads_cache(c: Context) -> bool:
    return c.get("mode") != "teacher_cache" and bool(c.get("teacher.cache"))


def _teacherregistered(v: Any, c: Context) -> bool:
    # A PyTorch teacher is any timm name (checked by timm when the writer builds it).
    needed = c.distilling or c.get("mode") == "teacher_cache"
    return not needed or c.get("teacher.framework") == TEACHER_TORCH or registered(v, c)


def cache_paths(value: str) -> list[str]:
    """`teacher.cache` as its directories: none, one, or several "A,B,C" (an ensemble)."""
    return [p.strip() for p in value.split(",")] if value else []


def cache_weights(value: str, count: int) -> list[float]:
    """`teacher.cache_weights` for `count` caches, normalised to sum 1 ("" = equal weights).
    Raises ValueError naming what is wrong."""
    if value == "":
        return [1.0 / count] * count
    try:
        weights = [float(w) for w in str(value).split(",")]
    except ValueError:
        raise ValueError("must be comma-separated numbers, e.g. '0.5,0.3,0.2'") from None
    if len(weights) != count:
        raise ValueError(f"gives {len(weights)} weights for the {count} caches of teacher.cache")
    if any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError("must be non-negative and not all 0")
    return [w / sum(weights) for w in weights]


def _cache_dir(v: Any, c: Context) -> bool:
    if not isinstance(v, str):
        return False
    if not v or c.get("mode") == "teacher_cache":
        return True
    return all(p and ("://" in p or os.path.isdir(p)) for p in cache_paths(v))


def _cache_weights_problem(v: Any, c: Context) -> str | None:
    caches = c.get("teacher.cache")
    count = len(cache_paths(caches)) if isinstance(caches, str) else 0
    if v == "":
        return None
    if count < 2:
        return "weighs the members of an ensemble: give teacher.cache several caches, 'A,B'"
    try:
        cache_weights(v, count)
    except ValueError as e:
        return f"{e} ('' weighs every cache equally)"
    return None


def epoch_range(spec: str) -> tuple[int | None, int | None]:
    """`teacher.cache_epochs` "START:END" as (start, end), None where a side is empty; "" is
    (None, None): every epoch. Raises ValueError for anything else."""
    if spec == "":
        return None, None
    start, sep, end = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not all(p == "" or p.isdigit() for p in (start, end)):
        raise ValueError(spec)
    bounds = (int(start) if start else None, int(end) if end else None)
    if None not in bounds and bounds[0] >= bounds[1]:
        raise ValueError(spec)
    return bounds


def _teacher_exists(v: Any, c: Context) -> bool:
    needed = c.distilling or c.get("mode") == "teacher_cache"
    return not needed or not v or os.path.exists(os.path.expanduser(v))


def _writes_torch_cache(c: Context) -> bool:
    # A PyTorch teacher runs in the cache writer only; runs that read its cache need neither it
    # nor PyTorch.
    return c.get("teacher.framework") == TEACHER_TORCH and c.get("mode") == "teacher_cache"


def _torch_installed(v: Any, c: Context) -> bool:
    modules = ("torch", "timm")
    return not _writes_torch_cache(c) or all(importlib.util.find_spec(m) for m in modules)


# --------------------------------------------------------------------------- the rules

TEACHER_RULES: tuple[Rule, ...] = (
    choice("distillation.kind", losses.DISTILLATION_KINDS),
    choice("distillation.kl_reduction", losses.KL_REDUCTIONS),
    Rule(
        "distillation.alpha", in_range(0, 1), "must be in [0, 1] (the distillation loss's weight)"
    ),
    Rule("distillation.tau", in_range(0, math.inf, lo_open=True), "must be > 0 (the temperature)"),
    Rule("distillation.tau_squared", one_of(True, False), "must be True or False"),
    Rule(
        "distillation.kind",
        lambda v, c: not label_free(c) or v != "none",
        f"{LABEL_FREE} trains by distillation only: set --config.distillation.kind=soft (or "
        "hard, feature) with a teacher",
        after=("data.name",),
    ),
    Rule(
        "distillation.alpha",
        lambda v, c: not label_free(c) or v == 1,
        f"{LABEL_FREE} has no labels for the base loss, whose weight is 1 - alpha: set "
        "--config.distillation.alpha=1.0",
        after=("data.name",),
    ),
    choice("distillation.feature_loss", losses.FEATURE_LOSSES),
    choice("teacher.framework", TEACHER_FRAMEWORKS),
    Rule(
        "teacher.framework",
        _torch_installed,
        "needs PyTorch and timm, which are not installed: pip install 'deit_jax[torch]'",
        after=("mode",),
    ),
    Rule(
        "teacher.framework",
        lambda v, c: (
            v != TEACHER_TORCH
            or not c.distilling
            or c.get("mode") == "teacher_cache"
            or _reads_cache(c)
        ),
        "PyTorch teachers run in the cache writer only: write a cache with "
        "--config.mode=teacher_cache, then train with --config.teacher.cache=DIR",
        after=("distillation.kind", "mode"),
    ),
    Rule(
        "teacher.name",
        _teacherregistered,
        "must be a registered model (deit_jax.list_models()) for a 'flax' teacher",
        after=("distillation.kind", "teacher.framework"),
    ),
    Rule(
        "teacher.name",
        lambda v, c: c.get("teacher.framework") != TEACHER_CLIP or v in list_models("clip_*"),
        lambda c: (
            f"must be a CLIP model for teacher.framework='clip': {', '.join(list_models('clip_*'))}"
        ),
        after=("teacher.framework",),
    ),
    Rule(
        "teacher.class_names",
        parses(labels.parse_class_names),
        error_of(labels.parse_class_names, "teacher.class_names"),
    ),
    Rule(
        "teacher.class_names",
        lambda v, c: not label_free(c) or bool(v),
        f"{LABEL_FREE} has no class names: give the classes to distil with "
        "--config.teacher.class_names='cat,dog,...' or a file with one name per line",
        after=("data.name",),
    ),
    Rule(
        "teacher.prompts",
        parses(labels.check_templates),
        error_of(labels.check_templates, "teacher.prompts"),
    ),
    Rule(
        "teacher.checkpoint",
        _teacher_given,
        "distillation needs a trained teacher: set --config.teacher.checkpoint to "
        + WEIGHTS
        + ", or use --config.distillation.kind=none",
        after=("distillation.kind", "mode"),
        on_disk=True,
    ),
    Rule(
        "teacher.checkpoint",
        _teacher_exists,
        f"does not exist; give {WEIGHTS}, or use --config.distillation.kind=none",
        after=("distillation.kind", "mode"),
        on_disk=True,
    ),
    Rule(
        "teacher.checkpoint",
        lambda v, c: not _writes_torch_cache(c) or os.path.isfile(os.path.expanduser(v)),
        "a PyTorch teacher (teacher.framework='torch') needs a local checkpoint file (.pth, .pt, "
        ".bin or .safetensors) holding the state dict of timm's model; no weights are downloaded",
        after=("teacher.framework", "distillation.kind", "mode"),
        on_disk=True,
    ),
    Rule(
        "teacher.cache",
        _cache_dir,
        "must be '', a teacher cache directory that exists, or several, comma-separated",
        on_disk=True,
    ),
    problem_rule("teacher.cache_weights", _cache_weights_problem, after=("teacher.cache",)),
    Rule(
        "teacher.cache",
        lambda v, c: (
            not v or c.get("mode") == "teacher_cache" or c.get("distillation.kind") != "none"
        ),
        "holds teacher outputs for distillation: set --config.distillation.kind, or remove the "
        "cache",
        after=("distillation.kind", "mode"),
    ),
    Rule(
        "teacher.cache",
        lambda v, c: c.get("distillation.kind") != "feature" or len(cache_paths(v)) <= 1,
        "feature distillation reads one cache's embeddings: give one cache",
        after=("distillation.kind",),
    ),
    problem_rule(
        "teacher.members",
        lambda v, c: members.members_problem(v, c.config),
        after=("distillation.kind", "mode", "teacher.cache"),
    ),
    Rule("teacher.cache_embeddings", one_of(True, False), "must be True or False"),
    Rule(
        "teacher.cache_embedding_dtype",
        one_of("float16", "float32"),
        "must be 'float16' or 'float32'",
    ),
    Rule("teacher.cache_topk", int_at_least(1), "must be an integer >= 1 (hard needs 1)"),
    Rule("teacher.cache_dtype", one_of("float16", "float32"), "must be 'float16' or 'float32'"),
    Rule("teacher.cache_chunk_steps", int_at_least(1), "must be an integer >= 1"),
    Rule(
        "teacher.cache_epochs",
        parses(epoch_range),
        "must be '' (all epochs) or 'START:END' (END exclusive, e.g. '0:100')",
    ),
    Rule(
        "teacher.img_size",
        lambda v, c: v is None or (is_int(v) and v > 0),
        "must be a positive integer, or None for the student's image size",
    ),
)


def with_member_problems(found: list[str], rules: tuple[Rule, ...], context: Context) -> list[str]:
    """`found` (the problems of the whole config) with an ensemble's members checked: each as
    the single teacher of its own config (`members.member_config`), its lines named after it
    (`config.teacher.members.<name>.<key>=...`); the top-level teacher keys a member replaces
    are not checked alone."""
    names = members.member_names(context.config)
    if not names:
        return found
    replaced = tuple(f"config.teacher.{k}=" for k in members.MEMBER_KEYS)
    found = [line for line in found if not line.startswith(replaced)]
    if any(line.startswith("config.teacher.members=") for line in found):
        return found  # the members themselves are malformed: that line says how
    for name in names:
        member = Context(
            members.member_config(context.config, name),
            context.num_devices,
            context.num_processes,
            planning=context.planning,
        )
        for line in predicates.problems(rules, member):
            if line.startswith(replaced):
                found.append(line.replace("config.teacher.", f"config.teacher.members.{name}.", 1))
    return found
