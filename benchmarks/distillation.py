"""The distillation section of benchmarks/throughput.py: deit_jax's real train step for a
distilled student (plain, live teacher, cached teacher; feature distillation live and from cached
embeddings), timm's own `TokenDistillationTask` step,
the teacher's forward alone in both frameworks and the cache writer's work per batch."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import timm
import torch
from flax.core import meta
from timing import fmt, ratio, xla_flops

import deit_jax
from deit_jax import config as deit_config
from deit_jax.jit import jit
from deit_jax.models import model_options
from deit_jax.teacher.forward import teacher_features, teacher_logits
from deit_jax.train import optim, steps
from deit_jax.train.projection import build_projection
from deit_jax.train.state import init_state


def tables(bench: Any) -> str:
    """The distillation table at the preset's batch and at each of `distill_batches`."""
    batches = (bench.preset.distill[3], *bench.preset.distill_batches)
    if len(batches) == 1:
        return _table(bench, batches[0])
    return "\n\n".join(f"### Batch {b}\n\n{_table(bench, b)}" for b in batches)


def _table(bench: Any, batch: int) -> str:
    """deit_jax's real train step for a distilled student: plain, with the frozen teacher
    live, and reading the teacher's cached top-k (`deit_jax.teacher.cache`); timm's own
    `TokenDistillationTask` step with the same models; the teacher's forward alone in both
    frameworks; the cache writer's work per batch."""
    student_name, teacher_name, precision, _ = bench.preset.distill
    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    s_over = dict(bench.preset.model_overrides, dtype=dtype)
    t_over = dict(bench.preset.teacher_overrides)
    if "dtype" in model_options(teacher_name):
        t_over["dtype"] = dtype
    if bench.args.smoke:
        s_over["img_size"] = t_over["img_size"] = 32
    student = deit_jax.create_model(student_name, **s_over)
    teacher = deit_jax.create_model(teacher_name, **t_over)
    res, topk = student.img_size, 10
    config = deit_config.base_config()
    config.distillation.alpha, config.distillation.tau = 0.5, 1.0
    # The learning-rate schedule of the reference batch (1024): its values do not change speed.
    tx, schedule = optim.create_optimizer(
        config.optim, global_batch_size=1024, steps_per_epoch=1000, num_epochs=300
    )
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(batch, res, res, 3)).astype(np.float32))
    labels = rng.integers(0, 1000, size=(batch,))
    batch_data = {
        "image": images,
        "label": jnp.asarray(labels.astype(np.int32)),
        "target": jnp.asarray(np.eye(1000, dtype=np.float32)[labels] * 0.9 + 0.1 / 1000),
    }
    t_vars = jit(lambda: meta.unbox(teacher.init(jax.random.key(1), images[:1], train=False)))()
    t_vars = {k: v for k, v in t_vars.items() if k != "intermediates"}
    top = jit(lambda v, x: jax.lax.top_k(jax.nn.log_softmax(teacher_logits(teacher, v, x)), topk))
    logp, index = top(t_vars, images)
    # What the cache reader puts in a batch (float16 storage, read back as float32).
    cached_batch = {
        **batch_data,
        "teacher_logp": jnp.asarray(np.asarray(logp, np.float16), jnp.float32),
        "teacher_index": index,
    }

    # Feature distillation: the teacher's pooled features live, or (float16 storage) from the
    # batch, through the learned projection to the teacher's width.
    features = jit(lambda v, x: teacher_features(teacher, v, x))(t_vars, images)
    feature_batch = {
        **batch_data,
        "teacher_embedding": jnp.asarray(np.asarray(features, np.float16), jnp.float32),
    }
    projection = build_projection(student, int(features.shape[-1]))

    fns, flops = {}, {}
    for name, kind, cache_dir, data_in in (
        ("none", "none", "", batch_data),
        ("hard", "hard", "", batch_data),
        ("cached", "hard", "(batches bring the top-k)", cached_batch),
        ("feature", "feature", "", batch_data),
        ("feature_cached", "feature", "(batches bring the embedding)", feature_batch),
    ):
        config.distillation.kind, config.teacher.cache = kind, cache_dir
        live = name in ("hard", "feature")
        proj = projection if kind == "feature" else None
        step = steps.make_train_step(student, tx, schedule, config, teacher if live else None, proj)
        init = jit(
            lambda p=proj: init_state(student, tx, jax.random.key(0), ema=True, projection=p)
        )
        state = meta.unbox(init())  # a fresh state for each: the steps donate theirs
        tv = t_vars if live else {}
        lowered = jit(step, donate_argnums=(0,)).lower(state, tv, data_in)
        compiled = lowered.compile()
        flops[name] = xla_flops(lowered)
        box = {"state": state}

        def run(compiled=compiled, box=box, tv=tv, data_in=data_in):
            box["state"], metrics = compiled(box["state"], tv, data_in)
            jax.block_until_ready(metrics)

        fns[name] = run
    fns.update(cache_writer_fns(teacher, t_vars, images, top, topk))
    if not bench.args.no_timm:
        fns["timm_hard"] = timm_distill_step(student_name, teacher_name, s_over, batch, res)
        fns["timm_teacher_forward"] = timm_teacher_forward(teacher_name, batch, res)
    # Forward FLOPs of each network alone: the analytic ratio is (3 S + T) / 3 S.
    s_vars = {"params": state.params}
    s_fwd = xla_flops(jit(lambda v, x: student.apply(v, x, train=False)).lower(s_vars, images))
    t_fwd = xla_flops(jit(lambda v, x: teacher.apply(v, x, train=False)).lower(t_vars, images))
    load_before = os.getloadavg()[0]
    res_t = bench.runner.measure(fns, bench.preset.sweep_reps)
    med = {k: v.median for k, v in res_t.items()}
    plain, dist, cached = med["none"], med["hard"], med["cached"]
    fastest = lambda a, b: min(res_t[a].seconds) / min(res_t[b].seconds)  # noqa: E731
    bench.records.append({"section": "distill", "batch": batch, "seconds": med})
    bench.log(
        f"distillation: plain {batch / plain:.1f} img/s, live teacher {batch / dist:.1f}, "
        f"cached {batch / cached:.1f}"
    )
    analytic = None if s_fwd is None or t_fwd is None else (3 * s_fwd + t_fwd) / (3 * s_fwd)
    timm_t = med.get("timm_hard")
    rows = [
        ("plain (kind none)", plain, flops["none"], 1.0),
        ("distilled, live teacher (kind hard)", dist, flops["hard"], analytic),
        ("distilled, cached teacher (kind hard)", cached, flops["cached"], 1.0),
        ("feature distillation, live teacher", med["feature"], flops["feature"], analytic),
        (
            "feature distillation, cached embeddings",
            med["feature_cached"],
            flops["feature_cached"],
            1.0,
        ),
    ]
    lines = [
        f"Student {student_name}, teacher {teacher_name} (frozen, eval mode, stop_gradient), "
        f"{precision}, batch {batch}, `deit_jax.train.steps.make_train_step` (AdamW + EMA); "
        f"cached: the same step fed the teacher's top-{topk} (float16 storage) from the batch.",
        "",
        "| step | img/s | ms | x time | x FLOPs (XLA, step) | x FLOPs (3 S + T) / 3 S "
        "| deit_jax / timm distillation (img/s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, t, fl, predicted in rows:
        lines.append(
            f"| {label} | {fmt(batch / t)} | {fmt(1e3 * t)} | {t / plain:.2f} "
            f"| {fmt(ratio(fl, flops['none']), 2)} | {fmt(predicted, 2)} "
            f"| {fmt(ratio(timm_t, t), 2) if timm_t else '-'} |"
        )
    if timm_t:
        lines.append(
            f"| timm `TokenDistillationTask`, live teacher (hard) | {fmt(batch / timm_t)} "
            f"| {fmt(1e3 * timm_t)} | {timm_t / plain:.2f} | - | - | 1.00 |"
        )
    per_example = {k: k * (2 + 2) for k in (1, 10)}  # float16 values + int16 indices
    imagenet = 1_281_167 * 300
    lines += [
        "",
        f"Live / cached step time: {dist / cached:.2f}x; cached / plain: {cached / plain:.2f}x. "
        f"Feature distillation, live / cached: {med['feature'] / med['feature_cached']:.2f}x; "
        f"cached / plain: {med['feature_cached'] / plain:.2f}x (embedding width "
        f"{features.shape[-1]}, float16: {2 * features.shape[-1]} B per example per epoch).",
        f"Forward GFLOP/img (XLA): student {fmt(ratio(s_fwd, batch * 1e9), 2)}, "
        f"teacher {fmt(ratio(t_fwd, batch * 1e9), 2)}.",
        "",
        "Cache writer, per batch (the input pipeline, shared with training, not counted):",
        "",
        "| work | img/s |",
        "|---|---|",
        f"| teacher forward alone | {fmt(batch / med['teacher_forward'])} |",
        f"| writer: forward + top-{topk} + copy to host + zarr write "
        f"| {fmt(batch / med['cache_writer'])} |",
        *(
            [
                f"| timm teacher forward alone (`torch.no_grad`) "
                f"| {fmt(batch / med['timm_teacher_forward'])} |",
                "",
                f"Teacher forward, deit_jax / timm (img/s): median "
                f"{med['timm_teacher_forward'] / med['teacher_forward']:.2f}, fastest rounds "
                f"{fastest('timm_teacher_forward', 'teacher_forward'):.2f}; live "
                f"distillation step, fastest rounds {fastest('timm_hard', 'hard'):.2f}. "
                f"Load average (1 min) before / after: {load_before:.1f} / "
                f"{os.getloadavg()[0]:.1f}.",
            ]
            if "timm_teacher_forward" in med
            else []
        ),
        "",
        "Storage (float16 values + int16 indices): "
        + ", ".join(f"k = {k}: {b} B per example per epoch" for k, b in per_example.items())
        + "; ImageNet-1k x 300 epochs: "
        + ", ".join(f"k = {k}: {b * imagenet / 1e9:.1f} GB" for k, b in per_example.items())
        + " (TinyViT, k = 10 with its 4-byte seed per record: 16 GB).",
    ]
    return "\n".join(lines)


def cache_writer_fns(teacher, t_vars, images, top, topk) -> dict[str, Callable]:
    """The teacher forward alone, and the writer's work for one batch (chunk of 1 step)."""
    import tempfile

    import tensorstore as ts

    forward = jit(lambda v, x: teacher_logits(teacher, v, x))
    batch = images.shape[0]
    directory = tempfile.mkdtemp(prefix="deit_jax_bench_cache_")
    spec = {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": directory},
        "metadata": {
            "shape": [1000, batch, topk],
            "data_type": "float16",
            "chunk_grid": {
                "name": "regular",
                "configuration": {"chunk_shape": [1, batch, topk]},
            },
            "codecs": [{"name": "bytes"}, {"name": "crc32c"}],
        },
    }
    store = ts.open(spec, create=True, delete_existing=True).result()
    position = {"step": 0}

    def write():
        logp, index = top(t_vars, images)
        step = position["step"] % 1000
        store[step].write(np.asarray(logp, np.float16)).result()
        np.asarray(index, np.int16)
        position["step"] += 1

    return {
        "teacher_forward": lambda: jax.block_until_ready(forward(t_vars, images)),
        "cache_writer": write,
    }


def timm_distill_step(
    student_name: str, teacher_name: str, overrides: dict[str, Any], batch: int, res: int
) -> Callable[[], None]:
    """timm's own DeiT distillation step: `timm.task.TokenDistillationTask`, hard, eager."""
    from timm.task import TokenDistillationTask

    torch.manual_seed(0)
    kw = {k: v for k, v in overrides.items() if k not in ("dtype", "img_size")}
    student = timm.create_model(student_name, pretrained=False, img_size=res, **kw)
    teacher = timm.create_model(teacher_name, pretrained=False).eval()
    task = TokenDistillationTask(
        student, teacher, criterion=torch.nn.CrossEntropyLoss(), distill_type="hard",
        task_loss_weight=0.5, verbose=False,
    )  # fmt: skip
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.normal(size=(batch, 3, res, res)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 1000, size=(batch,)))

    def train():
        student.train()
        opt.zero_grad(set_to_none=True)
        task(images, labels)["loss"].backward()
        opt.step()

    return train


def timm_teacher_forward(teacher_name: str, batch: int, res: int) -> Callable[[], None]:
    """timm's teacher alone: eval mode, `torch.no_grad`, as `TokenDistillationTask` runs it."""
    torch.manual_seed(0)
    teacher = timm.create_model(teacher_name, pretrained=False).eval()  # as timm_distill_step
    images = torch.from_numpy(
        np.random.default_rng(0).normal(size=(batch, 3, res, res)).astype(np.float32)
    )

    def forward():
        with torch.no_grad():
            teacher(images)

    return forward
