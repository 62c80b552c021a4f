"""Throughput of deit_jax against timm's PyTorch DeiT, measured in one run on one machine.

Prints Markdown tables:

1. Train-step images/s (forward, backward, AdamW update; jitted, parameter and optimiser
   buffers donated) and inference images/s, deit_jax next to timm at the same batch size,
   precision (JAX: bf16 compute with float32 parameters; PyTorch: autocast bf16 on CPU, AMP on
   GPU) and thread count, with the ratio deit_jax / timm. Also the FLOPs XLA counts per image,
   the achieved TFLOP/s, the model FLOP utilisation (MFU, GPU only) and the peak memory.
2. The distillation overhead: deit_jax's real train step (`deit_jax.train.steps.make_train_step`,
   with EMA) for a distilled student, plain and with a frozen RegNetY teacher, against the FLOP
   ratio.
3. How the step time grows with the batch size and with the resolution (224 -> 384), against the
   FLOP growth.

Usage (from the repository root):

    python benchmarks/throughput.py            # CPU preset, < 10 minutes on 2 cores
    python benchmarks/throughput.py --smoke    # tiny models, about a minute: every code path
    python benchmarks/throughput.py --gpu      # one-GPU preset (H100/H200): DeiT-B bf16 b256

Method: every measured function runs a whole step and waits for its result (JAX:
`block_until_ready`; CUDA: `torch.cuda.synchronize`). Each is warmed up first (which also
compiles), then the deit_jax and timm functions of a configuration are timed in turn, round after
round, so a noisy shared machine slows both alike; the tables give medians. Inputs already sit on
the device. timm runs eagerly (as the reference training code does), with fused AdamW. Both
frameworks get the same number of CPU threads (`--threads`: the process's CPU affinity, which
sizes XLA's thread pool, and `torch.set_num_threads`).

On CPU the script first tunes glibc's allocator for the whole process (both frameworks): XLA
allocates each step's temporaries afresh (1.8 GB for a DeiT-Ti batch-32 train step) and glibc
serves such blocks with mmap and unmaps them on free, so every step page-faults its working set
in again. `tune_malloc` keeps freed memory in the process instead (`--default-malloc` skips it;
see benchmarks/NOTES.md for the numbers with and without).
"""

import argparse
import dataclasses
import gc
import json
import os
import resource
import sys
import time
from typing import Any

import timing  # benchmarks/timing.py: a script's own folder is on sys.path

# Before torch and jax start their threads; skipped on GPU, where host memory matters little.
MALLOC_TUNED = not {"--gpu", "--default-malloc"} & set(sys.argv[1:]) and timing.tune_malloc()
if "--smoke" in sys.argv[1:]:  # compile fast: the smoke run checks code paths, not speed
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    ).strip()

# torch and timm before deit_jax: importing TensorFlow (which parts of deit_jax's input pipeline
# do) before them crashes the interpreter (deit_jax/_compat.py).
import timm  # noqa: E402
import torch  # noqa: E402

# Both frameworks share the GPU: JAX must not grab most of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
import optax  # noqa: E402
from flax.core import meta  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distillation  # noqa: E402
from model_steps import MODELS, Case, jax_model, jax_steps, timm_steps  # noqa: E402
from timing import Runner, fmt, mib, ratio, set_threads  # noqa: E402

from deit_jax.jit import compiler_options, jit  # noqa: E402

# Dense peak TFLOP/s for MFU, by device kind substring and precision (fp32 rows: TF32 matmuls).
PEAK_TFLOPS = {"H100": {"bf16": 989.4, "float32": 494.7}, "H200": {"bf16": 989.4, "float32": 494.7}}


@dataclasses.dataclass(frozen=True)
class Preset:
    main: tuple[Case, ...]
    batch_sweep: tuple[Case, ...]  # same model and precision, growing batch
    resolution: tuple[Case, ...]  # same model, precision and batch: 224, then 384
    distill: tuple[str, str, str, int]  # student, teacher, precision, batch
    distill_batches: tuple[int, ...] = ()  # more batch sizes for the distillation table
    # XLA's planned memory of train steps (compile only): models, batches, remat policies.
    memory: tuple[tuple[str, ...], tuple[int, ...], tuple[str | None, ...], int] = (
        ("B", "deit3_large_patch16_224"),
        (64, 128, 256),
        (None, "dots_saveable", "nothing_saveable"),
        224,  # resolution
    )
    warmup: int = 1
    reps: int = 5
    sweep_reps: int = 3  # for the sweeps and the distillation steps
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    teacher_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    note: str = ""


PRESETS = {
    # About 5 minutes on an idle 2-core CPU. DeiT-B and bf16 training run only in the GPU preset:
    # without AVX512-BF16, bf16 is emulated, and torch's autocast train step is ~10x slower.
    "cpu": Preset(
        main=(
            Case("Ti", "float32", 32),
            Case("Ti", "bf16", 8, steps=("infer",), reps=3),
            Case("S", "float32", 8, reps=3),
        ),
        batch_sweep=(Case("Ti", "float32", 8, steps=("train",)), Case("Ti", "float32", 32)),
        resolution=(
            Case("Ti", "float32", 8, steps=("train",)),
            Case("Ti", "float32", 8, res=384, steps=("train",)),
        ),
        distill=("deit_tiny_distilled_patch16_224", "regnety_160", "float32", 2),
        distill_batches=(8,),
        reps=5,
        note="CPU preset: DeiT-B and bf16 training only with --gpu; bf16 inference and DeiT-S "
        "at batch 8, sweeps and distillation with 3 rounds.",
    ),
    "gpu": Preset(
        main=(
            Case("Ti", "bf16", 256),
            Case("S", "bf16", 256),
            Case("B", "bf16", 256),
            Case("B", "bf16", 256, attention="xla"),
            Case("B", "bf16", 256, attention="cudnn"),
            Case("B", "bf16", 256, steps=("train",), remat="dots_saveable"),
            Case("B", "bf16", 256, steps=("train",), remat="nothing_saveable"),
            Case("B", "float32", 128),
        ),
        batch_sweep=(
            Case("B", "bf16", 64, steps=("train",)),
            Case("B", "bf16", 128, steps=("train",)),
            Case("B", "bf16", 256),
        ),
        resolution=(
            Case("B", "bf16", 64, steps=("train",)),
            Case("B", "bf16", 64, res=384, steps=("train",)),
        ),
        distill=("deit_base_distilled_patch16_224", "regnety_160", "bf16", 128),
        warmup=2,
        reps=10,
        sweep_reps=10,
        note="GPU preset: float32 rows use TF32 matmuls on both sides.",
    ),
    # Every code path on tiny inputs (32x32 images, 1-block DeiTs, a 4-block RegNetY teacher);
    # the sweeps reuse the main cases' measurements where they coincide.
    "smoke": Preset(
        main=(Case("Ti", "float32", 2), Case("Ti", "bf16", 2, steps=("infer",))),
        batch_sweep=(Case("Ti", "float32", 1, steps=("train",)), Case("Ti", "float32", 2)),
        resolution=(
            Case("Ti", "float32", 1, res=32, steps=("train",)),
            Case("Ti", "float32", 1, res=48, steps=("train",)),
        ),
        distill=("deit_tiny_distilled_patch16_224", "regnety_002", "float32", 2),
        reps=2,
        sweep_reps=2,
        model_overrides={"depth": 1},
        teacher_overrides={"depths": (1, 1, 1, 1)},
        memory=(("Ti",), (2,), (None, "nothing_saveable"), 32),
        note="Smoke preset: tiny 1-block models, numbers mean nothing.",
    ),
}


# ---------------------------------------------------------------------------------------------
# Tables.


@dataclasses.dataclass
class Row:
    case: Case
    step: str
    jax_s: float  # median step time
    timm_s: float | None
    min_ratio: float | None  # timm / deit_jax of the fastest rounds: less hit by other load
    flops: float | None  # per step
    jax_mem: int | None
    jax_plan: int | None
    timm_mem: int | None


class Bench:
    """The measured rows of one run and the tables made from them."""

    def __init__(self, args: argparse.Namespace, preset: Preset):
        self.args = args
        self.preset = preset
        self.gpu = jax.default_backend() == "gpu"
        self.device = "cuda" if self.gpu else "cpu"
        self.runner = Runner(self.gpu, preset.warmup, preset.reps)
        self.rows: dict[tuple[Case, str], Row] = {}
        self.kind = jax.devices()[0].device_kind
        self.records: list[dict[str, Any]] = []

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def run_case(self, case: Case, reps: int | None = None) -> None:
        """Measures every step of `case` not measured yet, deit_jax and timm interleaved."""
        todo = [s for s in case.steps if case_key(case, s) not in self.rows]
        if not todo:
            return
        case = dataclasses.replace(case, steps=tuple(todo), reps=case.reps or reps)
        t0 = time.perf_counter()
        js = jax_steps(case, self.preset.model_overrides, self.args.drop_path)
        fns = {f"jax-{k}": v for k, v in js.fns.items()}
        if not self.args.no_timm:
            ts = timm_steps(case, self.preset.model_overrides, self.args.drop_path, self.device)
            fns.update({f"timm-{k}": ts[k] for k in todo})
        res = self.runner.measure(fns, case.reps)
        for step in todo:
            t = res.get(f"timm-{step}")
            row = Row(
                case,
                step,
                res[f"jax-{step}"].median,
                None if t is None else t.median,
                None if t is None else min(t.seconds) / min(res[f"jax-{step}"].seconds),
                js.flops[step],
                res[f"jax-{step}"].memory,
                js.plan_bytes[step],
                None if t is None else t.memory,
            )
            self.rows[case_key(case, step)] = row
            self.records.append(
                {
                    "model": MODELS[case.size],
                    "attention": case.attention,
                    "remat": case.remat,
                    "res": case.res,
                    "precision": case.precision,
                    "batch": case.batch,
                    "step": step,
                    "jax_seconds": res[f"jax-{step}"].seconds,
                    "timm_seconds": None if t is None else t.seconds,
                    "flops_per_step": js.flops[step],
                }
            )
            ratio = "" if t is None else f", x{row.timm_s / row.jax_s:.2f} vs timm"
            self.log(
                f"{case.label} {case.res} {case.precision} b{case.batch} {step}: "
                f"{case.batch / row.jax_s:.1f} img/s{ratio}"
            )
        del js, fns
        gc.collect()
        if self.gpu:
            torch.cuda.empty_cache()
        self.log(f"  ({time.perf_counter() - t0:.0f} s with compilation)")

    def peak_tflops(self, precision: str) -> float | None:
        if not self.gpu:
            return None
        if self.args.peak_tflops:
            return self.args.peak_tflops * (1.0 if precision == "bf16" else 0.5)
        for kind, peaks in PEAK_TFLOPS.items():
            if kind in self.kind:
                return peaks[precision]
        return None

    def main_table(self) -> str:
        lines = [
            "| model | res | precision | batch | step | deit_jax img/s | timm img/s "
            "| deit_jax/timm | (fastest rounds) | XLA GFLOP/img | deit_jax TFLOP/s | MFU "
            "| mem deit_jax MiB | mem timm MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for case in self.preset.main:
            for step in case.steps:
                r = self.rows[case_key(case, step)]
                tflops = ratio(r.flops, r.jax_s * 1e12)
                peak = self.peak_tflops(case.precision)
                mfu = ratio(tflops, peak)
                jax_mem = r.jax_plan if self.gpu else r.jax_mem
                lines.append(
                    f"| {case.label}{'*' if case.reps else ''} | {case.res} | {case.precision} "
                    f"| {case.batch} | {step} "
                    f"| {fmt(case.batch / r.jax_s)} "
                    f"| {fmt(None if r.timm_s is None else case.batch / r.timm_s)} "
                    f"| {fmt(ratio(r.timm_s, r.jax_s), 2)} | {fmt(r.min_ratio, 2)} "
                    f"| {fmt(ratio(r.flops, case.batch * 1e9), 2)} | {fmt(tflops, 3)} "
                    f"| {'-' if mfu is None else f'{100 * mfu:.1f}%'} "
                    f"| {mib(jax_mem)} | {mib(r.timm_mem)} |"
                )
        return "\n".join(lines)

    def scaling_table(self, cases: tuple[Case, ...], what: str) -> str:
        lines = [
            f"| {what} | step | deit_jax ms | x time | timm ms | x time | x FLOPs (XLA) |",
            "|---|---|---|---|---|---|---|",
        ]
        base = {s: self.rows[case_key(cases[0], s)] for s in ("train",)}
        for case in cases:
            r = self.rows[case_key(case, "train")]
            b = base["train"]
            label = f"batch {case.batch}" if what == "batch" else f"{case.res}px"
            t_ms = None if r.timm_s is None else 1e3 * r.timm_s
            t_x = None if r.timm_s is None or b.timm_s is None else r.timm_s / b.timm_s
            lines.append(
                f"| {label} | train | {fmt(1e3 * r.jax_s)} | {fmt(r.jax_s / b.jax_s, 2)} "
                f"| {fmt(t_ms)} | {fmt(t_x, 2)} | {fmt(ratio(r.flops, b.flops), 2)} |"
            )
        return "\n".join(lines)

    def distill(self) -> str:
        return distillation.tables(self)

    def memory(self) -> str:
        """XLA's planned memory of the bf16 train step (forward, backward, AdamW; parameters and
        optimiser state donated), with and without `model.remat`: compile only, nothing runs."""
        sizes, batches, policies, res = self.preset.memory
        if self.args.memory_batches:
            batches = tuple(int(b) for b in self.args.memory_batches.split(","))
        lines = [
            f"XLA's memory plan on this backend ({jax.default_backend()}) for the bf16 train "
            "step (float32 parameters and AdamW state, donated), from "
            "`jax.jit(step).lower(...).compile().memory_analysis()` with abstract inputs.",
            "",
            f"Resolution {res}.",
            "",
            "| model | batch | remat | arguments GiB | temporaries GiB | total GiB "
            "| x total (no remat) | compile s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        gib = lambda b: f"{b / 2**30:,.2f}"  # noqa: E731
        for size in sizes:
            for batch in batches:
                base = None
                for policy in policies:
                    t0 = time.perf_counter()
                    m = planned_memory(size, batch, self.preset.model_overrides, policy, res)
                    total = m.argument_size_in_bytes + m.output_size_in_bytes
                    total += m.temp_size_in_bytes - m.alias_size_in_bytes
                    base = base or total
                    name = MODELS.get(size, size)
                    lines.append(
                        f"| {name} | {batch} | {policy or '-'} | {gib(m.argument_size_in_bytes)} "
                        f"| {gib(m.temp_size_in_bytes)} | {gib(total)} | {total / base:.2f} "
                        f"| {time.perf_counter() - t0:.0f} |"
                    )
                    self.log(f"memory plan {name} b{batch} remat {policy}: {gib(total)} GiB")
                    self.records.append(
                        {"section": "memory", "model": name, "batch": batch,
                         "remat": policy, "bytes": int(total)}
                    )  # fmt: skip
        return "\n".join(lines)


def planned_memory(
    size: str, batch: int, overrides: dict[str, Any], remat: str | None, res: int = 224
) -> Any:
    """`memory_analysis()` of a bf16 DeiT train step compiled for abstract inputs."""
    model = jax_model(size, "bf16", res, overrides, remat=remat).clone(drop_path_rate=0.1)
    tx = optax.adamw(1e-4, weight_decay=0.05)
    images = jax.ShapeDtypeStruct((batch, res, res, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    params = jax.eval_shape(
        lambda: meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, res, res, 3)))["params"])
    )
    opt_state = jax.eval_shape(tx.init, params)

    def train_step(params, opt_state, images, labels, key):
        def loss_fn(params):
            logits = model.apply({"params": params}, images, train=True, rngs={"dropout": key})
            logits = logits[0] if isinstance(logits, tuple) else logits
            ce = optax.softmax_cross_entropy_with_integer_labels
            return ce(logits.astype(jnp.float32), labels).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    key = jax.eval_shape(lambda: jax.random.key(0))
    lowered = jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state, images, labels, key)
    return lowered.compile().memory_analysis()


def case_key(case: Case, step: str) -> tuple:
    return (case.size, case.precision, case.batch, case.res, case.attention, case.remat, step)


# ---------------------------------------------------------------------------------------------
# Entry point.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__,
        epilog="Presets: default CPU (< 10 min on 2 cores), --gpu (one H100, a few minutes), "
        "--smoke (tiny models, checks every code path). Tables go to stdout, progress to stderr.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true", help="GPU preset (needs a JAX and a torch GPU)")
    mode.add_argument("--smoke", action="store_true", help="tiny and fast: tests the script")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for both frameworks (default: all CPUs of this process)",
    )
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default: preset's)")
    p.add_argument(
        "--drop-path",
        type=float,
        default=0.1,
        help="stochastic depth in the train steps, both frameworks (recipe: 0.1)",
    )
    p.add_argument("--no-timm", action="store_true", help="deit_jax only")
    p.add_argument(
        "--memory",
        action="store_true",
        help="CPU: also the planned-memory section (DeiT-B and DeiT III-L train steps at the GPU "
        "preset's batch sizes, with and without remat; compile only). Always on with --gpu",
    )
    p.add_argument(
        "--memory-batches",
        default="",
        help="comma list of batch sizes for the memory section (default: the preset's)",
    )
    p.add_argument(
        "--skip",
        default="",
        help="comma list of sections to skip: main,batch,resolution,distill,memory",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="dense bf16 peak of the GPU for MFU (default: H100/H200 989.4)",
    )
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="CPU: leave glibc's allocator as it is (see tune_malloc; read before parsing)",
    )
    p.add_argument("--json", default=None, help="also write the raw timings to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    preset = PRESETS["smoke" if args.smoke else "gpu" if args.gpu else "cpu"]
    if args.reps:  # every measurement
        main = tuple(dataclasses.replace(c, reps=None) for c in preset.main)
        preset = dataclasses.replace(preset, main=main, reps=args.reps, sweep_reps=args.reps)
    if args.smoke:  # tiny inputs for every case
        fix = lambda c: dataclasses.replace(c, res=32 if c.res == 224 else c.res)  # noqa: E731
        preset = dataclasses.replace(
            preset,
            main=tuple(map(fix, preset.main)),
            batch_sweep=tuple(map(fix, preset.batch_sweep)),
        )
    threads = set_threads(args.threads)
    gpu = jax.default_backend() == "gpu"
    if args.gpu and not (gpu and torch.cuda.is_available()):
        raise SystemExit(
            f"--gpu needs a GPU for both JAX (backend: {jax.default_backend()}) and torch "
            f"(cuda available: {torch.cuda.is_available()}); drop --gpu to run the CPU preset."
        )
    if gpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True  # XLA's default precision uses TF32 too
        torch.backends.cudnn.allow_tf32 = True
    skip = set(filter(None, args.skip.split(",")))
    bench = Bench(args, preset)
    started = time.perf_counter()
    device = f"{bench.kind} ({jax.default_backend()})"
    header = [
        f"# deit_jax vs timm throughput: {device}, {threads} CPU threads",
        "",
        f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
        f"torch {torch.__version__}, timm {timm.__version__}; XLA_FLAGS="
        f"'{os.environ.get('XLA_FLAGS', '')}'. Medians of {preset.reps} interleaved rounds "
        f"({preset.sweep_reps} for rows marked *, the sweeps and the distillation) "
        f"after {preset.warmup} warm-up. Train step: forward, cross-entropy, backward, AdamW, "
        f"drop path {args.drop_path}. {preset.note}",
        f"deit_jax compiles with `deit_jax.jit` (compiler options {compiler_options()}).",
        "",
        "deit_jax/timm: ratio of images/s from median times; (fastest rounds): from minimum "
        "times, less hit by other load on a shared machine (which slows timm's OpenMP threads "
        f"more than XLA's). glibc malloc tuned (tune_malloc): {bool(MALLOC_TUNED)}. Memory: "
        + (
            "deit_jax = XLA's plan (arguments + outputs + temporaries - donated); "
            "timm = torch.cuda.max_memory_allocated."
            if jax.default_backend() == "gpu"
            else "growth of the process RSS during each framework's first (warm-up) step "
            "(timm's includes allocating AdamW's state)."
        ),
    ]
    print("\n".join(header) + "\n", flush=True)
    sections = [
        (
            "main",
            "## Throughput",
            lambda: [bench.run_case(c) for c in preset.main],
            bench.main_table,
        ),
        (
            "batch",
            "## Step time against batch size",
            lambda: [bench.run_case(c, preset.sweep_reps) for c in preset.batch_sweep],
            lambda: bench.scaling_table(preset.batch_sweep, "batch"),
        ),
        (
            "resolution",
            "## Step time against resolution",
            lambda: [bench.run_case(c, preset.sweep_reps) for c in preset.resolution],
            lambda: bench.scaling_table(preset.resolution, "resolution"),
        ),
        ("distill", "## Distillation overhead", lambda: None, bench.distill),
        ("memory", "## Planned memory with and without remat", lambda: None, bench.memory),
    ]
    if not (args.gpu or args.smoke or args.memory):
        skip.add("memory")  # CPU: only on request (about 18 large compilations)
    for name, title, run, table in sections:
        if name in skip:
            continue
        run()
        text = f"{title}\n\n{table()}"
        print(text + "\n", flush=True)
    footer = f"Total wall time {time.perf_counter() - started:.0f} s."
    if gpu:
        stats = jax.devices()[0].memory_stats() or {}
        footer += f" JAX device peak {mib(stats.get('peak_bytes_in_use'))} MiB (process-wide)."
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        footer += f" Process peak RSS {mib(peak)} MiB."
    print(footer)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "threads": threads, "rows": bench.records}, f, indent=1)


if __name__ == "__main__":
    main()
