"""The CLIP recipes (configs/clip_recipes.py): which distillation recipe a CLIP student and a
label-free DeiT should use, measured on the digits with captions, 3 seeds.

Two tables, each stage an ordinary training run in `WORKDIR/<part>/seed<S>/<stage>` (a finished
stage is read back, not rerun):

1. `losses`: the quickstart's teacher (98% zero-shot) and its CLIP student under each pair loss
   alone (`distillation.pair_weights`: the in-batch KL, CLIP-KD's FD, CLIP-KD's ICL) and CLIP-KD's
   sum (CLIP loss 1, KL 1, ICL 1, FD 2000), beside the same student without a teacher (CLIP's
   loss alone); each from scratch and inherited from the teacher (`init.inherit`: TinyCLIP's
   leading heads and channels). An inherited student is evaluated every
   `clip_recipes.eval_every_epochs`: the steps it needs to reach the same loss's from-scratch
   final recall.
2. `weak`: a weaker teacher (`weak_teacher_epochs` of open_clip training, about 80% zero-shot)
   and both label-free readings under the candidate recipes (`WEAK_RECIPES`): the quickstart's
   recipe, function matching (mixup at alpha 1, the live teacher sees the mixed images), longer
   schedules, CLIP-KD's losses, inheritance. Goal: at least 95% of the teacher's top-1.

Results: `results.md` and `results.json` in WORKDIR.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from typing import Any

import ml_collections

from deit_jax.experiments import clip_quickstart as quickstart
from deit_jax.train.loop import train_and_evaluate
from deit_jax.train.metrics import read_jsonl

log = logging.getLogger(__name__)

GOAL = 0.95  # of the teacher's zero-shot top-1
CLIP_KD = {"clip": 1.0, "kl": 1.0, "icl": 1.0, "fd": 2000.0}  # CLIP-KD's scripts' weights
# Part 1: the CLIP student's losses (`distillation.pair_weights`); None: no teacher.
LOSSES: dict[str, dict[str, float] | None] = {
    "none": None,
    "kl": {"clip": 0.0, "kl": 1.0, "icl": 0.0, "fd": 0.0},
    "fd": {"clip": 0.0, "kl": 0.0, "icl": 0.0, "fd": 2000.0},
    "icl": {"clip": 0.0, "kl": 0.0, "icl": 1.0, "fd": 0.0},
    "clip_kd": CLIP_KD,
}
LOSS_ROWS = {
    "none": "no teacher (CLIP loss alone)",
    "kl": "in-batch KL alone",
    "fd": "FD alone (CLIP-KD)",
    "icl": "ICL alone (CLIP-KD)",
    "clip_kd": "CLIP-KD's sum (CLIP 1, KL 1, ICL 1, FD 2000)",
}
# Part 2: (reading, what changes from the quickstart's student, overrides; "long" multiplies
# the epochs by `long_factor`).
WEAK_RECIPES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "deit": ("deit", "the quickstart's recipe", {}),
    "deit_fm": ("deit", "function matching (mixup 1.0)", {"mixup.mixup_alpha": 1.0}),
    "deit_fm_long": ("deit", "function matching, long", {"mixup.mixup_alpha": 1.0, "long": True}),
    "clip_kl": ("clip", "the quickstart's recipe (KL)", {}),
    "clip_kd": ("clip", "CLIP-KD's sum", {"losses": "clip_kd"}),
    "clip_kl_inherit": ("clip", "KL, inherited", {"inherit": True}),
    "clip_kd_inherit": ("clip", "CLIP-KD's sum, inherited", {"losses": "clip_kd", "inherit": True}),
    "clip_kd_inherit_long": (
        "clip",
        "CLIP-KD's sum, inherited, long",
        {"losses": "clip_kd", "inherit": True, "long": True},
    ),
}


def _student(
    base: ml_collections.ConfigDict,
    losses: str | None,
    *,
    inherit: bool,
    teacher: str,
    epochs_factor: float = 1.0,
    overrides: dict[str, Any] | None = None,
) -> ml_collections.ConfigDict:
    """A student of the quickstart's with the named `LOSSES` (None: its own), inheritance and
    schedule."""
    cfg = copy.deepcopy(base)
    if losses == "none":
        cfg.distillation.kind = "none"
    elif losses is not None:
        cfg.distillation.kind = "in_batch"
        for key, value in LOSSES[losses].items():
            cfg.distillation.pair_weights[key] = value
    if inherit:
        cfg.init_from = teacher
        cfg.init.inherit = True
    cfg.num_epochs = base.num_epochs * epochs_factor
    cfg.update_from_flattened_dict(overrides or {})
    return cfg


def weak_student(
    name: str, bases: dict[str, ml_collections.ConfigDict], teacher: str, long_factor: float
) -> ml_collections.ConfigDict:
    """The student of `WEAK_RECIPES[name]`, from its reading's base (`bases[reading]`)."""
    reading, _, spec = WEAK_RECIPES[name]
    spec = dict(spec)
    return _student(
        bases[reading],
        spec.pop("losses", None),
        inherit=spec.pop("inherit", False),
        teacher=teacher,
        epochs_factor=long_factor if spec.pop("long", False) else 1.0,
        overrides=spec,
    )


def _train(cfg: ml_collections.ConfigDict, stage_dir: str) -> str:
    if not os.path.isdir(os.path.join(stage_dir, "weights")):
        log.info("CLIP recipes: %s", stage_dir)
        train_and_evaluate(cfg, stage_dir)
    return stage_dir


def _evals(stage_dir: str) -> list[dict[str, float]]:
    """Every evaluation of a run: its step and eval/ metrics, in order."""
    evals = []
    for record in read_jsonl(os.path.join(stage_dir, "metrics.jsonl")):
        metrics = {k.removeprefix("eval/"): v for k, v in record.items() if k.startswith("eval/")}
        if metrics:
            evals.append({"step": record["step"], **metrics})
    return evals


def _scores(stage_dir: str, reading: str) -> dict[str, float]:
    main, extra = quickstart.final_metrics(stage_dir)
    zero_shot = extra[quickstart.ZERO_SHOT_SET]
    out = {k: zero_shot[k] for k in ("top1", "agreement", "teacher_top1")}
    if reading == "clip":
        out["mean_recall"] = main["mean_recall"]
    return out


def steps_to_reach(evals: list[dict[str, float]], target: float) -> int | None:
    """The first evaluated step whose mean recall is at least `target` (None: never)."""
    return next((int(e["step"]) for e in evals if e["mean_recall"] >= target), None)


def _teacher(config: ml_collections.ConfigDict, workdir: str, epochs: int) -> str:
    qs = copy.deepcopy(config)
    qs.clip_quickstart.teacher_epochs = epochs
    return quickstart.teacher_weights(qs, workdir)


def _bases(config, seed: int, teacher: str, pairs: str) -> dict[str, ml_collections.ConfigDict]:
    stages = quickstart.stage_configs(config, seed, teacher, pairs)
    every = config.clip_recipes.eval_every_epochs
    for cfg in stages.values():
        cfg.eval_every_epochs = every
    return {"deit": stages["deit_zero_shot"], "clip": stages["clip_kl"]}


def run_losses(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Part 1 (module docstring)."""
    part = os.path.join(workdir, "losses")
    teacher = _teacher(config, part, config.clip_quickstart.teacher_epochs)
    pairs = os.path.join(part, "data", "pairs")
    rows: dict[str, dict[str, Any]] = {}
    for seed in config.clip_recipes.seeds:
        base = _bases(config, seed, teacher, pairs)["clip"]
        for losses in config.clip_recipes.losses:
            for inherit in (False, True):
                name = f"{losses}_{'inherited' if inherit else 'scratch'}"
                cfg = _student(base, losses, inherit=inherit, teacher=teacher)
                if not inherit:  # only its final recall is read: the quickstart's evaluations
                    cfg.eval_every_epochs = config.eval_every_epochs
                stage_dir = _train(cfg, os.path.join(part, f"seed{seed}", name))
                row = rows.setdefault(name, {"seeds": [], "evals": []})
                row["seeds"].append(_scores(stage_dir, "clip"))
                row["evals"].append(_evals(stage_dir))
    out: dict[str, Any] = {"teacher_top1": _teacher_top1(rows), "rows": {}}
    for name, row in rows.items():
        out["rows"][name] = _summary(row["seeds"], out["teacher_top1"])
        if name.endswith("_inherited"):
            scratch = rows[name.replace("_inherited", "_scratch")]
            reached = [
                steps_to_reach(evals, s_evals[-1]["mean_recall"])
                for evals, s_evals in zip(row["evals"], scratch["evals"], strict=True)
            ]
            out["rows"][name]["steps_to_scratch_recall"] = reached
            out["rows"][name]["scratch_steps"] = int(scratch["evals"][0][-1]["step"])
    return out


def run_weak(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Part 2 (module docstring)."""
    recipes = config.clip_recipes
    part = os.path.join(workdir, "weak")
    teacher = _teacher(config, part, recipes.weak_teacher_epochs)
    pairs = os.path.join(part, "data", "pairs")
    rows: dict[str, list[dict[str, float]]] = {}
    bases = {seed: _bases(config, seed, teacher, pairs) for seed in recipes.seeds}
    for name in recipes.weak_recipes:  # every seed of a recipe before the next recipe
        for seed in recipes.seeds:
            reading = WEAK_RECIPES[name][0]
            cfg = weak_student(name, bases[seed], teacher, recipes.long_factor)
            stage_dir = _train(cfg, os.path.join(part, f"seed{seed}", name))
            rows.setdefault(name, []).append(_scores(stage_dir, reading))
    teacher_top1 = _teacher_top1({k: {"seeds": v} for k, v in rows.items()})
    return {
        "teacher_top1": teacher_top1,
        "rows": {name: _summary(seeds, teacher_top1) for name, seeds in rows.items()},
    }


def _teacher_top1(rows: dict[str, dict[str, Any]]) -> float:
    values = {s["teacher_top1"] for row in rows.values() for s in row["seeds"]}
    if len(values) != 1:  # every student is scored against the one teacher's predictions
        raise RuntimeError(f"the students report different teacher top-1s: {sorted(values)}")
    return values.pop()


def _summary(per_seed: list[dict[str, float]], teacher_top1: float) -> dict[str, Any]:
    keys = sorted(per_seed[0].keys() - {"teacher_top1"})
    row: dict[str, Any] = {k: quickstart.seed_stats([s[k] for s in per_seed]) for k in keys}
    row["of_teacher"] = row["top1"]["mean"] / teacher_top1
    return row


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """The parts of `config.clip_recipes.parts`; writes results.md and results.json."""
    start = time.perf_counter()
    workdir = os.path.abspath(workdir)
    parts = {"losses": run_losses, "weak": run_weak}
    results: dict[str, Any] = {"seeds": list(config.clip_recipes.seeds)}
    for part in config.clip_recipes.parts:
        results[part] = parts[part](config, workdir)
    results["minutes"] = (time.perf_counter() - start) / 60
    quickstart.write_results(workdir, results, format_results(results))
    return results


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _seeds(stats: dict[str, Any]) -> str:
    return " / ".join(_pct(v) for v in stats["values"])


def format_results(results: dict[str, Any]) -> str:
    lines: list[str] = []
    if "losses" in results:
        part = results["losses"]
        lines += [
            f"CLIP student's losses; teacher zero-shot top-1 {_pct(part['teacher_top1'])}%.",
            "",
            "| loss | init | top-1 (mean) | seeds | of teacher | recall (mean) | recall seeds "
            "| steps to scratch's final recall |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for losses, label in LOSS_ROWS.items():
            for init in ("scratch", "inherited"):
                row = part["rows"].get(f"{losses}_{init}")
                if row is None:
                    continue
                reach = "-"
                if init == "inherited":
                    steps = row["steps_to_scratch_recall"]
                    reach = " / ".join("never" if s is None else str(s) for s in steps)
                    reach += f" (of {row['scratch_steps']})"
                lines.append(
                    f"| {label} | {init} | {_pct(row['top1']['mean'])} | {_seeds(row['top1'])} | "
                    f"{100 * row['of_teacher']:.1f}% | {_pct(row['mean_recall']['mean'])} | "
                    f"{_seeds(row['mean_recall'])} | {reach} |"
                )
        lines.append("")
    if "weak" in results:
        part = results["weak"]
        lines += [
            f"The weaker teacher: zero-shot top-1 {_pct(part['teacher_top1'])}%; goal: "
            f"{100 * GOAL:.0f}% of it.",
            "",
            "| reading | recipe | top-1 (mean) | seeds | of teacher | agreement | goal |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, row in part["rows"].items():
            reading, label, _ = WEAK_RECIPES[name]
            reading = "label-free DeiT" if reading == "deit" else "CLIP student"
            met = "met" if row["of_teacher"] >= GOAL else "not met"
            lines.append(
                f"| {reading} | {label} | {_pct(row['top1']['mean'])} | {_seeds(row['top1'])} | "
                f"{100 * row['of_teacher']:.1f}% | {_pct(row['agreement']['mean'])} | {met} |"
            )
        lines.append("")
    lines.append(f"Seeds {results['seeds']}, {results['minutes']:.1f} minutes.")
    return "\n".join(lines) + "\n"
