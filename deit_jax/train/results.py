"""A run's results table: `results.csv` and `results.md` in the workdir, one row an eval set.

Written at the end of training and by `--config.mode=eval`. A classifier's columns are those of
timm's results files (`results/results-imagenet*.csv`: model, top1, top1_err, top5, top5_err,
param_count in millions, img_size, crop_pct, interpolation), so a row compares with timm's row of
the same model, plus the set, the number of classes scored (200 on ImageNet-A and -R,
deit_jax/data/class_subsets.py) and, where the run has a teacher, its top-1 and the agreement.
"""

from __future__ import annotations

import csv
import os
from typing import Any

import jax
import ml_collections

from deit_jax.train.projection import student_params

COLUMNS = (
    "set",
    "model",
    "top1",
    "top1_err",
    "top5",
    "top5_err",
    "param_count",
    "img_size",
    "crop_pct",
    "interpolation",
    "classes",
)
TEACHER_COLUMNS = ("teacher_top1", "agreement")


def percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.3f}"


def rows(
    config: ml_collections.ConfigDict,
    sets: list[tuple[str, dict[str, float]]],
    *,
    param_count: int,
    num_classes: int,
) -> list[dict[str, str]]:
    """One row a set: `sets` holds (set name, its final eval metrics as fractions)."""
    size = config.data.img_size
    out = []
    for name, metrics in sets:
        top1, top5 = metrics.get("top1"), metrics.get("top5")
        row = {
            "set": name,
            "model": config.model_name,
            "top1": percent(top1),
            "top1_err": percent(None if top1 is None else 1 - top1),
            "top5": percent(top5),
            "top5_err": percent(None if top5 is None else 1 - top5),
            "param_count": f"{param_count / 1e6:.2f}",
            "img_size": str(size) if isinstance(size, int) else "x".join(map(str, size)),
            "crop_pct": f"{config.data.crop_pct:.3f}",
            "interpolation": config.data.eval_interpolation,
            "classes": str(int(metrics.get("scored_classes", num_classes))),
        }
        if "agreement" in metrics:
            row["teacher_top1"] = percent(metrics.get("teacher_top1"))
            row["agreement"] = percent(metrics["agreement"])
        out.append(row)
    return out


def write_results(
    workdir: str, table: list[dict[str, str]], columns: tuple[str, ...] | None = None
) -> None:
    """`results.csv` and `results.md` of `table` in `workdir`: a row a set, in `columns` (by
    default a classifier's: timm's, from `rows`, and the teacher's where the rows have them)."""
    if columns is None:
        columns = (*COLUMNS, *(c for c in TEACHER_COLUMNS if any(c in r for r in table)))
    with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, columns, restval="")
        writer.writeheader()
        writer.writerows(table)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r.get(c, "") for c in columns) + " |" for r in table]
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def set_name(eval_data: Any) -> str:
    """An eval pipeline's set as `config.data.extra_eval` writes it: `name:split`."""
    data = eval_data.config.data
    return f"{data.name}:{data.eval_split}"


def write_run_results(
    workdir: str,
    config: ml_collections.ConfigDict,
    params: Any,
    num_classes: int,
    main: tuple[Any, dict[str, float]],
    extras: list[tuple[str, Any]],
    extra_metrics: dict[str, dict[str, float]],
) -> None:
    """The table of a run's final metrics: the main eval set, then each extra set (by prefix).
    `params`: the train state's (the student's, feature distillation's projection left out)."""
    sets = [(set_name(main[0]), main[1])]
    sets += [(set_name(passes), extra_metrics[p]) for p, passes in extras if p in extra_metrics]
    count = sum(x.size for x in jax.tree.leaves(student_params(params)))
    write_results(workdir, rows(config, sets, param_count=count, num_classes=num_classes))
