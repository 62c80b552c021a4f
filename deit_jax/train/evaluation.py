"""The `--config.mode=eval` job and the eval lines every run prints.

`evaluate(config, workdir)` evaluates a finished (or interrupted) run of any task: it builds the
run's task without its training stream (`deit_jax.train.tasks.build_task(..., training=False)`),
restores the latest checkpoint in `workdir` (else reads `config.init_from`'s weights), runs the
task's evaluation (a classifier: top-1 and its kin on the eval split and `data.extra_eval`; a
CLIP student: held-out recall and KL, zero-shot top-1 on `data.extra_eval`) and writes the
task's results table (`results.csv`, `results.md`) in `workdir`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from deit_jax import sharding
from deit_jax.config.tasks import EVAL
from deit_jax.errors import WeightsNotFoundError
from deit_jax.train import optim
from deit_jax.train.checkpoint import TrainCheckpointer
from deit_jax.train.state import check_config, state_and_shardings
from deit_jax.train.tasks import build_task
from deit_jax.weights.load import load_weights

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Weights:
    """What a task evaluates: a train state's `params`, `model_state` and `ema_params`."""

    params: Any
    model_state: Any
    ema_params: Any


def format_eval(step: int, metrics: dict[str, float], shown: tuple[str, ...]) -> str:
    """One eval line: the metrics whose names hold one of `shown` (the task's) in percent,
    then the loss and the KL."""
    parts = [f"{k} {100 * v:.2f}" for k, v in metrics.items() if any(s in k for s in shown)]
    values = [f"{k} {metrics[k]:.4f}" for k in ("loss", "kl") if k in metrics]
    return (
        f"eval @ step {step}: " + ", ".join(parts) + (f" ({', '.join(values)})" if values else "")
    )


def evaluate(
    config: ml_collections.ConfigDict, workdir: str, devices: list[jax.Device] | None = None
) -> dict[str, float]:
    """Evaluates the latest checkpoint in `workdir`, else the weights in `config.init_from`;
    returns the main set's metrics and each extra set's as `prefix/name`."""
    check_config(config, devices)
    workdir = os.path.abspath(workdir)
    mesh = sharding.create_mesh(config.mesh, devices)
    task = build_task(config, workdir, mesh, purpose=EVAL)
    tx, _ = optim.create_optimizer(
        config.optim,
        global_batch_size=config.batch_size,
        steps_per_epoch=1,
        num_epochs=max(config.num_epochs, 1),
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_rules(mesh)):
        _, abstract, _ = state_and_shardings(config, task.model, tx, mesh, task.projection)
        checkpointer = TrainCheckpointer(
            os.path.join(workdir, "checkpoints"),
            save_every_steps=1,
            keep=config.keep_checkpoints,
            best_metric=task.best,
        )
        restored = checkpointer.restore(abstract, delete_unreadable=False)
        checkpointer.close()
        if restored is not None:
            step, state, _ = restored
            weights = Weights(state.params, state.model_state, state.ema_params)
            log.info("Evaluating checkpoint step %d of %s", step, workdir)
        elif config.init_from:
            variables = dict(load_weights(config.init_from, config.model_name)[0])
            weights = Weights(variables.pop("params"), variables, {})
        else:
            raise WeightsNotFoundError(
                f"Nothing to evaluate: no checkpoint in {workdir!r}/checkpoints and no "
                "--config.init_from weights."
            )
        metrics, extra = task.evaluate(weights)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        task.write_results(workdir, weights.params, metrics, extra)
    print(format_eval(-1, metrics, task.shown).replace("step -1", "evaluation"))
    for prefix, values in extra.items():
        line = format_eval(-1, values, task.shown)
        print(line.replace("eval @ step -1", f"{prefix} evaluation"))
    return metrics | {f"{p}/{k}": v for p, values in extra.items() for k, v in values.items()}
