"""The training loop: mesh, models, data, one jitted train step, periodic eval and checkpoints.

`train_and_evaluate(config, workdir)` resumes from the latest good checkpoint in `workdir`
(params, optimiser state, EMA, step, RNG and data-iterator position), so starting the same
command again after a crash or a preemption continues where it stopped. `evaluate(config,
workdir)` evaluates the latest checkpoint, or the weights in `config.init_from`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from tqdm import tqdm

from deit_jax import (
    checkpoint,
    convert,
    data,
    feature_distillation,
    optim,
    sharding,
    steps,
    validation,
)
from deit_jax.errors import CheckpointError, ConfigError, UserError, WeightsNotFoundError
from deit_jax.jit import jit
from deit_jax.metrics import MetricsWriter
from deit_jax.models import create_model, model_options
from deit_jax.teacher import build_teacher, cache, load_weights
from deit_jax.teacher.flax_teacher import compute_dtype

log = logging.getLogger(__name__)

BEST_METRIC = "top1"


class Preempted(Exception):
    """SIGTERM stopped training after saving a checkpoint; running again resumes from it."""


class NonFiniteLossError(UserError, RuntimeError):
    """Training produced a NaN/inf loss or gradient; the last good checkpoint is kept."""


# --------------------------------------------------------------------------- models and weights


def student_overrides(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
    """`create_model` overrides for the student: config.model plus the data's classes and size."""
    overrides = {k: v for k, v in config.model.to_dict().items() if v is not None}
    if overrides.setdefault("num_classes", num_classes) != num_classes:
        raise ConfigError(
            f"config.model.num_classes={overrides['num_classes']} but data set "
            f"{config.data.name!r} has {num_classes} classes; remove the override or use "
            "matching data."
        )
    if "img_size" in model_options(config.model_name):
        overrides.setdefault("img_size", config.data.img_size)
    return overrides


def build_student(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    overrides = student_overrides(config, num_classes)
    return create_model(config.model_name, dtype=compute_dtype(config.dtype), **overrides)


def _merge_pretrained(params: Any, pretrained: Any, model: nn.Module) -> Any:
    """Pretrained params over fresh ones; pos_embed resized, heads of other class counts fresh."""
    flat, source = traverse_util.flatten_dict(params), traverse_util.flatten_dict(pretrained)
    problems, fresh_heads = [], []
    for path, value in flat.items():
        if path[0] == feature_distillation.PROJECTION:
            continue  # feature distillation's projection is not part of the weights: fresh
        if path not in source:
            problems.append(f"missing {'/'.join(path)}")
            continue
        new = np.asarray(source[path])
        if new.shape != value.shape and path[-1] == "pos_embed":
            new = convert.resize_pos_embed(new, model.grid_size, model.num_pos_prefix_tokens)
        if new.shape != value.shape and path[0] in ("head", "head_dist", "fc"):
            fresh_heads.append("/".join(path))
            continue
        if new.shape != value.shape:
            problems.append(f"{'/'.join(path)}: {new.shape} vs {value.shape}")
            continue
        flat[path] = jnp.asarray(new, value.dtype)
    if problems:
        raise CheckpointError("config.init_from does not fit the model: " + "; ".join(problems))
    if fresh_heads:
        log.warning("init_from: class count differs, training new %s", ", ".join(fresh_heads))
    return traverse_util.unflatten_dict(flat)


# --------------------------------------------------------------------------- state on the mesh


def _state_and_shardings(config, model, tx, mesh, projection=None):
    ema = config.optim.ema_decay > 0
    # The model's own seed when given: students that differ only in it share one data stream,
    # and so one teacher cache.
    init_seed = config.get("init_seed")
    rng = jax.random.PRNGKey(config.seed if init_seed is None else init_seed)
    boxed = jax.eval_shape(lambda: steps.init_state(model, tx, rng, ema=ema, projection=projection))
    state_shardings = sharding.tree_shardings(boxed, mesh)
    init = jit(
        lambda: nn.meta.unbox(steps.init_state(model, tx, rng, ema=ema, projection=projection)),
        out_shardings=state_shardings,
    )
    values = jax.tree.map(
        lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
        boxed,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), values, state_shardings
    )
    return init, abstract, state_shardings


def _bce_without_smoothing(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """With `loss="bce"`, a copy of `config` without label smoothing (DeiT III's recipe).

    The BCE binarises the mixed targets (`targets > 0`); smoothed targets are positive
    everywhere, so smoothing would make every class a positive. The reference recipe sets it to
    0; this ignores any other value, with a warning.
    """
    if config.loss != "bce" or not config.mixup.label_smoothing:
        return config
    log.warning(
        "loss=bce ignores mixup.label_smoothing=%s (binarised targets): training with 0.",
        config.mixup.label_smoothing,
    )
    config = copy.deepcopy(config)
    config.mixup.label_smoothing = 0.0
    return config


def _check_config(config: ml_collections.ConfigDict, devices: list[jax.Device] | None) -> None:
    """The whole config, before any data set, model or compilation (`deit_jax.validation`)."""
    num_devices = jax.device_count() if devices is None else len(devices)
    validation.check_config(config, num_devices=num_devices, num_processes=jax.process_count())


def _projection(config, model, teacher) -> feature_distillation.Projection | None:
    if config.distillation.kind != "feature":
        return None
    return feature_distillation.build_projection(model, teacher)


# --------------------------------------------------------------------------- evaluation


def _eval_teacher(teacher: nn.Module | None, num_classes: int) -> nn.Module | None:
    """The teacher for the eval metrics (teacher top-1, agreement): only if it predicts the
    data's classes (a feature-distillation teacher may not)."""
    if teacher is None or getattr(teacher, "num_classes", num_classes) != num_classes:
        return None
    return teacher


def _eval_step(config, model, teacher, info: data.DatasetInfo):
    """The jitted eval step: with a teacher also the teacher-student KL at the run's tau and
    reduction; only KL and agreement for label-free data."""
    return jit(
        steps.make_eval_step(
            model,
            _eval_teacher(teacher, info.num_classes),
            tau=config.distillation.tau,
            kl_reduction=config.distillation.kl_reduction,
            tau_squared=config.distillation.get("tau_squared", True),
            labelled=info.labelled,
        )
    )


def _best_metric(info: data.DatasetInfo, teacher: nn.Module | None) -> str | None:
    """What ranks checkpoints: top-1, or without labels the agreement with the teacher."""
    if info.labelled:
        return BEST_METRIC
    return "agreement" if _eval_teacher(teacher, info.num_classes) is not None else None


def _eval_loop(eval_step, eval_data, args) -> dict[str, float]:
    totals: dict[str, float] = {}
    for batch in eval_data:
        sums = jax.device_get(eval_step(*args, batch))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = totals.pop("count")
    # ReaL accuracies count only the images that have real labels.
    real = totals.pop("real_count", None)
    out = {
        k: v / ((real or float("nan")) if k.startswith("real_") else count)
        for k, v in totals.items()
    }
    return out | {"count": count} | ({} if real is None else {"real_count": real})


def _eval_extra(extra_evals, eval_step, args) -> dict[str, dict[str, float]]:
    """Metrics of each extra eval set (`config.data.extra_eval`), by prefix."""
    return {prefix: _eval_loop(eval_step, passes, args) for prefix, passes in extra_evals}


# --------------------------------------------------------------------------- training


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, devices: list[jax.Device] | None = None
) -> dict[str, float]:
    """Trains (resuming if `workdir` holds checkpoints); returns the final eval metrics.

    On SIGTERM it saves a checkpoint and raises `Preempted`.

    `devices` (default: all) are the devices the mesh is built over.
    """
    _check_config(config, devices)
    config = _bce_without_smoothing(config)
    workdir = os.path.abspath(workdir)
    info = data.dataset_info(config)
    mesh = sharding.create_mesh(config.mesh, devices)
    model = build_student(config, info.num_classes)
    teacher, teacher_variables = build_teacher(config, info.num_classes, workdir)
    teacher_variables = jax.device_put(teacher_variables, sharding.replicated(mesh))
    projection = _projection(config, model, teacher)

    train_data = data.build_train(config, mesh, data_axes=sharding.DATA_AXES)
    # Before anything is built or compiled: a cache written for another stream is refused now.
    reader = cache.CacheReader(config, train_data) if config.teacher.cache else None
    eval_data = data.build_eval(config, mesh, data_axes=sharding.DATA_AXES)
    extra_evals = data.build_extra_evals(
        config, mesh, sharding.DATA_AXES, num_classes=info.num_classes
    )
    steps_per_epoch = train_data.steps_per_epoch
    total_steps = max(1, int(round(config.num_epochs * steps_per_epoch)))
    eval_every = max(1, int(round(config.eval_every_epochs * steps_per_epoch)))
    tx, schedule = optim.create_optimizer(
        config.optim,
        global_batch_size=config.batch_size,
        steps_per_epoch=steps_per_epoch,
        num_epochs=config.num_epochs,
    )

    best_metric = _best_metric(info, teacher)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_rules(mesh)):
        init, abstract, state_shardings = _state_and_shardings(config, model, tx, mesh, projection)
        checkpointer = checkpoint.TrainCheckpointer(
            os.path.join(workdir, "checkpoints"),
            save_every_steps=config.checkpoint_every_steps,
            keep=config.keep_checkpoints,
            best_metric=best_metric,
        )
        restored = checkpointer.restore(abstract)
        if restored is not None:
            start_step, state, data_state = restored
            train_data.set_state(data_state)
            log.info("Resumed from step %d in %s", start_step, checkpointer.directory)
        else:
            start_step, state = 0, init()
            if config.init_from:
                pretrained, _ = load_weights(config.init_from, config.model_name)
                params = _merge_pretrained(state.params, pretrained["params"], model)
                state = state.replace(
                    params=jax.device_put(params, state_shardings.params),
                    ema_params=jax.device_put(params, state_shardings.params)
                    if state.ema_params
                    else {},
                )
                log.info("Initialised from %s", config.init_from)

        if config.teacher.cache:
            reader.check_coverage(start_step, total_steps)
            train_data.extras = reader
            log.info("Teacher outputs from the cache %s", config.teacher.cache)
            if teacher is None:
                log.info(
                    "Evaluation skips teacher accuracy and agreement: no teacher checkpoint "
                    "(set --config.teacher.checkpoint as well to report them)."
                )
        train_step = jit(
            steps.make_train_step(model, tx, schedule, config, teacher, projection),
            out_shardings=(state_shardings, sharding.replicated(mesh)),
            donate_argnums=(0,),
        )
        eval_step = _eval_step(config, model, teacher, info)
        writer = MetricsWriter(workdir)
        log.info(
            "Training %s (%s params) on %s: %d steps of %d images, %d devices %s",
            config.model_name,
            f"{sum(x.size for x in jax.tree.leaves(state.params)):,}",
            config.data.name,
            total_steps,
            config.batch_size,
            mesh.size,
            dict(mesh.shape),
        )

        stop = {"signal": None}
        previous_handler = signal.signal(
            signal.SIGTERM, lambda signum, frame: stop.update(signal=signum)
        )
        eval_metrics: dict[str, float] = {}
        progress = tqdm(
            total=total_steps,
            initial=start_step,
            desc=f"train {config.model_name}",
            disable=not config.progress_bar or jax.process_index() != 0,
            dynamic_ncols=True,
        )
        tick, tick_step = time.perf_counter(), start_step
        try:
            for step in range(start_step + 1, total_steps + 1):
                state, metrics = train_step(state, teacher_variables, next(train_data))
                progress.update()
                last = step == total_steps
                if step % config.log_every_steps == 0 or last:
                    metrics = jax.device_get(metrics)
                    _check_finite(state, step)
                    now = time.perf_counter()
                    metrics["images_per_sec"] = (
                        (step - tick_step) * config.batch_size / (now - tick)
                    )
                    metrics["epoch"] = step / steps_per_epoch
                    tick, tick_step = now, step
                    writer.write(step, {f"train/{k}": v for k, v in metrics.items()})
                    progress.set_postfix(
                        loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_sec']:.0f}"
                    )
                evaluated = step % eval_every == 0 or last
                if evaluated:
                    eval_metrics = _eval_loop(
                        eval_step,
                        eval_data,
                        (state.params, state.model_state, state.ema_params, teacher_variables),
                    )
                    writer.write(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
                    extra = _eval_extra(
                        extra_evals,
                        eval_step,
                        (state.params, state.model_state, state.ema_params, teacher_variables),
                    )
                    for prefix, values in extra.items():
                        writer.write(step, {f"{prefix}/{k}": v for k, v in values.items()})
                    if jax.process_index() == 0:  # tqdm.write prints even when disabled
                        progress.write(_format_eval(step, eval_metrics))
                        for prefix, values in extra.items():
                            progress.write(_format_eval(step, values).replace("eval", prefix, 1))
                if evaluated or checkpointer.should_save(step) or stop["signal"]:
                    _check_finite(state, step)
                    checkpointer.save(
                        step,
                        state,
                        data_state=train_data.get_state(),
                        metrics={best_metric: eval_metrics[best_metric]}
                        if evaluated and best_metric
                        else None,
                        force=True,
                    )
                if stop["signal"]:
                    log.warning("SIGTERM: saved step %d, exiting; rerun to resume.", step)
                    break
        finally:
            progress.close()
            checkpointer.wait_until_finished()
            checkpointer.close()
            writer.close()
            train_data.close()
            signal.signal(signal.SIGTERM, previous_handler)

        if stop["signal"]:
            # Raised, not returned, so that callers running several stages (the quickstart)
            # stop here too instead of starting the next one.
            raise Preempted(f"SIGTERM: checkpoint saved in {checkpointer.directory}")
        _export(workdir, config, state, info)
        if not eval_metrics and start_step >= total_steps:
            eval_metrics = _eval_loop(
                eval_step,
                eval_data,
                (state.params, state.model_state, state.ema_params, teacher_variables),
            )
        return eval_metrics


def _check_finite(state: steps.TrainState, step: int) -> None:
    nan_step = int(jax.device_get(state.nan_step))
    if nan_step >= 0:
        raise NonFiniteLossError(
            f"Non-finite loss or gradients at step {nan_step + 1} (detected by step {step}); "
            "that update was not applied and no checkpoint was written after it. Lower the "
            "learning rate (--config.optim.lr), enable clipping (--config.optim.clip_grad_norm=1) "
            "or use float32, then rerun: training resumes from the last good checkpoint."
        )


def _format_eval(step: int, metrics: dict[str, float]) -> str:
    parts = [f"{k} {100 * v:.2f}" for k, v in metrics.items() if "top1" in k or k == "agreement"]
    values = [f"{k} {metrics[k]:.4f}" for k in ("loss", "kl") if k in metrics]
    return (
        f"eval @ step {step}: " + ", ".join(parts) + (f" ({', '.join(values)})" if values else "")
    )


def run_metadata(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> dict[str, Any]:
    """What `deit_jax.export` needs besides the weights: the run's data, preprocessing and
    recipe (stored in the weights directory's deit_jax.json)."""
    d = config.data
    size = d.img_size if isinstance(d.img_size, int) else list(d.img_size)
    distilling = config.distillation.kind != "none"
    return {
        "data": {
            "name": d.name,
            "train_split": d.train_split,
            "eval_split": d.eval_split,
            "extra_eval": d.get("extra_eval", ""),
            "img_size": size,
            "crop_pct": d.crop_pct,
            "interpolation": "bicubic",  # the eval transform's (augment.eval_preprocess)
            "mean": list(config.augment.mean),
            "std": list(config.augment.std),
            "class_names": list(info.class_names) if info.class_names else None,
        },
        "recipe": {
            "num_epochs": config.num_epochs,
            "batch_size": config.batch_size,
            "optimizer": config.optim.name,
            "lr": config.optim.lr,
            "loss": config.loss,
            "distillation": config.distillation.kind,
            "alpha": config.distillation.alpha if distilling else None,
            "tau": config.distillation.tau if config.distillation.kind == "soft" else None,
            "teacher": config.teacher.name if distilling else None,
            "teacher_checkpoint": config.teacher.checkpoint if distilling else None,
        },
        "config": json.loads(config.to_json_best_effort()),
    }


def _export(
    workdir: str,
    config: ml_collections.ConfigDict,
    state: steps.TrainState,
    info: data.DatasetInfo,
) -> None:
    """Final weights as a deit_jax weights directory (usable as a teacher or with init_from)."""
    path = os.path.join(workdir, "weights")
    if os.path.exists(path):
        return
    # Inference weights: the student alone, without feature distillation's projection.
    params = feature_distillation.student_params(state.params)
    variables = {"params": params, **state.model_state}
    overrides = student_overrides(config, info.num_classes)
    checkpoint.save_variables(
        path,
        variables,
        model_name=config.model_name,
        model_overrides=overrides,
        extra_metadata=run_metadata(config, info),
    )
    log.info("Exported final weights to %s", path)


def evaluate(
    config: ml_collections.ConfigDict, workdir: str, devices: list[jax.Device] | None = None
) -> dict[str, float]:
    """Evaluates the latest checkpoint in `workdir`, else the weights in `config.init_from`."""
    _check_config(config, devices)
    info = data.dataset_info(config)
    mesh = sharding.create_mesh(config.mesh, devices)
    model = build_student(config, info.num_classes)
    teacher, teacher_variables = build_teacher(config, info.num_classes, os.path.abspath(workdir))
    projection = _projection(config, model, teacher)
    eval_data = data.build_eval(config, mesh, data_axes=sharding.DATA_AXES)
    tx, _ = optim.create_optimizer(
        config.optim,
        global_batch_size=config.batch_size,
        steps_per_epoch=1,
        num_epochs=max(config.num_epochs, 1),
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_rules(mesh)):
        init, abstract, _ = _state_and_shardings(config, model, tx, mesh, projection)
        checkpointer = checkpoint.TrainCheckpointer(
            os.path.join(os.path.abspath(workdir), "checkpoints"),
            save_every_steps=1,
            keep=config.keep_checkpoints,
            best_metric=_best_metric(info, teacher),
        )
        restored = checkpointer.restore(abstract, delete_unreadable=False)
        checkpointer.close()
        if restored is not None:
            step, state, _ = restored
            params, model_state, ema = state.params, state.model_state, state.ema_params
            log.info("Evaluating checkpoint step %d of %s", step, workdir)
        elif config.init_from:
            variables = dict(load_weights(config.init_from, config.model_name)[0])
            params, model_state, ema = variables.pop("params"), variables, {}
        else:
            raise WeightsNotFoundError(
                f"Nothing to evaluate: no checkpoint in {workdir!r}/checkpoints and no "
                "--config.init_from weights."
            )
        eval_step = _eval_step(config, model, teacher, info)
        teacher_variables = jax.device_put(teacher_variables, sharding.replicated(mesh))
        args = (params, model_state, ema, teacher_variables)
        metrics = _eval_loop(eval_step, eval_data, args)
        extra = _eval_extra(
            data.build_extra_evals(config, mesh, sharding.DATA_AXES, num_classes=info.num_classes),
            eval_step,
            args,
        )
    print(_format_eval(-1, metrics).replace("step -1", "evaluation"))
    for prefix, values in extra.items():
        print(_format_eval(-1, values).replace("eval @ step -1", f"{prefix} evaluation"))
    return metrics | {f"{p}/{k}": v for p, values in extra.items() for k, v in values.items()}
