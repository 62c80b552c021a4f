"""Evaluation: the jitted eval step of a run (student, heads, EMA, teacher, agreement, KL), its
passes over the eval sets, and the `--config.mode=eval` job.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from deit_jax import data, sharding
from deit_jax.errors import WeightsNotFoundError
from deit_jax.jit import jit
from deit_jax.teacher.build import build_teacher
from deit_jax.train import optim, steps
from deit_jax.train.checkpoint import TrainCheckpointer
from deit_jax.train.results import write_run_results
from deit_jax.train.state import (
    build_student,
    check_config,
    projection_for,
    state_and_shardings,
)
from deit_jax.weights.load import load_weights

log = logging.getLogger(__name__)


def _eval_teacher(teacher: nn.Module | None, num_classes: int) -> nn.Module | None:
    """The teacher for the eval metrics (teacher top-1, agreement): only if it predicts the
    data's classes (a feature-distillation teacher may not)."""
    if teacher is None or getattr(teacher, "num_classes", num_classes) != num_classes:
        return None
    return teacher


class EvalSteps:
    """The run's jitted eval steps, one per kind of set (`eval_steps(classes, labelled)`): with
    a teacher also the teacher-student KL at the run's tau and reduction; only KL and agreement
    for a set without labels. A set that holds only some classes gets its own (compiled once), as
    does a labelled extra set of a label-free run (scored on its labels)."""

    def __init__(self, config, model, teacher, info: data.DatasetInfo):
        self._make = functools.partial(
            steps.make_eval_step,
            model,
            _eval_teacher(teacher, info.num_classes),
            tau=config.distillation.tau,
            kl_reduction=config.distillation.kl_reduction,
            tau_squared=config.distillation.tau_squared,
        )
        self._steps: dict[tuple[tuple[int, ...] | None, bool], Any] = {}

    def __call__(self, scored_classes: tuple[int, ...] | None = None, labelled: bool = True):
        key = (scored_classes, labelled)
        if key not in self._steps:
            self._steps[key] = jit(self._make(scored_classes=scored_classes, labelled=labelled))
        return self._steps[key]


def best_metric(info: data.DatasetInfo, teacher: nn.Module | None) -> str | None:
    """What ranks checkpoints: top-1, or without labels the agreement with the teacher."""
    if info.labelled:
        return "top1"
    return "agreement" if _eval_teacher(teacher, info.num_classes) is not None else None


def eval_loop(eval_steps: EvalSteps, eval_data, args) -> dict[str, float]:
    """One pass over `eval_data`: its metrics (sums over the examples, divided by the count)."""
    scored = getattr(eval_data, "scored_classes", None)
    eval_step = eval_steps(scored, eval_data.source.labelled)
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
    return (
        out
        | {"count": count}
        | ({} if real is None else {"real_count": real})
        | ({} if scored is None else {"scored_classes": float(len(scored))})
    )


def eval_extra(extra_evals, eval_steps: EvalSteps, args) -> dict[str, dict[str, float]]:
    """Metrics of each extra eval set (`config.data.extra_eval`), by prefix."""
    return {prefix: eval_loop(eval_steps, passes, args) for prefix, passes in extra_evals}


def format_eval(step: int, metrics: dict[str, float]) -> str:
    shown = ("top1", "agreement", "_r1", "mean_recall")
    parts = [f"{k} {100 * v:.2f}" for k, v in metrics.items() if any(s in k for s in shown)]
    values = [f"{k} {metrics[k]:.4f}" for k in ("loss", "kl") if k in metrics]
    return (
        f"eval @ step {step}: " + ", ".join(parts) + (f" ({', '.join(values)})" if values else "")
    )


def evaluate(
    config: ml_collections.ConfigDict, workdir: str, devices: list[jax.Device] | None = None
) -> dict[str, float]:
    """Evaluates the latest checkpoint in `workdir`, else the weights in `config.init_from`."""
    check_config(config, devices)
    info = data.dataset_info(config)
    mesh = sharding.create_mesh(config.mesh, devices)
    model = build_student(config, info.num_classes)
    teacher, teacher_variables = build_teacher(config, info.num_classes, os.path.abspath(workdir))
    projection = projection_for(config, model, teacher)
    eval_data = data.build_eval(config, mesh, data_axes=sharding.DATA_AXES)
    tx, _ = optim.create_optimizer(
        config.optim,
        global_batch_size=config.batch_size,
        steps_per_epoch=1,
        num_epochs=max(config.num_epochs, 1),
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_rules(mesh)):
        init, abstract, _ = state_and_shardings(config, model, tx, mesh, projection)
        checkpointer = TrainCheckpointer(
            os.path.join(os.path.abspath(workdir), "checkpoints"),
            save_every_steps=1,
            keep=config.keep_checkpoints,
            best_metric=best_metric(info, teacher),
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
        eval_steps = EvalSteps(config, model, teacher, info)
        teacher_variables = jax.device_put(teacher_variables, sharding.replicated(mesh))
        args = (params, model_state, ema, teacher_variables)
        metrics = eval_loop(eval_steps, eval_data, args)
        extra_evals = data.build_extra_evals(
            config, mesh, sharding.DATA_AXES, num_classes=info.num_classes
        )
        extra = eval_extra(extra_evals, eval_steps, args)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        write_run_results(
            workdir, config, params, info.num_classes, (eval_data, metrics), extra_evals, extra
        )
    print(format_eval(-1, metrics).replace("step -1", "evaluation"))
    for prefix, values in extra.items():
        print(format_eval(-1, values).replace("eval @ step -1", f"{prefix} evaluation"))
    return metrics | {f"{p}/{k}": v for p, values in extra.items() for k, v in values.items()}
