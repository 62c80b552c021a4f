"""What a training run learns, beside the loop that trains it (`deit_jax.train.loop`).

A task builds a run's data, student, teacher and steps, evaluates it and writes its results;
the loop (mesh, optimiser, checkpoints, resume, logging, preemption) is the same for all:

- `ClassificationTask`: a classifier (DeiT, ...) on labelled or label-free images, with or
  without a teacher (logits, features, a teacher cache);
- `deit_jax.train.pairs.PairTask`: a CLIP student on image-caption pairs (`captions:` data).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import jax
import ml_collections
import optax

from deit_jax import data, sharding
from deit_jax.data.labels import is_caption_data
from deit_jax.teacher.build import build_teacher
from deit_jax.teacher.cache.mix import open_reader
from deit_jax.train import steps
from deit_jax.train.evaluation import EvalSteps, best_metric, eval_extra, eval_loop
from deit_jax.train.results import write_run_results
from deit_jax.train.run_weights import save_run_weights
from deit_jax.train.state import TrainState, build_student, projection_for

log = logging.getLogger(__name__)
Metrics = dict[str, float]


class Task(Protocol):
    train_data: data.TrainIterator
    model: Any
    teacher: Any
    teacher_variables: Any  # replicated over the mesh
    projection: Any  # feature distillation's, else None
    best: str | None  # the eval metric that ranks checkpoints (higher is better)

    def start(self, start_step: int, total_steps: int) -> None:
        """Before the first step (of this process's run): checks and attachments."""

    def train_step(self, tx: optax.GradientTransformation, schedule: optax.Schedule) -> Any:
        """The pure train step, `(state, teacher_variables, batch) -> (state, metrics)`."""

    def evaluate(self, state: TrainState) -> tuple[Metrics, dict[str, Metrics]]:
        """The main eval set's metrics and each extra set's, by prefix."""

    def finish(self, workdir: str, state: TrainState, final: Metrics, extra: dict) -> None:
        """The finished run's weights and results table."""


def build_task(config: ml_collections.ConfigDict, workdir: str, mesh) -> Task:
    """The task `config` names: image-caption data trains a CLIP student, any other a
    classifier."""
    if is_caption_data(config.data.name):
        from deit_jax.train.pairs import PairTask  # its module imports the CLIP tokenizers

        return PairTask(config, workdir, mesh)
    return ClassificationTask(config, workdir, mesh)


class ClassificationTask:
    """A classifier, its teacher (live or cached) and its eval sets (see the module doc)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh) -> None:
        self.config = config
        self.info = info = data.dataset_info(config)
        self.train_data = data.build_train(config, mesh, data_axes=sharding.DATA_AXES)
        # Before a model is built or a weight read: a cache of another stream is refused now.
        self.reader = open_reader(config, self.train_data)
        self.model = build_student(config, info.num_classes)
        self.teacher, teacher_variables = build_teacher(config, info.num_classes, workdir)
        self.teacher_variables = jax.device_put(teacher_variables, sharding.replicated(mesh))
        self.projection = projection_for(config, self.model, self.teacher)
        self.eval_data = data.build_eval(config, mesh, data_axes=sharding.DATA_AXES)
        self.extra_evals = data.build_extra_evals(
            config, mesh, sharding.DATA_AXES, num_classes=info.num_classes
        )
        self.best = best_metric(info, self.teacher)
        self.eval_steps = EvalSteps(config, self.model, self.teacher, info)

    def start(self, start_step: int, total_steps: int) -> None:
        if self.reader is None:
            return
        self.reader.check_coverage(start_step, total_steps)
        self.train_data.extras = self.reader
        log.info("Teacher outputs from the cache %s", self.reader)
        if self.teacher is None:
            log.info(
                "Evaluation skips teacher accuracy and agreement: no teacher checkpoint "
                "(set --config.teacher.checkpoint as well to report them)."
            )

    def train_step(self, tx, schedule):
        return steps.make_train_step(
            self.model, tx, schedule, self.config, self.teacher, self.projection
        )

    def evaluate(self, state: TrainState) -> tuple[Metrics, dict[str, Metrics]]:
        args = state.params, state.model_state, state.ema_params, self.teacher_variables
        metrics = eval_loop(self.eval_steps, self.eval_data, args)
        return metrics, eval_extra(self.extra_evals, self.eval_steps, args)

    def finish(self, workdir: str, state: TrainState, final: Metrics, extra: dict) -> None:
        save_run_weights(workdir, self.config, state, self.info)
        if jax.process_index() == 0:
            write_run_results(
                workdir, self.config, state.params, self.info.num_classes,
                (self.eval_data, final), self.extra_evals, extra,
            )  # fmt: skip
