"""The measured steps of benchmarks/throughput.py: a DeiT train step (forward, backward, AdamW)
and inference, in deit_jax (jitted, buffers donated) and in timm (eager, fused AdamW), for one
`Case` (a DeiT size at a resolution, precision and batch size), on fixed random data. (No
TensorFlow is imported here, so the order of torch and deit_jax does not matter.)
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import timm
import torch
from flax.core import meta
from timing import xla_bytes, xla_flops

import deit_jax
from deit_jax.jit import jit

MODELS = {
    "Ti": "deit_tiny_patch16_224",
    "S": "deit_small_patch16_224",
    "B": "deit_base_patch16_224",
}
DTYPES = {"float32": (jnp.float32, torch.float32), "bf16": (jnp.bfloat16, torch.bfloat16)}


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured configuration: a DeiT size at a resolution, precision and batch size."""

    size: str  # key of MODELS
    precision: str  # key of DTYPES
    batch: int
    res: int = 224
    steps: tuple[str, ...] = ("train", "infer")
    reps: int | None = None  # timed rounds; None: the preset's
    attention: str | None = None  # deit_jax's model.attention ("xla" | "cudnn"; None: default)
    remat: str | None = None  # deit_jax's model.remat (a jax.checkpoint_policies name)

    @property
    def label(self) -> str:
        extra = [f"attention {self.attention}"] * bool(self.attention)
        extra += [f"remat {self.remat}"] * bool(self.remat)
        return f"DeiT-{self.size}" + (f" ({', '.join(extra)})" if extra else "")


def jax_model(size: str, precision: str, res: int, overrides: dict[str, Any], **kernels: Any):
    name = MODELS.get(size, size)
    kernels = {k: v for k, v in kernels.items() if v is not None}  # attention, remat
    return deit_jax.create_model(
        name, img_size=res, dtype=DTYPES[precision][0], **overrides, **kernels
    )


@dataclasses.dataclass
class JaxSteps:
    fns: dict[str, Callable[[], Any]]
    flops: dict[str, float | None]  # per step
    plan_bytes: dict[str, int | None]


def jax_steps(case: Case, overrides: dict[str, Any], drop_path: float, seed: int = 0) -> JaxSteps:
    """Compiled deit_jax train and inference steps on fixed random data."""
    model = jax_model(
        case.size,
        case.precision,
        case.res,
        overrides,
        attention=case.attention,
        remat=case.remat,
    )
    model = model.clone(drop_path_rate=drop_path)
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(case.batch, case.res, case.res, 3)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, model.num_classes, size=(case.batch,)).astype(np.int32))
    params = jit(lambda: meta.unbox(model.init(jax.random.key(seed), images[:1])["params"]))()
    tx = optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05)
    key = jax.random.key(seed + 1)

    def loss_fn(params, images, labels, key):
        logits = model.apply({"params": params}, images, train=True, rngs={"dropout": key})
        logits = logits[0] if isinstance(logits, tuple) else logits
        loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
        return loss.mean()

    def train_step(params, opt_state, images, labels, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def infer(params, images):
        return model.apply({"params": params}, images, train=False)

    state = {"params": params, "opt": jit(tx.init)(params)}
    fns, flops, plan = {}, {}, {}
    if "train" in case.steps:
        lowered = jit(train_step, donate_argnums=(0, 1)).lower(
            state["params"], state["opt"], images, labels, key
        )
        compiled = lowered.compile()
        flops["train"], plan["train"] = xla_flops(lowered), xla_bytes(compiled)

        def run_train():
            state["params"], state["opt"], loss = compiled(
                state["params"], state["opt"], images, labels, key
            )
            loss.block_until_ready()

        fns["train"] = run_train
    if "infer" in case.steps:
        lowered = jit(infer).lower(state["params"], images)
        compiled_infer = lowered.compile()
        flops["infer"], plan["infer"] = xla_flops(lowered), xla_bytes(compiled_infer)
        fns["infer"] = lambda: compiled_infer(state["params"], images).block_until_ready()
    return JaxSteps(fns, flops, plan)


def timm_steps(case: Case, overrides: dict[str, Any], drop_path: float, device: str, seed: int = 0):
    """timm train and inference steps: eager, fused AdamW, autocast for bf16."""
    torch.manual_seed(seed)
    model = timm.create_model(
        MODELS[case.size],
        pretrained=False,
        img_size=case.res,
        drop_path_rate=drop_path,
        **overrides,
    ).to(device)
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(
        rng.normal(size=(case.batch, 3, case.res, case.res)).astype(np.float32)
    )
    images = images.to(device)
    labels = torch.from_numpy(rng.integers(0, model.num_classes, size=(case.batch,))).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    bf16 = case.precision == "bf16"
    autocast = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def train():
        model.train()
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        sync()

    def infer():
        model.eval()
        with torch.inference_mode(), autocast():
            model(images)
        sync()

    return {"train": train, "infer": infer}
