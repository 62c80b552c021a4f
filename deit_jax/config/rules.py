"""Checks the whole config before any expensive work: `check_config(config, num_devices=...,
num_processes=...)` raises one `ConfigError` listing every problem, one line each:

  config.<key>=<value>: <what is allowed and what to do>

The checks are the flat list `RULES`: a key, a predicate on its value (which may look at the rest
of the config and at the device and process counts through `Context`) and the sentence that says
what is allowed. A key's rules run in order and stop at its first failure; a rule that depends on
other keys names them in `after` and is skipped when one of them already failed. Keys a config
does not have are skipped (configs written for older or newer versions, partial test configs).
Adding a key's check is one line here.

The table's distillation and teacher section, `TEACHER_RULES`, lives in
`deit_jax.config.teacher_rules` with its predicates and the ensemble members' checks.
This table is the one place where a config value is checked: the modules that use a value take
it as the rules left it (no second check, no second default), and the names a rule accepts come
from the module that implements them where it is import-light (`deit_jax.losses`, the model
registry, the eval-set and class-name parsers of `deit_jax.data`).

Import-light on purpose (no TensorFlow, no model building; the model registry only for patch
sizes), so that `python -m deit_jax.main` refuses a bad config within about a second.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from deit_jax import losses
from deit_jax.config import predicates, tasks, teacher_rules
from deit_jax.config.clip_student_rules import CLIP_STUDENT_RULES, WEIGHT_KEYS
from deit_jax.config.defaults import EXPERIMENTS, MODES, base_config
from deit_jax.config.init_rules import INIT_RULES
from deit_jax.config.predicates import (
    LABEL_FREE,
    MISSING,
    WEIGHTS,
    Context,
    Rule,
    bounds,
    choice,
    error_of,
    existing_path,
    image_size,
    in_range,
    int_at_least,
    is_int,
    is_num,
    label_free,
    one_of,
    parses,
    problem_rule,
    registered,
    spoken,
    three,
)
from deit_jax.config.teacher_rules import TEACHER_RULES
from deit_jax.data import eval_sets, labels
from deit_jax.data.randaugment_policy import parse_policy
from deit_jax.errors import ConfigError
from deit_jax.models.registry import given_options, model_options
from deit_jax.models.vit import REMAT_POLICIES

# --------------------------------------------------------------------------- predicates


def _patch_size(c: Context) -> int | None:
    """The student's patch size (its option, overridden by config.model), None if it has none."""
    model = c.get("model")
    patch = model.get("patch_size") if isinstance(model, ml_collections.ConfigDict) else None
    return patch or model_options(c.get("model_name")).get("patch_size")


def _fits_patches(v: Any, c: Context) -> bool:
    patch = _patch_size(c)
    sizes = v if isinstance(v, Sequence) else [v]
    return patch is None or all(s % patch == 0 for s in sizes)


def _patch_message(c: Context) -> str:
    patch, size = _patch_size(c), c.get("data.img_size")
    size = size if is_int(size) else max(size)
    below, above = size // patch * patch, (size // patch + 1) * patch
    return (
        f"must be a multiple of the patch size {patch} of {c.get('model_name')!r} (or the "
        f"model's patches would not tile the image); use e.g. {below or above} or {above}"
    )


def _devices_divide(v: Any, c: Context) -> bool:
    return v % c.num_devices == 0 and v % c.num_processes == 0


def _devices_message(key: str) -> Callable[[Context], str]:
    def message(c: Context) -> str:
        step = math.lcm(c.num_devices, c.num_processes)
        where = f"{c.num_devices} devices" + (
            f" of {c.num_processes} processes" if c.num_processes > 1 else ""
        )
        return (
            f"must be a multiple of the {where} that share the batch; use e.g. "
            f"{max(1, math.ceil(c.get(key) / step)) * step}"
        )

    return message


def _num_shares(v: Any, c: Context) -> bool:
    batch = c.get("batch_size")
    return v == 0 or (v % c.num_processes == 0 and batch % v == 0)


def _pair_batches(v: Any, c: Context) -> bool:
    shares = c.get("data.num_shares") or c.num_processes
    return v != "pair" or (c.get("batch_size") // shares) % 2 == 0


def _mesh_fsdp(v: Any, c: Context) -> bool:
    return is_int(v) and v >= 1 and c.num_devices % v == 0


def _mesh_data(v: Any, c: Context) -> bool:
    return v == -1 or (is_int(v) and v >= 1 and v * c.get("mesh.fsdp") == c.num_devices)


def _unknown_model_keys(c: Context) -> list[str]:
    name, model = c.get("model_name"), c.get("model")
    if not isinstance(model, ml_collections.ConfigDict):
        return []
    options = model_options(name)
    return sorted(k for k in given_options(name, model.to_dict()) if k not in options)


def _model_keys(v: Any, c: Context) -> bool:
    return not _unknown_model_keys(c)


def _model_keys_message(c: Context) -> str:
    options = model_options(c.get("model_name"))
    unknown = _unknown_model_keys(c)
    return (
        f"{c.get('model_name')!r} has no option {', '.join(unknown)}; its options are "
        f"{', '.join(sorted(options))}"
    )


def _extra_eval_problem(v: Any, c: Context) -> str | None:
    """What is wrong with `data.extra_eval` (syntax, a duplicate, a missing or empty set)."""
    try:
        sets = eval_sets.parse(v)
    except ValueError as e:
        return f"must be comma-separated name[:split] entries ({e})"
    prefixes = [s.prefix for s in sets]
    if "eval" in prefixes or len(set(prefixes)) < len(prefixes):
        return "lists a set twice (each is logged under eval_<name>[_<split>]); remove one"
    data_dir = c.get("data.data_dir")
    main_split = c.get("data.eval_split")
    for s in sets:
        found = eval_sets.problem(s, data_dir if isinstance(data_dir, str) else "", main_split)
        if found:
            return found
    return None


def _randaugment(v: Any) -> None:
    if not isinstance(v, str):
        raise TypeError(
            "must be '' (off) or a timm RandAugment string such as 'rand-m9-mstd0.5-inc1'"
        )
    if v:
        parse_policy(v)


def _complete(section: str) -> Callable[[Any, Context], bool]:
    """A section the pipeline or the optimiser takes whole: it must have every default key."""
    return lambda v, c: not set(base_config()[section]) - set(v)


def _missing_keys(section: str) -> Callable[[Context], str]:
    def message(c: Context) -> str:
        missing = sorted(set(base_config()[section]) - set(c.get(section)))
        return f"lacks {', '.join(missing)}; start from deit_jax.config.base_config()"

    return message


def _task(c: Context) -> tasks.Task:
    return tasks.task_of(c.config)


def _task_choice(c: Context, key: str, field: str, described: dict[str, str]) -> str:
    """What `field` of the run's task allows for `key`, said from the table that describes each
    value, and which task the value is for."""
    task, value = _task(c), c.get(key)
    said = f"must be {spoken({k: described[k] for k in getattr(task, field)})} for {task.what}"
    for other in tasks.TASKS.values():
        if value in getattr(other, field):
            return f"{said}; {value!r} is for {other.what}"
    return said


def _label_free_split(v: Any, c: Context) -> bool:
    return not label_free(c) or (isinstance(v, str) and v.split("[", 1)[0].strip() == "train")


# --------------------------------------------------------------------------- the rules

RULES: tuple[Rule, ...] = (
    choice("mode", MODES),
    *(
        Rule(
            "mode",
            lambda v, c, mode=mode: v != mode or c.get(mode) is not MISSING,
            f"needs a config with a `{mode}` section: use --config=configs/{mode}.py",
        )
        for mode in EXPERIMENTS
    ),
    choice("loss", losses.BASE_LOSSES),
    Rule("seed", lambda v, c: is_int(v), "must be an integer"),
    Rule("init_seed", lambda v, c: v is None or is_int(v), "must be an integer, or None: seed"),
    Rule("dtype", one_of("float32", "bfloat16"), "must be 'float32' or 'bfloat16'"),
    # Batches and the devices that share them.
    Rule("batch_size", int_at_least(1), "must be a positive integer (the global batch)"),
    Rule("batch_size", _devices_divide, _devices_message("batch_size")),
    Rule("eval_batch_size", int_at_least(1), "must be a positive integer (the global batch)"),
    Rule("eval_batch_size", _devices_divide, _devices_message("eval_batch_size")),
    Rule("mesh.fsdp", _mesh_fsdp, lambda c: f"must divide the {c.num_devices} devices (1: off)"),
    Rule(
        "mesh.data",
        _mesh_data,
        lambda c: (
            "must be -1 (all devices that mesh.fsdp leaves) or mesh.data x mesh.fsdp = "
            f"the {c.num_devices} devices"
        ),
        after=("mesh.fsdp",),
    ),
    # Schedule, logging, checkpoints.
    Rule("num_epochs", in_range(0, math.inf, lo_open=True), "must be > 0 (may be fractional)"),
    Rule(
        "eval_every_epochs", in_range(0, math.inf, lo_open=True), "must be > 0 (may be fractional)"
    ),
    Rule("log_every_steps", int_at_least(1), "must be an integer >= 1"),
    Rule("checkpoint_every_steps", int_at_least(1), "must be an integer >= 1"),
    Rule("keep_checkpoints", int_at_least(1), "must be an integer >= 1 (checkpoints kept)"),
    Rule("progress_bar", one_of(True, False), "must be True or False"),
    # The student.
    Rule("model_name", registered, "must be a registered model (deit_jax.list_models())"),
    Rule("model", _model_keys, _model_keys_message, after=("model_name",)),
    Rule(
        "model.drop_path_rate", in_range(0, 1, hi_open=True), "must be in [0, 1) (0.1 for DeiT-S)"
    ),
    Rule("model.drop_rate", in_range(0, 1, hi_open=True), "must be in [0, 1)"),
    Rule(
        "model.num_classes",
        lambda v, c: v is None or (is_int(v) and v >= 1),
        "must be a positive integer, or None for the data set's class count",
    ),
    Rule(
        "model.attention",
        lambda v, c: v in (None, "xla") or (v == "cudnn" and c.get("dtype") == "bfloat16"),
        "must be None (written-out attention), 'xla' or 'cudnn' (jax.nn.dot_product_attention; "
        "cudnn runs on a GPU in bfloat16: set dtype=bfloat16)",
    ),
    Rule(
        "model.remat",
        lambda v, c: v is None or v in REMAT_POLICIES,
        f"must be None (off) or a jax.checkpoint_policies name: {', '.join(REMAT_POLICIES)}",
    ),
    Rule("init_from", existing_path, f"must be '' or an existing path: {WEIGHTS}", on_disk=True),
    *INIT_RULES,
    *TEACHER_RULES,
    # What the run's task (deit_jax.config.tasks) runs in and trains with.
    Rule(
        "mode", lambda v, c: v in _task(c).modes, lambda c: _task_choice(c, "mode", "modes", MODES)
    ),
    Rule(
        "distillation.kind",
        lambda v, c: v in _task(c).distillation_kinds,
        lambda c: _task_choice(
            c, "distillation.kind", "distillation_kinds", losses.DISTILLATION_KINDS
        ),
        after=("data.name",),
    ),
    # Data.
    Rule("data.name", lambda v, c: isinstance(v, str) and v != "", "must name a data set"),
    Rule(
        "data.name",
        lambda v, c: not v.startswith("folder:") or os.path.isdir(os.path.expanduser(v[7:])),
        "names a folder that does not exist; give folder:<root> with <root>/<split>/<class>/*.jpg",
        on_disk=True,
    ),
    Rule(
        "data.name",
        lambda v, c: not labels.is_label_free(v) or os.path.isdir(labels.label_free_root(v)),
        "names a folder that does not exist; give images:<root>, a folder of images (any layout)",
        on_disk=True,
    ),
    Rule("data.manual_dir", existing_path, "must be '' or an existing directory", on_disk=True),
    Rule("data.train_split", lambda v, c: isinstance(v, str) and v != "", "must name a split"),
    Rule("data.eval_split", lambda v, c: isinstance(v, str) and v != "", "must name a split"),
    problem_rule("data.extra_eval", _extra_eval_problem, after=("data.eval_split",), on_disk=True),
    *(
        Rule(
            key,
            _label_free_split,
            f"{LABEL_FREE} has one split, 'train' (every image): slice it, e.g. "
            "--config.data.train_split='train[:95%]' --config.data.eval_split='train[95%:]'",
            after=("data.name",),
        )
        for key in ("data.train_split", "data.eval_split")
    ),
    Rule("data.img_size", image_size, "must be a positive integer (or a (height, width) pair)"),
    Rule("data.img_size", _fits_patches, _patch_message, after=("model_name", "model")),
    Rule(
        "data.crop_pct", in_range(0, 1, lo_open=True), "must be in (0, 1] (0.875 for DeiT at 224)"
    ),
    Rule(
        "data.eval_interpolation",
        one_of("bicubic", "bilinear"),
        "must be 'bicubic' (DeiT's, timm's) or 'bilinear'",
    ),
    Rule("data.repeated_aug", int_at_least(1), "must be an integer >= 1 (1: off, DeiT: 3)"),
    Rule("data.shuffle_buffer", int_at_least(1), "must be an integer >= 1"),
    Rule("data.cache", one_of(True, False), "must be True or False"),
    Rule("data.prefetch", int_at_least(0), "must be an integer >= 0 (batches ahead)"),
    Rule("data.num_shares", int_at_least(0), "must be an integer >= 0 (0: one per process)"),
    Rule(
        "data.num_shares",
        _num_shares,
        lambda c: (
            f"must be 0, or a multiple of the {c.num_processes} processes that divides "
            f"batch_size {c.get('batch_size')}"
        ),
        after=("batch_size",),
    ),
    # Augmentation.
    Rule("augment", _complete("augment"), _missing_keys("augment")),
    Rule("augment.scale", bounds, "must be (min, max) with 0 < min <= max, e.g. (0.08, 1.0)"),
    Rule("augment.ratio", bounds, "must be (min, max) with 0 < min <= max, e.g. (0.75, 1.33)"),
    Rule(
        "augment.interpolation",
        one_of("bicubic", "bilinear", "random"),
        "must be 'bicubic', 'bilinear' or 'random'",
    ),
    Rule("augment.hflip", in_range(0, 1), "must be a probability in [0, 1]"),
    Rule(
        "augment.randaugment", parses(_randaugment), error_of(_randaugment, "augment.randaugment")
    ),
    Rule(
        "augment.color_jitter",
        lambda v, c: (is_num(v) and v >= 0) or (three(False)(v, c) and min(v) >= 0),
        "must be a strength >= 0 (0: off) or (brightness, contrast, saturation) strengths >= 0",
    ),
    Rule(
        "augment.reprob", in_range(0, 1), "must be a probability in [0, 1] (0: no random erasing)"
    ),
    Rule("augment.three_augment", one_of(True, False), "must be True or False"),
    Rule("augment.src", one_of(True, False), "must be True or False"),
    Rule("augment.remode", one_of("pixel", "rand", "const"), "must be 'pixel', 'rand' or 'const'"),
    Rule("augment.mean", three(False), "must be three numbers (per channel, in [0, 1] units)"),
    Rule("augment.std", three(True), "must be three positive numbers (per channel)"),
    # Mixup, cutmix, label smoothing.
    Rule("mixup", _complete("mixup"), _missing_keys("mixup")),
    Rule("mixup.mixup_alpha", in_range(0, math.inf), "must be >= 0 (0: no mixup)"),
    Rule("mixup.cutmix_alpha", in_range(0, math.inf), "must be >= 0 (0: no cutmix)"),
    Rule("mixup.prob", in_range(0, 1), "must be a probability in [0, 1]"),
    Rule("mixup.switch_prob", in_range(0, 1), "must be a probability in [0, 1]"),
    Rule("mixup.mode", one_of("batch", "pair", "elem"), "must be 'batch', 'pair' or 'elem'"),
    Rule(
        "mixup.mode",
        _pair_batches,
        "'pair' needs an even batch per data share; use an even batch_size / num_shares",
        after=("batch_size", "data.num_shares"),
    ),
    Rule("mixup.label_smoothing", in_range(0, 1, hi_open=True), "must be in [0, 1) (DeiT: 0.1)"),
    # The optimiser.
    Rule("optim", _complete("optim"), _missing_keys("optim")),
    Rule("optim.name", one_of("adamw", "lamb"), "must be 'adamw' or 'lamb'"),
    Rule("optim.unscale_lr", one_of(True, False), "must be True or False"),
    Rule("optim.lr", in_range(0, math.inf), "must be >= 0 (for a batch of optim.lr_batch_base)"),
    Rule("optim.lr_batch_base", in_range(0, math.inf, lo_open=True), "must be > 0"),
    Rule("optim.weight_decay", in_range(0, math.inf), "must be >= 0"),
    Rule("optim.b1", in_range(0, 1, hi_open=True), "must be in [0, 1) (AdamW's beta1, 0.9)"),
    Rule("optim.b2", in_range(0, 1, hi_open=True), "must be in [0, 1) (AdamW's beta2, 0.999)"),
    Rule("optim.eps", in_range(0, math.inf), "must be >= 0"),
    Rule("optim.warmup_epochs", in_range(0, math.inf), "must be >= 0 (may be fractional)"),
    Rule("optim.warmup_lr", in_range(0, math.inf), "must be >= 0"),
    Rule("optim.min_lr", in_range(0, math.inf), "must be >= 0"),
    Rule("optim.clip_grad_norm", in_range(0, math.inf), "must be >= 0 (0: no clipping)"),
    Rule("optim.grad_accum_steps", int_at_least(1), "must be an integer >= 1 (1: off)"),
    Rule("optim.ema_decay", in_range(0, 1, hi_open=True), "must be in [0, 1) (0: no EMA)"),
)


# A classifier distils by distillation.kind and alpha: a pair loss's weight would be ignored.
CLASSIFIER_RULES: tuple[Rule, ...] = tuple(
    Rule(
        key,
        lambda v, c: not v,
        f"is a loss of {tasks.TASKS[tasks.CLIP_STUDENT].what}, not of a classifier (its "
        "distillation is distillation.kind and alpha): leave it unset or 0",
    )
    for key in WEIGHT_KEYS
)

# Each task's own rules, after the common table (deit_jax.config.tasks).
TASK_RULES: dict[str, tuple[Rule, ...]] = {
    tasks.CLASSIFIER: CLASSIFIER_RULES,
    tasks.CLIP_STUDENT: CLIP_STUDENT_RULES,
}


def rules_of(config: ml_collections.ConfigDict) -> tuple[Rule, ...]:
    """The rules `config` must satisfy: the common table plus its task's own."""
    return RULES + TASK_RULES[tasks.task_of(config).name]


def problems(
    config: ml_collections.ConfigDict,
    *,
    num_devices: int,
    num_processes: int = 1,
    teacher_from_run: bool = False,
    planning: bool = False,
) -> list[str]:
    """Every problem of `config`, one `config.<key>=<value>: <what is allowed>` line each.

    `teacher_from_run`: the command trains the teacher before the stages that distil from it;
    `planning`: a plan, which reads none of the run's files (see `Context`)."""
    context = Context(config, num_devices, num_processes, teacher_from_run, planning)
    table = rules_of(config)
    found = predicates.problems(table, context)
    return teacher_rules.with_member_problems(found, table, context)


def check_config(
    config: ml_collections.ConfigDict,
    *,
    num_devices: int,
    num_processes: int = 1,
    teacher_from_run: bool = False,
    planning: bool = False,
) -> None:
    """Raises `ConfigError` listing every problem of `config` (see the module docstring)."""
    found = problems(
        config,
        num_devices=num_devices,
        num_processes=num_processes,
        teacher_from_run=teacher_from_run,
        planning=planning,
    )
    if found:
        raise ConfigError(found)
