"""What a run learns, beside the loop that trains it (`deit_jax.train.loop`) and the job that
evaluates it (`deit_jax.train.evaluation`): one factory, `build_task`, for every consumer.

Which task a run is, is decided once, on the config floor (`deit_jax.config.tasks.task_of`);
here each task name gets the class that builds the run's data, student, teacher and steps,
evaluates it and writes its results. The loop (mesh, optimiser, checkpoints, resume, logging,
preemption) and the eval job are the same for all:

- `classifier`: `deit_jax.train.classifier.ClassifierTask`;
- `clip_student`: `deit_jax.train.clip_student.ClipStudentTask`.

Adding a task: docs/training.md#adding-a-task.
"""

from __future__ import annotations

from typing import Any, Protocol

import ml_collections
import optax

from deit_jax import data
from deit_jax.config import tasks
from deit_jax.train.classifier import ClassifierTask
from deit_jax.train.clip_student import ClipStudentTask

Metrics = dict[str, float]


class Task(Protocol):
    """What the loop, the eval job and the plan ask of a task. Built for evaluation or a plan it
    has no `train_data`; for a plan its variables are shapes and it has no eval data."""

    train_data: data.TrainIterator | None
    model: Any
    teacher: Any
    teacher_variables: Any  # replicated over the mesh
    projection: Any  # feature distillation's, else None
    best: str | None  # the eval metric that ranks checkpoints (higher is better)
    shown: tuple[str, ...]  # the metrics an eval line shows in percent (substrings of names)

    def start(self, start_step: int, total_steps: int) -> None:
        """Before the first step (of this process's run): checks and attachments."""

    def train_step(self, tx: optax.GradientTransformation, schedule: optax.Schedule) -> Any:
        """The pure train step, `(state, teacher_variables, batch) -> (state, metrics)`."""

    def batch_shapes(self, batch: int) -> dict[str, Any]:
        """A global train batch of `batch` examples as `jax.ShapeDtypeStruct`s (a plan)."""

    def planned_eval(self, state: Any, batch: int) -> tuple[Any, tuple]:
        """The main eval step (jitted) and its arguments as shapes, for a batch of `batch`."""

    def evaluate(self, state: Any) -> tuple[Metrics, dict[str, Metrics]]:
        """The main eval set's metrics and each extra set's, by prefix. `state`: a train state,
        or any object with its `params`, `model_state` and `ema_params`."""

    def write_results(self, workdir: str, params: Any, final: Metrics, extra: dict) -> None:
        """The results table of the final metrics (`results.csv`, ...) in `workdir`."""

    def finish(self, workdir: str, state: Any, final: Metrics, extra: dict) -> None:
        """The finished run's weights and results table."""


TASKS: dict[str, type] = {
    tasks.CLASSIFIER: ClassifierTask,
    tasks.CLIP_STUDENT: ClipStudentTask,
}


def build_task(
    config: ml_collections.ConfigDict, workdir: str, mesh, *, purpose: str = tasks.TRAIN
) -> Task:
    """The task `config` names (`deit_jax.config.tasks.task_of`), built on `mesh` for
    `purpose`: `tasks.TRAIN`, `tasks.EVAL` (no training stream) or `tasks.PLAN` (shapes only, no
    file read); `workdir` keeps what its teacher saves (a CLIP teacher's zero-shot head)."""
    return TASKS[tasks.task_of(config).name](config, workdir, mesh, purpose=purpose)
