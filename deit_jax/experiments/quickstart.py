"""The quickstart experiment (`mode=quickstart`): does distillation from a convnet help a DeiT?

For each seed, four runs of the ordinary training loop (`deit_jax.train.loop`), each in its own
subdirectory of the workdir, so an interrupted quickstart resumes where it stopped (the DeiT
paper's distillation ablation: no distillation, usual distillation, distillation token):

  1. `seed<S>/teacher`:   the convnet teacher (`config.quickstart.teacher.*`), labels only, its
                          own crop scale and no mixup/cutmix (trained with its own recipe);
  2. `seed<S>/baseline`:  the student without distillation (`config.quickstart.baseline_model`,
                          the same architecture without the distillation token), labels only;
  3. `seed<S>/usual`:     the student of step 2 with `config.distillation` from the teacher of
                          step 1 through its only (class) head: "usual distillation";
  4. `seed<S>/distilled`: the distilled student (`config.model_name`) with `config.distillation`
                          from the teacher of step 1.

Every student gets the same data, augmentation, schedule and number of steps. The results go to
`results.md`, `results.json` and `results.png` (test accuracy curves) in the workdir.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from deit_jax.train.loop import train_and_evaluate
from deit_jax.train.metrics import read_jsonl

log = logging.getLogger(__name__)

# (row label, run, eval metric); the distilled student's `top1` is its class+dist average.
ROWS = (
    ("teacher", "teacher", "top1"),
    ("student, no distillation", "baseline", "top1"),
    ("student, usual distillation (class head)", "usual", "top1"),
    ("distilled student: class head", "distilled", "cls_top1"),
    ("distilled student: distillation head", "distilled", "dist_top1"),
    ("distilled student: average of heads", "distilled", "top1"),
)
GAIN_ROW = "gain: distilled (average) - no distillation"
USUAL_GAIN_ROW = "gain: usual distillation - no distillation"


def stage_configs(config: ml_collections.ConfigDict, seed: int) -> dict[str, Any]:
    """The teacher, baseline, usual and distilled configs of one seed (the teacher's checkpoint
    path is filled in by `run`)."""
    qs = config.quickstart
    student = config.copy_and_resolve_references()
    student.mode = "train"
    student.seed = seed

    teacher = student.copy_and_resolve_references()
    teacher.model_name = qs.teacher.model_name
    with teacher.unlocked():
        teacher.model = ml_collections.ConfigDict({"num_classes": None})
    teacher.distillation.kind = "none"
    # The teacher learns from clean labels (a convnet trained with its own recipe, as in DeiT);
    # the students' mixup and cutmix stay on the student side.
    teacher.mixup.mixup_alpha = 0.0
    teacher.mixup.cutmix_alpha = 0.0
    teacher.augment.scale = tuple(qs.teacher.scale)
    teacher.data.img_size = qs.teacher.img_size
    teacher.num_epochs = qs.teacher.num_epochs
    teacher.optim.lr = qs.teacher.lr
    teacher.optim.warmup_epochs = qs.teacher.warmup_epochs
    teacher.eval_every_epochs = qs.teacher.num_epochs

    baseline = student.copy_and_resolve_references()
    baseline.model_name = qs.baseline_model
    baseline.distillation.kind = "none"
    usual = student.copy_and_resolve_references()
    usual.model_name = qs.baseline_model
    return {"teacher": teacher, "baseline": baseline, "usual": usual, "distilled": student}


def _curve(workdir: str, metric: str) -> list[tuple[float, float]]:
    """(epoch, eval metric) pairs from a run's metrics.jsonl."""
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    per_step = [r["train/epoch"] / r["step"] for r in records if "train/epoch" in r]
    epochs_per_step = per_step[-1] if per_step else 1.0
    return [
        (r["step"] * epochs_per_step, r[f"eval/{metric}"]) for r in records if f"eval/{metric}" in r
    ]


def curves(workdir: str, seeds: list[int]) -> dict[str, list[list[tuple[float, float]]]]:
    """Each table row's (epoch, test accuracy) curve for every seed, from the runs' JSONL."""
    return {
        label: [_curve(os.path.join(workdir, f"seed{seed}", name), metric) for seed in seeds]
        for label, name, metric in ROWS
    }


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs every seed's four stages and writes results.{md,json,png}; returns the results."""
    workdir = os.path.abspath(workdir)
    if not jax.config.jax_compilation_cache_dir:
        # Every seed compiles the same train and eval steps: compile them once.
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    seeds = list(config.quickstart.seeds)
    per_seed: dict[int, dict[str, dict[str, float]]] = {}
    minutes: dict[str, float] = {}
    for i, seed in enumerate(seeds):
        configs = stage_configs(config, seed)
        teacher_dir = os.path.join(workdir, f"seed{seed}", "teacher")
        for name in ("usual", "distilled"):
            configs[name].teacher.name = configs["teacher"].model_name
            configs[name].teacher.checkpoint = os.path.join(teacher_dir, "weights")
        per_seed[seed] = {}
        for name, stage_config in configs.items():
            run_dir = os.path.join(workdir, f"seed{seed}", name)
            log.info("Quickstart seed %d (%d/%d): %s in %s", seed, i + 1, len(seeds), name, run_dir)
            start = time.perf_counter()
            per_seed[seed][name] = train_and_evaluate(stage_config, run_dir)
            minutes[name] = minutes.get(name, 0.0) + (time.perf_counter() - start) / 60

    results = summarize(config, per_seed, minutes)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    table = format_results(results)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table + "\n")
    plot(curves(workdir, seeds), os.path.join(workdir, "results.png"), _title(config, len(seeds)))
    print(table)
    print(f"\nWrote results.md, results.json and results.png to {workdir}")
    return results


def summarize(
    config: ml_collections.ConfigDict,
    per_seed: dict[int, dict[str, dict[str, float]]],
    minutes: dict[str, float],
) -> dict[str, Any]:
    """Per-seed accuracies, their mean/std/range, and the distillation gain against the spread."""
    seeds = sorted(per_seed)
    rows = {}
    for label, name, metric in ROWS:
        values = [per_seed[s][name][metric] for s in seeds]
        rows[label] = _stats(values)
    gains = [per_seed[s]["distilled"]["top1"] - per_seed[s]["baseline"]["top1"] for s in seeds]
    rows[GAIN_ROW] = _stats(gains)
    usual = [per_seed[s]["usual"]["top1"] - per_seed[s]["baseline"]["top1"] for s in seeds]
    rows[USUAL_GAIN_ROW] = _stats(usual)
    baseline, distilled = rows[ROWS[1][0]], rows[ROWS[5][0]]
    spread = max(baseline["range"], distilled["range"])
    return {
        "seeds": seeds,
        "rows": rows,
        "gain": rows[GAIN_ROW]["mean"],
        "spread": spread,
        # The claim: the mean gain exceeds the larger range (max - min over seeds) of the two
        # students' accuracies, a stricter measure of spread than the standard deviation.
        "gain_exceeds_spread": bool(rows[GAIN_ROW]["mean"] > spread),
        "minutes": minutes,
        "student": config.model_name,
        "baseline": config.quickstart.baseline_model,
        "teacher": config.quickstart.teacher.model_name,
        "distillation": config.distillation.kind,
        "data": config.data.name,
    }


def _stats(values: list[float]) -> dict[str, Any]:
    array = np.asarray(values, dtype=np.float64)
    return {
        "values": [float(v) for v in array],
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
        "range": float(array.max() - array.min()),
    }


def format_results(results: dict[str, Any]) -> str:
    """The Markdown table: test top-1 (%) per seed, mean +- std and range."""
    seeds = results["seeds"]
    header = "| test top-1 (%) | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |"
    lines = [header, "|---" * (len(seeds) + 2) + "|"]
    for label, row in results["rows"].items():
        cells = [f"{100 * v:.2f}" for v in row["values"]]
        summary = f"**{100 * row['mean']:.2f} ± {100 * row['std']:.2f}**"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {summary} |")
    verdict = "exceeds" if results["gain_exceeds_spread"] else "does NOT exceed"
    lines.append("")
    lines.append(
        f"Distillation gain {100 * results['gain']:.2f} points {verdict} the spread between "
        f"seeds ({100 * results['spread']:.2f} points, the larger max-min range of the two "
        f"students). Student {results['student']} ({results['distillation']} distillation from "
        f"{results['teacher']}), baseline {results['baseline']}, data {results['data']}."
    )
    return "\n".join(lines)


def _title(config: ml_collections.ConfigDict, num_seeds: int) -> str:
    return (
        f"{config.data.name}: {config.distillation.kind} distillation from "
        f"{config.quickstart.teacher.model_name} ({num_seeds} seeds, mean and min-max)"
    )


def plot(curves: dict[str, list[list[tuple[float, float]]]], path: str, title: str) -> None:
    """Test accuracy against epochs: the mean over seeds, shaded between the min and the max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, runs in curves.items():
        length = min(len(r) for r in runs)
        if length == 0 or label.endswith("class head") or label.endswith("distillation head"):
            continue  # the heads' curves sit on the average's; the table has them
        epochs = np.array([e for e, _ in runs[0][:length]])
        values = 100 * np.array([[v for _, v in r[:length]] for r in runs])
        if length == 1:  # evaluated only at the end (the teacher): its final accuracy as a line
            ax.axhline(values.mean(), linestyle="--", color="gray", label=f"{label} (final)")
            continue
        (line,) = ax.plot(epochs, values.mean(0), marker="o", markersize=3, label=label)
        ax.fill_between(epochs, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
