"""The CLIP quickstart (`mode=clip_quickstart`): a CLIP teacher distilled two ways, offline.

  1. `data/pairs`: scikit-learn's digits as image-caption pairs
     (`deit_jax.experiments.clip_teacher_digits`, three captions an image);
  2. `teacher/`: a small CLIP trained on the train pairs with open_clip's own model and loss
     (`open_clip.CLIP`, `ClipLoss`), saved as an open_clip `.safetensors` file and converted by
     `python -m deit_jax.convert`, as a user's weights would be;
  3. for each seed, four students of the ordinary training loop, each in `seed<S>/<stage>`:
     - `deit_zero_shot`: (a) the teacher's zero-shot head (`teacher.prompts` x the digits'
       names) distilled label-free into a DeiT (KL only, `images:` data: no labels read);
     - `deit_labels`: the same DeiT trained on the digits' labels instead;
     - `clip_kl`: (b) the teacher's in-batch image-text logits distilled into a smaller CLIP
       (`distillation.kind=in_batch`, alpha 1: the KL only, no caption is matched by label);
     - `clip_loss`: the same CLIP student trained by CLIP's contrastive loss alone.

Every student sees the same train images (the digits' 1,437), augmentation, schedule and steps;
all are scored on the digits' 360 test images: top-1 (a CLIP student zero-shot, by its own text
tower on the same prompts as the teacher's head), agreement with the teacher, and for the CLIP
students recall@1/5 on the held-out pairs. Results: `results.md` and `results.json`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from typing import Any

import ml_collections
import numpy as np

from deit_jax.data.digits import NUM_TEST
from deit_jax.experiments import clip_teacher_digits as digits
from deit_jax.train.loop import train_and_evaluate

log = logging.getLogger(__name__)

STAGES = ("deit_zero_shot", "deit_labels", "clip_kl", "clip_loss")
ZERO_SHOT_SET = "eval_digits_test"  # the prefix of data.extra_eval="digits:test"


def teacher_weights(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Steps 1 and 2: the caption folder and the converted open_clip teacher (done once)."""
    from deit_jax.weights.cli import convert_main  # `python -m deit_jax.convert`

    qs = config.clip_quickstart
    pairs = digits.write_digit_pairs(os.path.join(workdir, "data", "pairs"))
    trained = os.path.join(workdir, "teacher", "open_clip.safetensors")
    converted = os.path.join(workdir, "teacher", "deit_jax")
    stats = digits.train_open_clip_teacher(
        pairs, trained, epochs=qs.teacher_epochs, width=qs.teacher_width
    )
    if stats:
        with open(os.path.join(workdir, "teacher", "training.json"), "w") as f:
            json.dump(stats, f)
    if not os.path.isdir(converted):
        convert_main(["--checkpoint", trained, "--model", "clip_vit_b32", "--output", converted])
    return converted


def stage_configs(
    config: ml_collections.ConfigDict, seed: int, teacher: str, pairs: str
) -> dict[str, ml_collections.ConfigDict]:
    """The four students of one seed (module docstring)."""
    qs = config.clip_quickstart
    clip = config.copy_and_resolve_references()
    clip.mode = "train"
    clip.seed = seed
    clip.data.name = "captions:" + pairs
    clip.teacher.checkpoint = teacher
    clip.teacher.prompts = digits.prompts_file(pairs)
    clip_kl = copy.deepcopy(clip)
    clip_kl.distillation.kind = "in_batch"
    clip_loss = copy.deepcopy(clip)
    clip_loss.distillation.kind = "none"

    deit = copy.deepcopy(clip)
    deit.model_name = qs.deit_model_name
    with deit.unlocked():
        deit.model = ml_collections.ConfigDict(qs.deit_model.to_dict())
    deit.optim.lr = qs.deit_lr
    deit.data.name = "images:" + pairs  # the same images, without their captions or labels
    deit.teacher.class_names = ",".join(str(d) for d in range(10))
    deit.distillation.kind = "soft"
    deit.distillation.alpha = 1.0
    deit.distillation.kl_reduction = "batchmean"
    deit.distillation.tau_squared = False  # the seed's plain F.kl_div
    labels = copy.deepcopy(deit)
    labels.data.name = "digits"
    labels.data.train_split, labels.data.eval_split = "train", "test"
    labels.data.extra_eval = ""
    labels.distillation.kind = "none"
    labels.distillation.alpha = 0.5
    return {
        "deit_zero_shot": deit,
        "deit_labels": labels,
        "clip_kl": clip_kl,
        "clip_loss": clip_loss,
    }


def _scores(stage: str, metrics: dict[str, float], extra: dict[str, Any]) -> dict[str, float]:
    """A student's numbers on the digits' test images, as fractions."""
    if stage == "deit_labels":
        return {"top1": metrics["top1"]}
    zero_shot = extra[ZERO_SHOT_SET]
    out = {k: zero_shot[k] for k in ("top1", "agreement", "teacher_top1")}
    if stage.startswith("clip"):
        out["mean_recall"] = metrics["mean_recall"]
        out["image_to_text_r1"] = metrics["image_to_text_r1"]
    return out


def final_metrics(workdir: str) -> tuple[dict[str, float], dict[str, Any]]:
    """A finished stage's last eval metrics and its extra sets' (from metrics.jsonl)."""
    from deit_jax.train.metrics import read_jsonl

    last: dict[str, dict[str, float]] = {}
    for record in read_jsonl(os.path.join(workdir, "metrics.jsonl")):
        for key, value in record.items():
            prefix, _, name = key.partition("/")
            if prefix.startswith("eval"):
                last.setdefault(prefix, {})[name] = value
    main = last.pop("eval")
    return main, last


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Steps 1-3 for every seed (each stage resumes or is skipped when finished); writes
    results.md and results.json; returns the results."""
    start = time.perf_counter()
    workdir = os.path.abspath(workdir)
    teacher = teacher_weights(config, workdir)
    pairs = os.path.join(workdir, "data", "pairs")
    scores: dict[str, list[dict[str, float]]] = {s: [] for s in STAGES}
    for seed in config.clip_quickstart.seeds:
        for stage, cfg in stage_configs(config, seed, teacher, pairs).items():
            stage_dir = os.path.join(workdir, f"seed{seed}", stage)
            log.info("CLIP quickstart: seed %d, %s -> %s", seed, stage, stage_dir)
            if not os.path.isdir(os.path.join(stage_dir, "weights")):
                train_and_evaluate(cfg, stage_dir)
            scores[stage].append(_scores(stage, *final_metrics(stage_dir)))
    results = summarize(config, scores, (time.perf_counter() - start) / 60)
    write_results(workdir, results, format_results(results))
    return results


def write_results(workdir: str, results: dict[str, Any], table: str) -> None:
    """An experiment's results.json and its table, results.md, in `workdir`; prints the table."""
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table)
    print(table)
    print(f"\nWrote results.md and results.json to {workdir}")


ROWS = {
    "deit_zero_shot": "(a) DeiT, teacher's zero-shot head distilled, label-free",
    "deit_labels": "    the same DeiT trained with labels",
    "clip_kl": "(b) CLIP student, in-batch logits distilled (KL only)",
    "clip_loss": "    the same CLIP student, CLIP loss alone",
}


def summarize(config, scores: dict[str, list[dict[str, float]]], minutes: float) -> dict:
    """Mean and spread over seeds of every student's numbers, and the teacher's top-1."""
    teacher = scores["deit_zero_shot"][0]["teacher_top1"]
    rows = {}
    for stage, per_seed in scores.items():
        keys = per_seed[0].keys() - {"teacher_top1"}
        rows[stage] = {k: seed_stats([s[k] for s in per_seed]) for k in sorted(keys)}
        rows[stage]["of_teacher"] = rows[stage]["top1"]["mean"] / teacher
    return {
        "teacher_top1": teacher,
        "rows": rows,
        "seeds": list(config.clip_quickstart.seeds),
        "test_images": NUM_TEST,
        "minutes": minutes,
        "goal_met": {s: rows[s]["of_teacher"] >= 0.9 for s in ("deit_zero_shot", "clip_kl")},
    }


def seed_stats(values: list[float]) -> dict[str, Any]:
    return {
        "mean": float(np.mean(values)),
        "min": float(np.min(values)),
        "max": float(np.max(values)),
        "values": [float(v) for v in values],
    }


def format_results(results: dict[str, Any]) -> str:
    pct = lambda x: f"{100 * x:.2f}"  # noqa: E731
    lines = [
        f"Teacher (open_clip CLIP, zero-shot): top-1 {pct(results['teacher_top1'])}% on the "
        f"{results['test_images']} test digits.",
        "",
        "| student | top-1 (mean of seeds) | seeds | of teacher | agreement | recall (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for stage, label in ROWS.items():
        row = results["rows"][stage]
        seeds = " / ".join(pct(v) for v in row["top1"]["values"])
        agreement = pct(row["agreement"]["mean"]) if "agreement" in row else "-"
        recall = pct(row["mean_recall"]["mean"]) if "mean_recall" in row else "-"
        lines.append(
            f"| {label.strip()} | {pct(row['top1']['mean'])} | {seeds} | "
            f"{100 * row['of_teacher']:.1f}% | {agreement} | {recall} |"
        )
    goal = ", ".join(
        f"{stage}: {'met' if met else 'NOT met'}" for stage, met in results["goal_met"].items()
    )
    lines += [
        "",
        f"Goal (label-free student >= 90% of the teacher's top-1): {goal}. "
        f"Seeds {results['seeds']}, {results['minutes']:.1f} minutes.",
    ]
    return "\n".join(lines) + "\n"
