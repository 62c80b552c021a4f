"""DeiT III (timm's `deit3_*`): parity with timm, conversion, position embeddings, a real run.

Tolerance: relative L2 error <= 1e-5 in float32, as for DeiT (tests/test_deit_parity.py). timm's
weights are re-drawn at random (LayerScale gammas included, which timm initialises at 1e-6 and
would otherwise hide the residual branches) so every converted tensor matters.
"""

import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from _train_config import tiny_config
from timm.layers import resample_abs_pos_embed
from timm.models.deit import VisionTransformerDistilled

import deit_jax
from deit_jax import convert, losses, main, train
from deit_jax.train import classifier, optim, steps
from deit_jax.train import state as train_state
from deit_jax.train.metrics import read_jsonl
from deit_jax.weights.directory import load_variables
from deit_jax.weights.surgery import resize_pos_embed

RTOL = 1e-5
PARITY = [
    "deit3_small_patch16_224",
    "deit3_medium_patch16_224",
    "deit3_base_patch16_224",
    "deit3_small_patch16_384",
]
# timm 1.0.31's counts (also recomputed from timm below, on the meta device).
REFERENCE_PARAMS = {
    "deit3_small_patch16_224": 22_059_496,
    "deit3_small_patch16_384": 22_205_416,
    "deit3_medium_patch16_224": 38_849_512,
    "deit3_base_patch16_224": 86_585_320,
    "deit3_base_patch16_384": 86_877_160,
    "deit3_large_patch16_224": 304_374_760,
    "deit3_large_patch16_384": 304_763_880,
    "deit3_huge_patch14_224": 632_126_440,
}
# The tiny shape of the end-to-end run and the small parity checks.
TINY = dict(embed_dim=32, depth=2, num_heads=2, patch_size=4, img_size=16, num_classes=10)


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model.eval()


def to_nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def test_registry_and_parameter_counts_match_timm():
    assert deit_jax.list_models("deit3_*") == sorted(REFERENCE_PARAMS)
    for name, expected in REFERENCE_PARAMS.items():
        with torch.device("meta"):
            timm_count = sum(p.numel() for p in timm.create_model(name).parameters())
        model = deit_jax.create_model(name)
        size = model.img_size
        shapes = jax.eval_shape(
            lambda m=model, s=size: m.init(jax.random.key(0), jnp.zeros((1, s, s, 3)))
        )
        assert sum(x.size for x in jax.tree.leaves(shapes["params"])) == timm_count == expected


@pytest.mark.parametrize("name", PARITY)
def test_parity_with_timm(name):
    torch_model = randomise(timm.create_model(name, pretrained=False))
    state_dict = torch_model.state_dict()
    assert state_dict["pos_embed"].shape[1] == (torch_model.patch_embed.num_patches)
    variables = convert.torch_to_flax(state_dict, name)
    assert sum(x.size for x in jax.tree.leaves(variables)) == REFERENCE_PARAMS[name]
    model = deit_jax.create_model(name)
    # Batch 1 keeps base at 224 affordable on two cores.
    images = np.random.default_rng(0).normal(size=(1, model.img_size, model.img_size, 3))
    images = images.astype(np.float32)
    with torch.no_grad():
        expected = torch_model(to_nchw(images)).numpy()
    got = model.apply(variables, images, train=False)
    assert rel_l2(got, expected) <= RTOL

    back = convert.flax_to_torch(variables, name)
    assert set(back) == set(state_dict)
    for key, value in state_dict.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_layer_scale_starts_at_init_values():
    model = deit_jax.create_model("deit3_small_patch16_224", **TINY)
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    for ls in ("ls1", "ls2"):
        gamma = params["blocks_1"][ls]["gamma"].value
        np.testing.assert_array_equal(gamma, np.full((32,), 1e-6, np.float32))
    assert params["pos_embed"].value.shape == (1, 16, 32)  # patches only, no class row


def test_distilled_override_matches_timm_distilled_code_path():
    """timm's VisionTransformerDistilled with no_embed_class (DeiT III) and a patch-only pos_embed.

    timm itself builds that model with N + 2 position rows, which its own no_embed_class branch
    cannot add to N patch tokens; the test gives it the N rows that branch adds.
    """
    torch_model = VisionTransformerDistilled(
        **TINY, mlp_ratio=4.0, no_embed_class=True, init_values=1e-6
    )
    torch_model.pos_embed = torch.nn.Parameter(torch.zeros(1, 16, 32))
    randomise(torch_model)
    name = "deit3_small_patch16_224"
    variables = convert.torch_to_flax(torch_model.state_dict(), name, distilled=True, **TINY)
    model = deit_jax.create_model(name, distilled=True, **TINY)
    images = np.random.default_rng(2).normal(size=(2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model(to_nchw(images)).numpy()
        torch_model.set_distilled_training(True)
        torch_model.train()
        exp_cls, exp_dist = torch_model(to_nchw(images))
    assert rel_l2(model.apply(variables, images), expected) <= RTOL
    got_cls, got_dist = model.apply(variables, images, train=True)
    assert rel_l2(got_cls, exp_cls.numpy()) <= RTOL
    assert rel_l2(got_dist, exp_dist.numpy()) <= RTOL


def test_pos_embed_resize_224_to_384_matches_timm():
    torch_model = randomise(timm.create_model("deit3_small_patch16_224", pretrained=False))
    pos = torch_model.pos_embed.detach()
    # The reference fine-tuning kernel: F.interpolate(bicubic, align_corners=False), no antialias.
    # (timm's default antialias=True, used by its own pretrained loading, is PIL's a = -0.5 kernel
    # when upsampling: about 8% relative L2 away from this one.)
    expected = resample_abs_pos_embed(pos, (24, 24), num_prefix_tokens=0, antialias=False)
    got = resize_pos_embed(pos.numpy(), (24, 24), num_prefix_tokens=0)
    assert got.shape == (1, 576, 384)
    assert rel_l2(got, expected.numpy()) <= RTOL

    # Conversion resizes on its own, with no class-token row to keep.
    variables = convert.torch_to_flax(torch_model.state_dict(), "deit3_small_patch16_384")
    assert rel_l2(variables["params"]["pos_embed"], expected.numpy()) <= RTOL


def test_deit3_trains_resumes_and_exports_to_timm(tmp_path):
    """The DeiT III recipe's pieces on a tiny DeiT III: 8 steps, then a resume from step 4.

    The same mesh is bitwise deterministic, so the resumed run must end where the whole run did
    (to 1e-6, as in tests/test_train.py).
    """
    data_dir, whole, resumed = str(tmp_path / "tfds"), tmp_path / "whole", tmp_path / "resumed"
    changes = {
        "loss": "bce",
        "mixup.label_smoothing": 0.0,
        "augment.three_augment": True,
        "augment.color_jitter": 0.3,
        "optim.name": "lamb",
        "optim.unscale_lr": True,
        "optim.lr": 4e-3,
    }
    config = tiny_config(data_dir, model_name="deit3_small_patch16_224", **changes)
    one = jax.devices()[:1]  # one device: the test is about the recipe, not the mesh
    metrics = train.train_and_evaluate(config, str(whole), devices=one)
    assert metrics["count"] == 360 and 0.0 <= metrics["top1"] <= 1.0

    shutil.copytree(whole / "checkpoints", resumed / "checkpoints")
    shutil.rmtree(resumed / "checkpoints" / "8")
    train.train_and_evaluate(config, str(resumed), devices=one)
    records = read_jsonl(resumed / "metrics.jsonl")
    assert [r["step"] for r in records if "train/loss" in r] == [5, 6, 7, 8]
    final = [load_variables(d / "weights")[0] for d in (whole, resumed)]
    for x, y in zip(*map(jax.tree.leaves, final), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)

    state_dict = convert.flax_to_torch(final[0])
    torch_model = timm.create_model("deit3_small_patch16_224", **TINY)
    torch_model.load_state_dict(state_dict, strict=True)
    images = np.random.default_rng(3).normal(size=(2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model.eval()(to_nchw(images)).numpy()
    model = deit_jax.create_model("deit3_small_patch16_224", **TINY)
    assert rel_l2(model.apply(final[0], images), expected) <= RTOL


def test_init_from_resizes_patch_only_pos_embed():
    """ViT-B's 192 -> 224 fine-tuning path: `init_from` weights at another size keep every
    parameter and resize pos_embed as a grid with no token rows."""
    small = deit_jax.create_model("deit3_small_patch16_224", **{**TINY, "img_size": 12})
    large = deit_jax.create_model("deit3_small_patch16_224", **{**TINY, "img_size": 20})
    pretrained = nn.meta.unbox(small.init(jax.random.key(1), jnp.zeros((1, 12, 12, 3))))
    fresh = nn.meta.unbox(large.init(jax.random.key(2), jnp.zeros((1, 20, 20, 3))))
    merged = train_state.merge_pretrained(fresh["params"], pretrained["params"], large)
    expected = resize_pos_embed(pretrained["params"]["pos_embed"], (5, 5), 0)
    np.testing.assert_allclose(merged["pos_embed"], expected, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(
        merged["blocks_1"]["ls2"]["gamma"], pretrained["params"]["blocks_1"]["ls2"]["gamma"]
    )


@pytest.mark.parametrize("variant", ["small", "medium", "base", "base_ft224"])
def test_imagenet_configs_hold_the_recipe(variant):
    config = main._load_config_file(f"configs/deit3_imagenet.py:{variant}")
    overrides = train_state.student_overrides(config, 1000)
    model = deit_jax.create_model(config.model_name, **overrides)
    peak = optim.peak_learning_rate(config.optim, config.batch_size)
    assert config.data.crop_pct == 1.0 and config.distillation.kind == "none"
    if variant == "base_ft224":
        assert (model.img_size, peak, config.optim.name, config.loss) == (224, 1e-5, "adamw", "ce")
        return
    expected = {"small": (224, 4e-3, 0.05), "medium": (224, 3e-3, 0.1), "base": (192, 3e-3, 0.2)}
    assert (model.img_size, peak, model.drop_path_rate) == expected[variant]
    assert (config.optim.name, config.loss, config.batch_size) == ("lamb", "bce", 2048)
    assert config.augment.three_augment and config.augment.color_jitter == 0.3
    assert config.augment.reprob == 0 and config.mixup.label_smoothing == 0
    assert config.data.repeated_aug == 3 and config.num_epochs == 800


def test_distilled_override_enables_distillation():
    config = tiny_config(model_name="deit3_small_patch16_224", **{"distillation.kind": "hard"})
    assert not train_state.build_student(config, 10).distilled  # distils through its class head
    config.model.distilled = True
    model = train_state.build_student(config, 10)
    assert model.distilled and model.no_embed_class and model.init_values == 1e-6


def test_distilled_deit3_step_with_bce_and_hard_distillation():
    """One real train step of a distilled DeiT III student (the override) under a teacher: BCE
    on the class head, hard distillation on the distillation head, LAMB; both heads learn."""
    config = tiny_config(
        model_name="deit3_small_patch16_224",
        **{"distillation.kind": "hard", "loss": "bce", "optim.name": "lamb"},
    )
    config.model.distilled = True
    student = train_state.build_student(config, 10)
    teacher = deit_jax.create_model("deit3_small_patch16_224", **TINY)
    teacher_variables = teacher.init(jax.random.key(5), jnp.zeros((1, 16, 16, 3)))
    tx, schedule = optim.create_optimizer(
        config.optim, global_batch_size=8, steps_per_epoch=10, num_epochs=1
    )
    state = nn.meta.unbox(train_state.init_state(student, tx, jax.random.key(0), ema=True))
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 8)
    batch = {
        "image": jnp.asarray(rng.normal(size=(8, 16, 16, 3)), jnp.float32),
        "label": jnp.asarray(labels, jnp.int32),
        "target": jnp.asarray(np.eye(10, dtype=np.float32)[labels]),
    }
    step = jax.jit(steps.make_train_step(student, tx, schedule, config, teacher))
    new_state, metrics = step(state, nn.meta.unbox(teacher_variables), batch)
    cls_logits, dist_logits = student.apply({"params": state.params}, batch["image"], train=True)
    base = losses.binary_cross_entropy(cls_logits, batch["target"])
    np.testing.assert_allclose(metrics["loss_base"], base, rtol=1e-5)
    assert np.isfinite(metrics["loss_distillation"]) and metrics["loss_distillation"] > 0
    for head in ("head", "head_dist"):
        moved = new_state.params[head]["kernel"] - state.params[head]["kernel"]
        assert np.abs(moved).max() > 0, head


def test_bce_ignores_label_smoothing_and_unknown_losses_are_refused(caplog):
    config = tiny_config(**{"loss": "bce"})  # the base config's label smoothing, 0.1
    resolved = classifier.without_smoothing_for_bce(config)
    assert resolved.mixup.label_smoothing == 0.0 and config.mixup.label_smoothing == 0.1
    assert "ignores mixup.label_smoothing=0.1" in caplog.text
    ce = tiny_config()
    assert classifier.without_smoothing_for_bce(ce) is ce
    with pytest.raises(ValueError, match="config.loss='focal': must be 'ce'"):
        train_state.check_config(tiny_config(**{"loss": "focal"}), None)
