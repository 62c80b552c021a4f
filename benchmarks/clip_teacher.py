"""The CLIP teacher's speed: deit_jax's Flax CLIP against open_clip's PyTorch CLIP, in one run.

Prints a Markdown table, one row per measurement (each made by one `*_row` function, listed in
`ROWS`), with deit_jax's and the reference's milliseconds per call and the ratio reference /
deit_jax (above 1: deit_jax is faster).

- `image tower`: `encode_image` of the ViT-B/32 image tower, float32, batch 8 at 224 px: deit_jax
  jitted against open_clip's `model.visual` under `torch.inference_mode()` (its fastest CPU
  path: the fused attention kernels of `nn.MultiheadAttention`), random weights converted from
  the open_clip model by `deit_jax.convert` (`deit_jax.weights`).

Usage (from the repository root):

    python benchmarks/clip_teacher.py             # ViT-B/32, batch 8; about a minute on 2 cores
    python benchmarks/clip_teacher.py --smoke     # a tiny CLIP, a few seconds: the code paths

Method as in benchmarks/throughput.py: inputs already on the device, every function warmed up
(and compiled) first, then deit_jax and the reference timed in turn, round after round, so a
noisy shared machine slows both alike; the table gives medians (and the ratio of the fastest
rounds). Both frameworks get the same number of threads, and glibc's allocator is tuned for the
whole process first (`tune_malloc`, see benchmarks/NOTES.md; `--default-malloc` skips it).
"""

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from typing import Any

import timing  # benchmarks/timing.py: a script's own folder is on sys.path

MALLOC_TUNED = "--default-malloc" not in sys.argv[1:] and timing.tune_malloc()
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# torch and open_clip before deit_jax (TensorFlow first would crash torchvision: _compat.py).
import open_clip  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from deit_jax import convert  # noqa: E402
from deit_jax.jit import jit  # noqa: E402
from deit_jax.models import create_model  # noqa: E402
from deit_jax.weights.clip import open_clip_overrides  # noqa: E402

SMOKE_CLIP = dict(
    embed_dim=32,
    vision_cfg=dict(layers=2, width=64, patch_size=8, image_size=32),
    text_cfg=dict(layers=1, width=64, heads=1, context_length=77, vocab_size=49408),
)


def open_clip_model(args: argparse.Namespace) -> torch.nn.Module:
    """open_clip's ViT-B-32 (random weights, exact GELU), or a tiny CLIP with --smoke."""
    torch.manual_seed(0)
    if args.smoke:
        return open_clip.model.CLIP(**SMOKE_CLIP).eval()
    return open_clip.create_model("ViT-B-32", pretrained=None).eval()


def timed(fns: dict[str, Callable[[], Any]], warmup: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each function, interleaved round by round after `warmup` calls."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    return timing.interleaved(fns, rounds)


def image_tower_row(args: argparse.Namespace, reference: torch.nn.Module) -> dict[str, Any]:
    """deit_jax's jitted `encode_image` against open_clip's `model.visual`."""
    state = reference.state_dict()
    variables = convert.torch_to_flax(state, "clip_vit_b32")
    sizes = open_clip_overrides(state)
    model = create_model("clip_vit_b32", **sizes)
    size = sizes["img_size"]
    images = np.random.default_rng(0).standard_normal((args.batch, 3, size, size), np.float32)
    x_jax = jax.device_put(jnp.asarray(images.transpose(0, 2, 3, 1)))
    x_torch = torch.from_numpy(images)
    encode = jit(lambda v, x: model.apply(v, x, method="encode_image"))

    def run_jax():
        return encode(variables, x_jax).block_until_ready()

    def run_torch():
        with torch.inference_mode():
            return reference.visual(x_torch)

    with torch.inference_mode():  # the same function, before timing it
        err = np.linalg.norm(np.asarray(run_jax()) - run_torch().numpy())
        err /= np.linalg.norm(run_torch().numpy())
    times = timed({"deit_jax": run_jax, "reference": run_torch}, args.warmup, args.rounds)
    name = "tiny CLIP (smoke)" if args.smoke else "ViT-B/32"
    return dict(
        row=f"{name} image tower, float32, batch {args.batch}",
        reference_name="open_clip",
        times=times,
        note=f"rel. L2 difference {err:.1e}",
    )


_STEPS: dict[int, dict[str, list[float]]] = {}


def _teacher_steps(args: argparse.Namespace, reference: torch.nn.Module) -> dict[str, list]:
    """deit_jax's train step of a plain DeiT-Ti (the config recipe's student, soft KD,
    batchmean, AdamW): without a teacher, with the zero-shot CLIP teacher live in the step (its
    image tower, converted from `reference`, and a (D, 1000) head), and fed that teacher's cached
    top-10 (float16 storage) from the batch. Timed interleaved, once for both rows."""
    if id(reference) in _STEPS:
        return _STEPS[id(reference)]
    from flax.core import meta

    from deit_jax import config as deit_config
    from deit_jax.teacher.clip import zero_shot
    from deit_jax.teacher.forward import teacher_logits
    from deit_jax.train import optim, steps
    from deit_jax.train.state import init_state

    state_dict = reference.state_dict()
    sizes = open_clip_overrides(state_dict)
    clip_vars = convert.torch_to_flax(state_dict, "clip_vit_b32")
    size, classes = sizes["img_size"], 1000
    smoke = {"depth": 2} if args.smoke else {}  # --smoke: the code paths, quickly
    student = create_model("deit_tiny_patch16_224", img_size=size, num_classes=classes, **smoke)
    teacher = zero_shot.ZeroShotCLIP(
        clip=create_model("clip_vit_b32", **sizes),
        num_classes=classes,
        img_size=(size, size),
        input_mean=(0.485, 0.456, 0.406),
        input_std=(0.229, 0.224, 0.225),
    )
    rng = np.random.default_rng(0)
    head = rng.standard_normal((sizes["embed_dim"], classes)).astype(np.float32)
    head /= np.linalg.norm(head, axis=0, keepdims=True)  # a stand-in for the text tower's W
    t_vars = {"params": {"clip": clip_vars["params"], "zero_shot_head": jnp.asarray(head)}}
    config = deit_config.base_config()
    config.distillation.alpha, config.distillation.kl_reduction = 1.0, "batchmean"
    tx, schedule = optim.create_optimizer(
        config.optim, global_batch_size=1024, steps_per_epoch=1000, num_epochs=300
    )
    labels = rng.integers(0, classes, size=(args.batch,))
    batch = {
        "image": jnp.asarray(rng.standard_normal((args.batch, size, size, 3), np.float32)),
        "label": jnp.asarray(labels.astype(np.int32)),
        "target": jnp.asarray(np.eye(classes, dtype=np.float32)[labels]),
    }
    top = jit(lambda v, x: jax.lax.top_k(jax.nn.log_softmax(teacher_logits(teacher, v, x)), 10))
    logp, index = top(t_vars, batch["image"])
    cached = {**batch, "teacher_logp": jnp.asarray(logp, jnp.float16).astype(jnp.float32)}
    cached["teacher_index"] = index
    init = jit(lambda: init_state(student, tx, jax.random.key(0), ema=True))
    fns = {}
    for name, kind, cache_dir, data_in in (
        ("plain", "none", "", batch),
        ("live", "soft", "", batch),
        ("cached", "soft", "(batches bring the top-k)", cached),
    ):
        config.distillation.kind, config.teacher.cache = kind, cache_dir
        live = name == "live"
        step = steps.make_train_step(student, tx, schedule, config, teacher if live else None)
        tv = t_vars if live else {}
        compiled = jit(step, donate_argnums=(0,)).lower(meta.unbox(init()), tv, data_in)
        box = {"state": meta.unbox(init()), "fn": compiled.compile()}

        def run(box=box, tv=tv, data_in=data_in):
            box["state"], metrics = box["fn"](box["state"], tv, data_in)
            jax.block_until_ready(metrics)

        fns[name] = run
    _STEPS[id(reference)] = timed(fns, args.warmup, args.rounds)
    return _STEPS[id(reference)]


def _step_row(kind: str) -> Callable[[argparse.Namespace, torch.nn.Module], dict[str, Any]]:
    def row(args: argparse.Namespace, reference: torch.nn.Module) -> dict[str, Any]:
        times = _teacher_steps(args, reference)
        what = "top-10 from the batch" if kind == "cached" else "run in the step"
        ratio = statistics.median(times[kind]) / statistics.median(times["plain"])
        name = "tiny CLIP (smoke)" if args.smoke else "ViT-B/32"
        return dict(
            row=f"DeiT-Ti train step, {kind} {name} zero-shot teacher ({what}), batch {args.batch}",
            reference_name="plain step (no teacher)",
            times={"deit_jax": times[kind], "reference": times["plain"]},
            note=f"{kind} / plain step time: {ratio:.2f}x",
        )

    return row


ROWS: dict[str, Callable[[argparse.Namespace, torch.nn.Module], dict[str, Any]]] = {
    "tower": image_tower_row,
    "cached_step": _step_row("cached"),
    "live_step": _step_row("live"),
}


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| measurement | deit_jax ms | reference | reference ms | ratio (ref / deit_jax) "
        "| (fastest rounds) | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        jax_ms = 1e3 * statistics.median(r["times"]["deit_jax"])
        ref_ms = 1e3 * statistics.median(r["times"]["reference"])
        fastest = min(r["times"]["reference"]) / min(r["times"]["deit_jax"])
        lines.append(
            f"| {r['row']} | {jax_ms:,.1f} | {r['reference_name']} | {ref_ms:,.1f} | "
            f"{ref_ms / jax_ms:.2f} | {fastest:.2f} | {r.get('note', '')} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CLIP, 1 round: code paths")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="default: the CPU affinity")
    parser.add_argument("--only", default=",".join(ROWS), help=f"rows, of {','.join(ROWS)}")
    parser.add_argument("--json", default=None, help="also write the raw timings here")
    parser.add_argument("--default-malloc", action="store_true", help="skip tune_malloc")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.smoke else 15
    if args.smoke:
        args.warmup, args.batch = 1, min(args.batch, 2)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    if args.threads:  # XLA's CPU thread pool follows the affinity
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:threads]))
    torch.set_num_threads(threads)
    reference = open_clip_model(args)
    rows = [ROWS[name](args, reference) for name in args.only.split(",") if name]
    print(
        f"# CLIP teacher speed ({threads} threads, malloc tuned: {MALLOC_TUNED}, "
        f"{args.rounds} rounds, load {os.getloadavg()[0]:.1f} at the end)\n"
    )
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in r.items()} for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
