"""A finished run's weights: the student alone, as a deit_jax weights directory
(`WORKDIR/weights`), with the run's data, eval preprocessing and recipe recorded beside them, which
`deit_jax.export` turns into a timm / Hub folder and which serve as a teacher or `init_from`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import ml_collections

from deit_jax import data
from deit_jax.train.projection import student_params
from deit_jax.train.state import TrainState, student_overrides
from deit_jax.weights.directory import save_variables

log = logging.getLogger(__name__)


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
            "extra_eval": d.extra_eval,
            "img_size": size,
            "crop_pct": d.crop_pct,
            "interpolation": d.eval_interpolation,  # the eval transform's
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


def save_run_weights(
    workdir: str,
    config: ml_collections.ConfigDict,
    state: TrainState,
    info: data.DatasetInfo,
) -> None:
    """Final weights as a deit_jax weights directory (usable as a teacher or with init_from)."""
    path = os.path.join(workdir, "weights")
    if os.path.exists(path):
        return
    # Inference weights: the student alone, without feature distillation's projection.
    params = student_params(state.params)
    variables = {"params": params, **state.model_state}
    overrides = student_overrides(config, info.num_classes)
    save_variables(
        path,
        variables,
        model_name=config.model_name,
        model_overrides=overrides,
        extra_metadata=run_metadata(config, info),
    )
    log.info("Exported final weights to %s", path)
