"""The `classifier` task (`deit_jax.config.tasks`): a classifier (DeiT, any registry model) on
labelled or label-free images, with or without a teacher (logits, features, an ensemble, a
teacher cache), its jitted eval steps and its passes over the eval sets.

Evaluation reports top-1/top-5 (ReaL where the set has real labels, on the scored classes of
ImageNet-A and -R), and with a teacher its top-1, the agreement and the teacher-student KL; a
label-free set reports only the KL and the agreement. The results table is timm's
(`deit_jax.train.results`).
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from deit_jax import data, sharding
from deit_jax.config.tasks import EVAL, PLAN, TRAIN
from deit_jax.jit import jit
from deit_jax.models import feature_width
from deit_jax.teacher.build import build_teacher
from deit_jax.teacher.cache import store as cache_store
from deit_jax.teacher.cache.mix import open_reader
from deit_jax.teacher.cache.read import cached_shapes
from deit_jax.teacher.flax_teacher import build_flax_teacher
from deit_jax.train import steps
from deit_jax.train.projection import projection_for
from deit_jax.train.results import write_run_results
from deit_jax.train.run_weights import save_run_weights
from deit_jax.train.state import build_student

log = logging.getLogger(__name__)
Metrics = dict[str, float]


class ClassifierTask:
    """A classifier, its teacher (live or cached) and its eval sets (see the module doc).

    Built for `purpose` (`deit_jax.config.tasks`): training; evaluation (no training stream, no
    cache reader); or a plan (shapes only: no data, weights or cache read; `batch_shapes`)."""

    shown = ("top1", "agreement")  # the metrics an eval line shows, in percent

    def __init__(
        self, config: ml_collections.ConfigDict, workdir: str, mesh, *, purpose: str = TRAIN
    ) -> None:
        shapes = purpose == PLAN
        self.config = config = config if purpose == EVAL else without_smoothing_for_bce(config)
        if shapes:
            self.info = info = data.planned_info(config, config.plan.num_examples)
        else:
            self.info = info = data.dataset_info(config)
        self.train_data = self.reader = None
        if purpose == TRAIN:
            self.train_data = data.build_train(config, mesh, data_axes=sharding.DATA_AXES)
            # Before a model is built or a weight read: a cache of another stream is refused.
            self.reader = open_reader(config, self.train_data)
        self.model = build_student(config, info.num_classes)
        self.teacher, teacher_variables = build_teacher(
            config, info.num_classes, workdir, shapes=shapes
        )
        self.teacher_variables = sharding.replicate(teacher_variables, mesh)
        self.cache_width = _cache_width(config, info.num_classes, shapes)
        self.projection = projection_for(config, self.model, self.teacher, self.cache_width)
        self.eval_data, self.extra_evals = None, []
        if not shapes:
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

    # ------------------------------------------------------------------ a plan's shapes

    def batch_shapes(self, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
        """A global train batch of `batch` images as the pipeline (and the cache reader) give
        it: `{"image", "target", "label"}` (+ the cached teacher's outputs)."""
        h, w, c = self.info.image_shape
        shapes = {
            "image": jax.ShapeDtypeStruct((batch, h, w, c), jnp.float32),
            "target": jax.ShapeDtypeStruct((batch, self.info.num_classes), jnp.float32),
            "label": jax.ShapeDtypeStruct((batch,), jnp.int32),
        }
        if self.config.teacher.cache:
            shapes |= cached_shapes(self.config, batch, self.info.num_classes, self.cache_width)
        return shapes

    def planned_eval(self, state: Any, batch: int) -> tuple[Any, tuple]:
        """The main eval set's jitted step and its arguments, as shapes."""
        h, w, c = self.info.image_shape
        shapes = {
            "image": jax.ShapeDtypeStruct((batch, h, w, c), jnp.float32),
            "label": jax.ShapeDtypeStruct((batch,), jnp.int32),
            "mask": jax.ShapeDtypeStruct((batch,), jnp.bool_),
        }
        args = state.params, state.model_state, state.ema_params, self.teacher_variables
        return self.eval_steps(None, self.info.labelled), (*args, shapes)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, state: Any) -> tuple[Metrics, dict[str, Metrics]]:
        args = state.params, state.model_state, state.ema_params, self.teacher_variables
        metrics = eval_loop(self.eval_steps, self.eval_data, args)
        extra = {p: eval_loop(self.eval_steps, passes, args) for p, passes in self.extra_evals}
        return metrics, extra

    def write_results(self, workdir: str, params: Any, final: Metrics, extra: dict) -> None:
        write_run_results(
            workdir, self.config, params, self.info.num_classes,
            (self.eval_data, final), self.extra_evals, extra,
        )  # fmt: skip

    def finish(self, workdir: str, state: Any, final: Metrics, extra: dict) -> None:
        save_run_weights(workdir, self.config, state, self.info)
        if jax.process_index() == 0:
            self.write_results(workdir, state.params, final, extra)


def _cache_width(config: ml_collections.ConfigDict, num_classes: int, shapes: bool) -> int:
    """The width of the embeddings a feature-distillation cache holds: the cache's, or for a
    plan (no cache read) that of the registry teacher the cache would hold."""
    if config.distillation.kind != "feature" or not config.teacher.cache:
        return 0
    if shapes:
        return feature_width(build_flax_teacher(config, num_classes, shapes=True)[0])
    return cache_store.embedding_dim(config.teacher.cache)


def without_smoothing_for_bce(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
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


# --------------------------------------------------------------------------- evaluation


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


def eval_loop(eval_steps: EvalSteps, eval_data, args) -> Metrics:
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
