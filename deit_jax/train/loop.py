"""The training loop: mesh, models, data, one jitted train step, periodic eval and checkpoints.

What the run learns (its data, student, teacher, steps and evaluation) is its task
(`deit_jax.train.tasks`: a classifier, or a CLIP student on image-caption pairs); the loop is the
same for every task.

`train_and_evaluate(config, workdir)` resumes from the latest good checkpoint in `workdir`
(params, optimiser state, EMA, step, RNG and data-iterator position), so starting the same
command again after a crash or a preemption continues where it stopped.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import flax.linen as nn
import jax
import ml_collections
from tqdm import tqdm

from deit_jax import sharding
from deit_jax.config import tasks
from deit_jax.errors import Preempted, UserError
from deit_jax.jit import jit
from deit_jax.train import optim
from deit_jax.train.checkpoint import TrainCheckpointer
from deit_jax.train.evaluation import format_eval
from deit_jax.train.metrics import MetricsWriter
from deit_jax.train.state import (
    TrainState,
    check_config,
    initial_params,
    state_and_shardings,
)
from deit_jax.train.tasks import build_task

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError, RuntimeError):
    """Training produced a NaN/inf loss or gradient; the last good checkpoint is kept."""


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, devices: list[jax.Device] | None = None
) -> dict[str, float]:
    """Trains (resuming if `workdir` holds checkpoints); returns the final eval metrics.

    On SIGTERM it saves a checkpoint and raises `Preempted`.

    `devices` (default: all) are the devices the mesh is built over.
    """
    check_config(config, devices)
    workdir = os.path.abspath(workdir)
    mesh = sharding.create_mesh(config.mesh, devices)
    task = build_task(config, workdir, mesh)
    train_data, model = task.train_data, task.model
    steps_per_epoch = train_data.steps_per_epoch
    total_steps = optim.total_steps(config.num_epochs, steps_per_epoch)
    eval_every = max(1, int(round(config.eval_every_epochs * steps_per_epoch)))
    tx, schedule = optim.create_optimizer(
        tasks.optimizer_config(config),
        global_batch_size=config.batch_size,
        steps_per_epoch=steps_per_epoch,
        num_epochs=config.num_epochs,
    )

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_rules(mesh)):
        init, abstract, state_shardings = state_and_shardings(
            config, model, tx, mesh, task.projection
        )
        checkpointer = TrainCheckpointer(
            os.path.join(workdir, "checkpoints"),
            save_every_steps=config.checkpoint_every_steps,
            keep=config.keep_checkpoints,
            best_metric=task.best,
        )
        restored = checkpointer.restore(abstract)
        if restored is not None:
            start_step, state, data_state = restored
            train_data.set_state(data_state)
            log.info("Resumed from step %d in %s", start_step, checkpointer.directory)
        else:
            start_step, state = 0, init()
            params = initial_params(config, state.params, model)
            if params is not None:
                state = state.replace(
                    params=jax.device_put(params, state_shardings.params),
                    ema_params=jax.device_put(params, state_shardings.params)
                    if state.ema_params
                    else {},
                )

        task.start(start_step, total_steps)
        train_step = jit(
            task.train_step(tx, schedule),
            out_shardings=(state_shardings, sharding.replicated(mesh)),
            donate_argnums=(0,),
        )
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
        extra: dict[str, dict[str, float]] = {}
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
                state, metrics = train_step(state, task.teacher_variables, next(train_data))
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
                    eval_metrics, extra = task.evaluate(state)
                    writer.write(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
                    for prefix, values in extra.items():
                        writer.write(step, {f"{prefix}/{k}": v for k, v in values.items()})
                    if jax.process_index() == 0:  # tqdm.write prints even when disabled
                        progress.write(format_eval(step, eval_metrics, task.shown))
                        for prefix, values in extra.items():
                            line = format_eval(step, values, task.shown)
                            progress.write(line.replace("eval", prefix, 1))
                if evaluated or checkpointer.should_save(step) or stop["signal"]:
                    _check_finite(state, step)
                    checkpointer.save(
                        step,
                        state,
                        data_state=train_data.get_state(),
                        metrics={task.best: eval_metrics[task.best]}
                        if evaluated and task.best
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
        if not eval_metrics and start_step >= total_steps:
            eval_metrics, extra = task.evaluate(state)
        task.finish(workdir, state, eval_metrics, extra)
        return eval_metrics


def _check_finite(state: TrainState, step: int) -> None:
    nan_step = int(jax.device_get(state.nan_step))
    if nan_step >= 0:
        raise NonFiniteLossError(
            f"Non-finite loss or gradients at step {nan_step + 1} (detected by step {step}); "
            "that update was not applied and no checkpoint was written after it. Lower the "
            "learning rate (--config.optim.lr), enable clipping (--config.optim.clip_grad_norm=1) "
            "or use float32, then rerun: training resumes from the last good checkpoint."
        )
