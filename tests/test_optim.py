"""Optimiser, schedule, weight-decay mask and EMA against the PyTorch reference (timm, float32)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import timm.optim
import torch
from flax import traverse_util
from timm.models.deit import VisionTransformerDistilled
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV2

import deit_jax
from deit_jax import config as config_lib
from deit_jax import convert
from deit_jax.config import rules
from deit_jax.train import optim

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
ATOL = 1e-6  # absolute, float32 parameters of magnitude <= ~1


@pytest.fixture(scope="module")
def tiny():
    """Boxed Flax params of a tiny distilled DeiT and the same weights in timm's model.

    The tree comes from `eval_shape(model.init)` (the real names, boxes and shapes) filled with
    random values: compiling `model.init` costs ~15 s on CPU and these tests only need the tree.
    """
    model = deit_jax.create_model("deit_tiny_distilled_patch16_224", **TINY)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    rng = np.random.default_rng(0)

    def fill(path, spec):
        name = path[-2].key if isinstance(path[-1], jax.tree_util.GetAttrKey) else path[-1].key
        value = rng.normal(size=spec.shape) * (0.1 if name == "scale" else 0.02)
        return jnp.asarray(value + (name == "scale"), spec.dtype)

    params = jax.tree_util.tree_map_with_path(fill, shapes["params"])
    torch_model = VisionTransformerDistilled(**TINY)
    torch_model.load_state_dict(convert.flax_to_torch({"params": params}))
    return params, torch_model


def _optim_config(**overrides):
    c = config_lib.base_config().optim
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def reference_param_groups(model, weight_decay):
    """The reference's weight-decay groups (timm `add_weight_decay`, as DeiT's main.py uses)."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if len(param.shape) == 1 or name.endswith(".bias") or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def test_weight_decay_mask_names(tiny):
    params, torch_model = tiny
    mask = traverse_util.flatten_dict(nn.meta.unbox(optim.weight_decay_mask(params)))
    decayed = {"/".join(k) for k, v in mask.items() if v}
    assert decayed == {"/".join(k) for k in mask if k[-1] == "kernel"}, decayed
    for name in ("cls_token", "dist_token", "pos_embed"):
        assert mask[(name,)] is False
    for path in [("norm", "scale"), ("blocks_1", "norm2", "bias"), ("head_dist", "bias")]:
        assert mask[path] is False
    # Same split as the reference groups on timm's parameter names.
    groups = reference_param_groups(torch_model, 0.05)
    assert len(groups[1]["params"]) == len(decayed)
    assert len(groups[0]["params"]) == len(mask) - len(decayed)
    # Boxed and unboxed params give the same mask.
    unboxed = traverse_util.flatten_dict(optim.weight_decay_mask(nn.meta.unbox(params)))
    assert unboxed == mask


def _random_grads(params, step, scale):
    """Gradients with magnitudes in [0.5, 1.5] * scale and a sign fixed per element.

    Fixed signs keep averaged micro-batch gradients away from zero, where Adam's first update
    g / (|g| + eps) would amplify float32 rounding far above the tolerance.
    """
    sign_rng, rng = np.random.default_rng(99), np.random.default_rng(100 + step)

    def grad(p):
        sign = np.where(sign_rng.uniform(size=p.shape) < 0.5, -1.0, 1.0)
        return (sign * rng.uniform(0.5, 1.5, size=p.shape) * scale).astype(np.float32)

    return jax.tree.map(grad, params)


# The reference recipe (no clipping), and clipping on gradients accumulated over 2 batches.
@pytest.mark.parametrize("clip, accum", [(0.0, 1), (0.5, 2)])
def test_adamw_matches_torch(tiny, clip, accum):
    boxed, torch_model = tiny
    params = nn.meta.unbox(boxed)
    torch_model = VisionTransformerDistilled(**TINY)  # a fresh copy: this test steps it
    torch_model.load_state_dict(convert.flax_to_torch({"params": params}))
    lr, wd, steps = 1e-2, 0.5, 4  # large decay so a wrong mask shows far above the tolerance
    cfg = _optim_config(
        lr=lr / accum, weight_decay=wd, warmup_epochs=0, min_lr=lr, clip_grad_norm=clip
    )
    cfg.grad_accum_steps = accum
    tx, schedule = optim.create_optimizer(
        cfg, global_batch_size=cfg.lr_batch_base, steps_per_epoch=10, num_epochs=10
    )
    assert abs(float(schedule(3)) - lr) < 1e-9  # constant: peak == min_lr, no warmup
    torch_opt = torch.optim.AdamW(
        reference_param_groups(torch_model, wd), lr=lr, betas=(0.9, 0.999), eps=1e-8
    )
    named = dict(torch_model.named_parameters())

    @jax.jit
    def train_step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        largest = jnp.max(jnp.stack([jnp.abs(u).max() for u in jax.tree.leaves(updates)]))
        return optax.apply_updates(params, updates), state, largest

    state = jax.jit(tx.init)(params)
    for step in range(steps):
        # Gradient norms vary over steps, so clipping changes the Adam moments.
        micro = [_random_grads(params, step * accum + i, 10.0 ** (step - 2)) for i in range(accum)]
        for i, grads in enumerate(micro):
            params, state, largest = train_step(grads, state, params)
            if i < accum - 1:  # MultiSteps: no change until the k-th gradient
                assert float(largest) == 0 and int(state.mini_step) == i + 1
        mean_grad = jax.tree.map(lambda *g: sum(g) / np.float32(accum), *micro)
        for key, g in convert.flax_to_torch({"params": mean_grad}).items():
            named[key].grad = g.clone()
        if clip:
            torch.nn.utils.clip_grad_norm_(torch_model.parameters(), clip)
        torch_opt.step()

    got = convert.flax_to_torch({"params": params})
    errors = {k: (got[k] - v).abs().max().item() for k, v in torch_model.state_dict().items()}
    worst = max(errors.values())
    print(f"clip={clip} accum={accum}: max |jax - torch| after {steps} updates = {worst:.2e}")
    assert worst <= ATOL, sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    moved = (got["norm.weight"] - 1).abs().max().item()
    assert moved > 100 * ATOL  # the comparison is not vacuous


def test_schedule_values():
    cfg = _optim_config()  # lr 5e-4 / 512, warmup 5 epochs from 1e-6, min 1e-5
    spe, epochs, batch = 100, 300, 1024
    schedule = jax.jit(
        optim.learning_rate_schedule(
            cfg, global_batch_size=batch, steps_per_epoch=spe, num_epochs=epochs
        )
    )
    peak = 5e-4 * 1024 / 512
    expected = {
        0: 1e-6,  # warmup start
        250: 1e-6 + (peak - 1e-6) * 2.5 / 5,  # half-way through warmup
        500: 1e-5 + 0.5 * (peak - 1e-5) * (1 + math.cos(math.pi * 5 / 300)),  # end of warmup
        15_000: 1e-5 + 0.5 * (peak - 1e-5),  # half-way through training
        30_000: 1e-5,  # the end: min_lr
        40_000: 1e-5,  # past the end
    }
    for step, want in expected.items():
        assert float(schedule(step)) == pytest.approx(want, rel=1e-6), step

    # Epoch boundaries: timm's CosineLRScheduler, which the reference steps once per epoch.
    ref = CosineLRScheduler(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak),
        t_initial=epochs,
        lr_min=1e-5,
        warmup_t=5,
        warmup_lr_init=1e-6,
    )
    epoch_starts = jnp.arange(0, epochs + 1) * spe
    got = np.asarray(jax.vmap(schedule)(epoch_starts))
    want = np.array([ref._get_lr(e)[0] for e in range(epochs + 1)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)


def test_schedule_counts_updates_with_grad_accumulation():
    cfg = _optim_config(grad_accum_steps=4)
    schedule = optim.learning_rate_schedule(
        cfg, global_batch_size=256, steps_per_epoch=100, num_epochs=10
    )
    peak = 5e-4 * 256 * 4 / 512  # scaled for the effective batch
    assert optim.peak_learning_rate(cfg, 256) == pytest.approx(peak)
    assert float(schedule(0)) == pytest.approx(1e-6)
    # 25 updates per epoch: the end of warmup is update 125.
    want = 1e-5 + 0.5 * (peak - 1e-5) * (1 + math.cos(math.pi * 5 / 10))
    assert float(schedule(125)) == pytest.approx(want, rel=1e-6)
    assert float(schedule(250)) == pytest.approx(1e-5, rel=1e-6)


def test_ema_matches_timm(tiny):
    boxed, _ = tiny
    params = nn.meta.unbox(boxed)
    torch_model = VisionTransformerDistilled(**TINY)
    torch_model.load_state_dict(convert.flax_to_torch({"params": params}))
    torch_ema = ModelEmaV2(torch_model, decay=0.9)
    ema = params
    update = jax.jit(optim.ema_update)
    for step in range(3):
        params = jax.tree.map(lambda p, g: p + g, params, _random_grads(params, step, 0.1))
        torch_model.load_state_dict(convert.flax_to_torch({"params": params}))
        torch_ema.update(torch_model)
        ema = update(ema, params, 0.9)
    got = convert.flax_to_torch({"params": ema})
    worst = max((got[k] - v).abs().max().item() for k, v in torch_ema.module.state_dict().items())
    assert worst <= ATOL
    assert optim.ema_update(ema, params, 0.0) is params
    with pytest.raises(ValueError, match="EMA decay"):
        optim.ema_update(ema, params, 1.5)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lr", -1e-3, "config.optim.lr=-0.001: must be >= 0"),
        ("grad_accum_steps", 0, "config.optim.grad_accum_steps=0: must be an integer >= 1"),
        ("clip_grad_norm", -1.0, "config.optim.clip_grad_norm=-1.0: must be >= 0"),
        ("b2", 1.0, "config.optim.b2=1.0: must be in [0, 1)"),
        ("warmup_epochs", -1.0, "config.optim.warmup_epochs=-1.0: must be >= 0"),
        ("name", "sgd", "config.optim.name='sgd': must be 'adamw' or 'lamb'"),
    ],
)
def test_bad_config_is_refused_by_the_config_rules(key, value, message):
    # The optimiser's values are checked where every config value is, before any work.
    config = config_lib.base_config()
    config.optim[key] = value
    (problem,) = rules.problems(config, num_devices=1)
    assert problem.startswith(message), problem


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="steps_per_epoch"):
        optim.create_optimizer(
            _optim_config(), global_batch_size=64, steps_per_epoch=0, num_epochs=2
        )


def test_lamb_matches_the_reference_fused_lamb(tiny):
    """LAMB against timm's `Lamb`, its port of the apex `FusedLAMB` the DeiT III recipe ran.

    Reference options: betas (0.9, 0.999), eps from the config, the reference's weight-decay
    groups, global gradient-norm clipping at 1.0 (FusedLAMB's `max_grad_norm`, set here as
    `clip_grad_norm`), no trust ratio on the no-decay group (`always_adapt=False`). The
    gradients' norms grow past 1 over the steps, so the clipping is exercised.
    """
    boxed, _ = tiny
    params = nn.meta.unbox(boxed)
    torch_model = VisionTransformerDistilled(**TINY)
    torch_model.load_state_dict(convert.flax_to_torch({"params": params}))
    lr, wd, steps = 1e-2, 0.5, 4
    cfg = _optim_config(
        name="lamb", lr=lr, weight_decay=wd, warmup_epochs=0, min_lr=lr, clip_grad_norm=1.0
    )
    cfg.unscale_lr = True
    tx, schedule = optim.create_optimizer(
        cfg, global_batch_size=64, steps_per_epoch=10, num_epochs=10
    )
    assert abs(float(schedule(3)) - lr) < 1e-9  # unscaled: batch 64 does not change the rate
    torch_opt = timm.optim.Lamb(
        reference_param_groups(torch_model, wd), lr=lr, betas=(0.9, 0.999), eps=1e-8
    )
    named = dict(torch_model.named_parameters())
    update = jax.jit(tx.update)
    state = tx.init(params)
    for step in range(steps):
        grads = _random_grads(params, step, 10.0 ** (step - 3))
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        for key, g in convert.flax_to_torch({"params": grads}).items():
            named[key].grad = g.clone()
        torch_opt.step()

    got = convert.flax_to_torch({"params": params})
    errors = {k: (got[k] - v).abs().max().item() for k, v in torch_model.state_dict().items()}
    assert max(errors.values()) <= ATOL, sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    assert (got["norm.weight"] - 1).abs().max().item() > 100 * ATOL


def test_lamb_is_optax_lamb_on_decayed_parameters(tiny):
    """optax's documented LAMB (Adam -> + wd * param -> trust ratio -> -lr) on decayed leaves;
    on the others the plain bias-corrected Adam step, without trust ratio (the reference's rule).
    """
    params = nn.meta.unbox(tiny[0])
    lr, wd = 1e-2, 0.5
    cfg = _optim_config(name="lamb", lr=lr, weight_decay=wd, eps=1e-6)
    ours = optim.lamb(lr, cfg)
    reference = optax.lamb(lr, eps=1e-6, weight_decay=wd, mask=optim.weight_decay_mask)
    adam = optax.chain(optax.scale_by_adam(eps=1e-6), optax.scale_by_learning_rate(lr))
    grads = _random_grads(params, 0, 1.0)
    got = ours.update(grads, ours.init(params), params)[0]
    want = reference.update(grads, reference.init(params), params)[0]
    plain = adam.update(grads, adam.init(params), params)[0]
    mask = optim.weight_decay_mask(params)
    for g, w, p, decays in zip(*map(jax.tree.leaves, (got, want, plain, mask)), strict=True):
        np.testing.assert_array_equal(g, w if decays else p)
    # The two rules differ on the no-decay leaves (else the test above could not fail).
    norm = traverse_util.flatten_dict(got)[("norm", "scale")]
    assert not np.allclose(norm, traverse_util.flatten_dict(want)[("norm", "scale")])


def test_unscale_lr():
    cfg = _optim_config(lr=4e-3)
    assert optim.peak_learning_rate(cfg, 2048) == pytest.approx(4e-3 * 2048 / 512)
    cfg.unscale_lr = True
    assert optim.peak_learning_rate(cfg, 2048) == 4e-3
