"""`--config.mode=plan`: compile a run for a TPU slice or a GPU node on this host, and say what
it will cost there, before renting it.

  python -m deit_jax.main --config configs/deit_distilled_imagenet.py:base --workdir DIR \
      --config.mode=plan --config.plan.target=tpu:v5e:2x4

The run's task is built from shapes alone (`deit_jax.train.tasks.build_task(..., purpose=PLAN)`:
no weights, data or teacher cache read), and its real train step (student, live teacher or the
cache's outputs, loss, optimiser, EMA) and eval step are compiled for the target's devices with
the config's mesh, dtype, remat, attention and gradient accumulation. Printed, and written to
`WORKDIR/plan.json`: memory per device and whether it fits, FLOPs per device and step, the
roofline bound on the step time and the run's hours, the largest global batch that fits, what
would make a batch that does not fit fit, and the bytes of a checkpoint and of the teacher cache.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from deit_jax import jit as jit_module
from deit_jax import sharding
from deit_jax.config import rules, tasks
from deit_jax.plan.compile import compile_step, fits, largest_batch_that_fits, roofline
from deit_jax.plan.costs import cache_bytes, embedding_width, state_bytes, teacher_forward
from deit_jax.plan.input_side import format_input, input_side
from deit_jax.plan.targets import (
    HOSTS_SOURCE,
    Target,
    compile_devices,
    parse_target,
    plan_mesh,
)
from deit_jax.train import optim
from deit_jax.train.state import state_and_shardings
from deit_jax.train.tasks import build_task

log = logging.getLogger(__name__)
GiB = 1 << 30


class Planner:
    """The run's steps for the target, compiled on demand at any global batch."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, target: Target):
        self.config, self.target = config, target
        self.devices = compile_devices(
            target, gpu_target_config=config.plan.gpu_target_config or None
        )
        self.mesh = plan_mesh(self.devices, data=config.mesh.data, fsdp=config.mesh.fsdp)
        with jit_module.compiling_for(target.platform):
            self.task = build_task(config, workdir, self.mesh, purpose=tasks.PLAN)
        self.info = self.task.info

    def steps_per_epoch(self, batch: int) -> int:
        return max(1, (self.info.num_train or batch) // batch)

    def _batch(self, shapes: dict[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
        spec = NamedSharding(self.mesh, PartitionSpec(sharding.DATA_AXES))
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=spec) for k, v in shapes.items()}

    def _scope(self) -> contextlib.ExitStack:
        """The mesh, its logical axis rules and the target's compiler options, for a compile."""
        scope = contextlib.ExitStack()
        scope.enter_context(jax.set_mesh(self.mesh))
        scope.enter_context(nn.logical_axis_rules(sharding.logical_rules(self.mesh)))
        scope.enter_context(jit_module.compiling_for(self.target.platform))
        return scope

    def state(self, config: ml_collections.ConfigDict, batch: int, task: Any = None):
        """The optimiser, schedule and abstract train state (with shardings) of `config`.
        Outside the mesh's scope: its seed is a concrete array of this host's."""
        task = task or self.task
        tx, schedule = optim.create_optimizer(
            tasks.optimizer_config(config),
            global_batch_size=batch,
            steps_per_epoch=self.steps_per_epoch(batch),
            num_epochs=config.num_epochs,
        )
        _, state, shardings = state_and_shardings(
            config, task.model, tx, self.mesh, task.projection
        )
        return tx, schedule, state, shardings

    def train_report(self, batch: int, task: Any = None, config=None) -> dict[str, Any]:
        """The train step compiled at global batch `batch` (of `task`, default the run's)."""
        task, config = task or self.task, config or self.config
        tx, schedule, state, shardings = self.state(config, batch, task)
        with self._scope():
            step = jit_module.jit(
                task.train_step(tx, schedule),
                out_shardings=(shardings, sharding.replicated(self.mesh)),
                donate_argnums=(0,),
            )
            args = (state, task.teacher_variables, self._batch(task.batch_shapes(batch)))
            report = compile_step(step, args, global_batch=batch)
        total = (report.get("bytes_per_device") or {}).get("total")
        log.info(
            "Train step at global batch %d: %s (%.0f s to compile).", batch,
            f"{total / GiB:.2f} GiB a device" if total else "does not fit",
            report["compile_seconds"],
        )  # fmt: skip
        return report

    def eval_report(self, batch: int) -> dict[str, Any]:
        _, _, state, _ = self.state(self.config, self.config.batch_size)
        with self._scope():
            step, args = self.task.planned_eval(state, batch)
            return compile_step(step, (*args[:-1], self._batch(args[-1])), global_batch=batch)

    def teacher_report(self, batch: int) -> dict[str, Any] | None:
        """The live teacher's forward alone at `batch` (None without a live teacher)."""
        task = self.task
        if task.teacher is None or self.config.teacher.cache:
            return None
        with self._scope():
            forward = jit_module.jit(teacher_forward(task.teacher))
            images = self._batch(task.batch_shapes(batch))
            return compile_step(forward, (task.teacher_variables, images), global_batch=batch)

    def cache_width(self) -> int:
        """The width of the embeddings `mode=teacher_cache` of this config would store."""
        return embedding_width(self.config, self.task.teacher, self.info.num_classes)

    def state_sizes(self) -> dict[str, int]:
        return state_bytes(self.state(self.config, self.config.batch_size)[2])


def plan(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Plans the run `config` describes on `config.plan.target`; returns and writes the plan."""
    target = parse_target(config.plan.target)
    rules.check_config(config, num_devices=target.num_devices, planning=True)
    chip = target.chip
    planner = Planner(config, workdir, target)
    batch = int(config.batch_size)
    log.info("Planning %s for %s (%d %s): compiling the train step at batch %d.",
             config.model_name, target.spec, target.num_devices, chip.name, batch)  # fmt: skip
    train = planner.train_report(batch)
    evaluation = planner.eval_report(int(config.eval_batch_size))
    teacher = planner.teacher_report(batch)
    largest, capped = largest_batch(planner, train)
    result = summary(config, target, train, evaluation, teacher, largest, planner)
    result["largest_global_batch_capped"] = capped
    log.info("Measuring the input pipeline on this host for %.0f s.", config.plan.input_seconds)
    result["input"] = input_side(config, target, result["images_per_second_bound"])
    if not result["fits"]:
        result["to_fit"] = ways_to_fit(config, planner)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "plan.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(format_plan(result))
    return result


# The batch search stops here, as a multiple of the configured batch: no one trains at more.
SEARCH_CEILING = 16


def largest_batch(planner: Planner, train: dict[str, Any]) -> tuple[int, bool]:
    """The largest global batch whose train step fits (a multiple of the devices), and whether
    the search stopped at `SEARCH_CEILING` x the configured batch, which fits."""
    chip, batch, multiple = (
        planner.target.chip,
        int(planner.config.batch_size),
        planner.target.num_devices,
    )
    known = {batch: train}

    def report_at(b: int) -> dict[str, Any]:
        if b not in known:
            known[b] = planner.train_report(b)
        return known[b]

    ceiling = SEARCH_CEILING * batch
    if fits(train, chip):
        if fits(report_at(ceiling), chip):
            return ceiling, True
        # The ceiling's refusal is quick and says the bytes it needs: the line runs from the
        # batch to it (largest_batch_that_fits checks where it meets the chip's memory).
        probes = (batch, ceiling)
    else:
        half = batch // 2 // multiple * multiple
        probes = (half, batch) if half >= multiple else (batch, 2 * batch)
    largest, _ = largest_batch_that_fits(
        report_at, chip, probes=probes, multiple=multiple, max_checks=6
    )
    return largest, False


def summary(config, target, train, evaluation, teacher, largest, planner) -> dict[str, Any]:
    """The plan's keys (see the module doc) from the compiled steps' reports."""
    chip, batch = target.chip, int(config.batch_size)
    bound = roofline(train, chip, batch)
    info = planner.info
    steps_per_epoch = planner.steps_per_epoch(batch) if info.num_train else None
    total_steps = optim.total_steps(config.num_epochs, steps_per_epoch) if steps_per_epoch else None
    flops = train.get("flops_per_step_per_device")
    hours = lambda s: None if s is None or total_steps is None else total_steps * s / 3600  # noqa: E731
    compute_seconds = None if flops is None else flops / chip.peak_bf16_flops
    teacher_flops = teacher.get("flops_per_step_per_device") if teacher else 0.0
    return {
        "target": target.spec,
        "chip": chip.name,
        "devices": target.num_devices,
        "global_batch": batch,
        "fits": fits(train, chip),
        "device_memory_bytes": chip.hbm_bytes,
        "usable_memory_bytes": chip.usable_bytes,
        "bytes_per_device": train.get("bytes_per_device"),
        "error": train.get("error"),
        "flops_per_step_per_device": flops,
        "bytes_accessed_per_step_per_device": train.get("bytes_accessed"),
        "step_seconds_bound": bound["step_seconds_bound"],
        "images_per_second_bound": bound["images_per_second_bound"],
        "bound_by": bound["bound_by"],
        "largest_global_batch_that_fits": largest,
        "compile_seconds": train["compile_seconds"],
        "teacher_flops_fraction": (teacher_flops / flops) if flops and teacher_flops else 0.0,
        "num_examples": info.num_train,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "run_hours_bound": hours(bound["step_seconds_bound"]),
        "run_hours_at_50_mfu": hours(None if compute_seconds is None else compute_seconds / 0.5),
        "checkpoint_bytes": planner.state_sizes(),
        "teacher_cache_bytes": cache_bytes(config, info, total_steps, planner.cache_width()),
        "eval": {
            "global_batch": int(config.eval_batch_size),
            "fits": fits(evaluation, chip),
            "bytes_per_device": evaluation.get("bytes_per_device"),
            "flops_per_step_per_device": evaluation.get("flops_per_step_per_device"),
        },
        "cost_source": train.get("cost_source"),
        "notes": _notes(target),
    }


def _notes(target: Target) -> list[str]:
    notes = [
        f"chip facts: {target.chip.source}; hosts: {HOSTS_SOURCE}",
        "input: a vCPU is a hardware thread; a cloud host's threads run the pipeline at "
        "their own rate, not this host's, so the vCPUs needed are an estimate",
    ]
    if target.platform == "gpu":
        notes.append(
            "compiled without a GPU: GEMMs are not autotuned, so temporaries can differ from "
            "the card's by a GEMM workspace; JAX preallocates 75% of the card's memory"
        )
    return notes


def ways_to_fit(config: ml_collections.ConfigDict, planner: Planner) -> list[dict[str, Any]]:
    """What would make the configured batch fit, each change compiled to check it: remat,
    FSDP over every device, gradient accumulation (the same batch in smaller steps), a cached
    teacher instead of a live one."""
    chip, batch, n = planner.target.chip, int(config.batch_size), planner.target.num_devices
    changes: list[tuple[str, dict[str, Any]]] = []
    if config.model.get("remat", "absent") is None:
        changes.append(
            ("--config.model.remat=nothing_saveable", {"model.remat": "nothing_saveable"})
        )
    if config.mesh.fsdp == 1 and n > 1:
        changes.append((f"--config.mesh.fsdp={n}", {"mesh.fsdp": n, "mesh.data": 1}))
    in_step = tasks.task_of(config).accumulates == "micro_batches"
    for k in (2, 4, 8):
        if batch % (k * n) == 0:
            accum = k * config.optim.grad_accum_steps
            if in_step:  # the same batch an update, in k micro-batches (GradCache)
                line = (
                    f"--config.optim.grad_accum_steps={accum} (the same {batch} images an "
                    f"update, in micro-batches of {batch // accum}: the whole batch's loss)"
                )
                changes.append((line, {"optim.grad_accum_steps": accum}))
                continue
            line = (
                f"--config.batch_size={batch // k} --config.optim.grad_accum_steps={accum} "
                f"(the same {batch * config.optim.grad_accum_steps} images an update)"
            )
            changes.append((line, {"batch_size": batch // k, "optim.grad_accum_steps": accum}))
    if planner.task.teacher is not None and not config.teacher.cache:
        changes.append(
            ("a cached teacher: --config.mode=teacher_cache once, then --config.teacher.cache=DIR",
             {"teacher.cache": os.path.join("/planned", "cache")}),
        )  # fmt: skip
    out: list[dict[str, Any]] = []
    for line, keys in changes:
        if "optim.grad_accum_steps" in keys and any(
            w["fits"] and "grad_accum_steps" in w["change"] for w in out
        ):
            continue  # a smaller accumulation already fits
        changed = copy.deepcopy(config)
        for key, value in keys.items():
            node = changed
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
        other = Planner(changed, "", planner.target) if _rebuilds(keys) else planner
        report = other.train_report(int(changed.batch_size), other.task, changed)
        out.append({
            "change": line,
            "fits": fits(report, chip),
            "bytes_per_device": (report.get("bytes_per_device") or {}).get("total")
            or report.get("bytes_required_at_least"),
        })  # fmt: skip
    return out


def _rebuilds(keys: dict[str, Any]) -> bool:
    """Whether a change needs the task rebuilt (model, mesh or teacher), not just recompiled."""
    return any(k.split(".")[0] in ("model", "mesh", "teacher") for k in keys)


def format_plan(p: dict[str, Any]) -> str:
    """The plan as a Markdown table, what a person reads first."""
    mem = p.get("bytes_per_device") or {}
    gib = _bytes_text
    rows = [
        ("target", f"{p['target']} ({p['devices']} x {p['chip']})"),
        ("global batch", p["global_batch"]),
        ("fits", "yes" if p["fits"] else f"NO: {p.get('error') or gib(mem.get('total'))}"),
        ("memory per device", f"{gib(mem.get('total'))} of {gib(p['usable_memory_bytes'])} "
                              f"(arguments {gib(mem.get('argument'))}, temporaries "
                              f"{gib(mem.get('temp'))})"),
        ("FLOPs per device and step", _e(p["flops_per_step_per_device"])),
        ("step time bound", _s(p["step_seconds_bound"]) + _bound_by(p["bound_by"])),
        ("images/s bound", _n(p["images_per_second_bound"])),
        ("largest global batch that fits", f"{p['largest_global_batch_that_fits']}"
         + (f" or more (the search stops at {SEARCH_CEILING}x the batch)"
            if p.get("largest_global_batch_capped") else "")),
        ("teacher share of the FLOPs", f"{100 * p['teacher_flops_fraction']:.1f}%"),
        ("run (bound / at 50% MFU)",
         f"{_h(p['run_hours_bound'])} / {_h(p['run_hours_at_50_mfu'])}, {p['total_steps']} steps"
         if p["total_steps"] else "- (the data's size is unknown: --config.plan.num_examples=N)"),
        ("checkpoint", gib(p["checkpoint_bytes"]["total"])),
        ("teacher cache", gib(p["teacher_cache_bytes"])),
        ("host CPUs for the input", format_input(p.get("input"))),
        ("compile", f"{p['compile_seconds']:.0f} s"),
    ]  # fmt: skip
    lines = ["| plan | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    for way in p.get("to_fit", []):
        verdict = "fits" if way["fits"] else "still does not fit"
        lines.append(f"| to fit | {way['change']}: {verdict} ({gib(way['bytes_per_device'])}) |")
    return "\n".join(lines)


def _bytes_text(b: int | None) -> str:
    if b is None:
        return "-"
    return f"{b / GiB:.2f} GiB" if b >= GiB // 10 else f"{b / (1 << 20):.1f} MiB"


def _bound_by(x: str | None) -> str:
    return "" if x is None else f" ({x}-bound)"


def _e(x):
    return "-" if x is None else f"{x:.3e}"


def _s(x):
    return "-" if x is None else f"{1e3 * x:.1f} ms"


def _n(x):
    return "-" if x is None else f"{x:,.0f}"


def _h(x):
    return "-" if x is None else f"{x:.1f} h"
