"""Weight inheritance (`deit_jax.weights.inherit`, `config.init`): a smaller DeiT or CLIP starts
from a larger one's weights, TinyCLIP's way. References are NumPy computations written from the
definitions (heads split from the fused q|k|v, attention by hand), on real tiny models."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _train_config import tiny_config

from deit_jax import train
from deit_jax.config import base_config, rules
from deit_jax.errors import ConfigError
from deit_jax.models import create_model
from deit_jax.models.clip import ResidualAttentionBlock
from deit_jax.models.vit import Block
from deit_jax.train.state import build_student
from deit_jax.weights import inherit
from deit_jax.weights.directory import load_variables, save_variables

BASE = "deit_base_distilled_patch16_224"
TINY = "deit_tiny_distilled_patch16_224"
SMALL_VIT = dict(img_size=16, patch_size=4, num_classes=10)
TEACHER = dict(SMALL_VIT, embed_dim=64, depth=4, num_heads=4)  # "DeiT-B": 4 blocks, 4 heads of 16
STUDENT = dict(SMALL_VIT, embed_dim=32, depth=2, num_heads=2)  # "DeiT-S": tests/_train_config.py's
CLIP_SIZES = dict(
    embed_dim=16, img_size=16, patch_size=4, vision_width=32, vision_layers=2, vision_heads=2,
    text_width=32, text_layers=2, text_heads=2, context_length=8, vocab_size=64,
)  # fmt: skip


def params_of(model, seed=0):
    """Random params of `model`'s shapes (NumPy: `model.init` compiles a random generator per
    shape, tens of seconds on a busy CPU)."""
    size = model.img_size if isinstance(model.img_size, int) else model.img_size[0]
    images = jnp.zeros((1, size, size, 3))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: (rng.normal(size=x.shape) * 0.2).astype(np.float32), nn.meta.unbox(shapes)
    )


def save(path, name, seed=0, **overrides):
    model = create_model(name, **overrides)
    save_variables(path, {"params": params_of(model, seed)}, model_name=name,
                   model_overrides=overrides)  # fmt: skip
    return str(path)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def ref_qkv(fused, h_t, h_s, hd_s, d_s):
    """The student's fused q|k|v (kernel (D, 3D) or bias (3D,)) from the definition: q, k and v
    are the three column blocks, each the heads side by side; keep the first h_s heads, the first
    hd_s columns of each, the first d_s input rows."""
    d_t = fused.shape[-1] // 3
    hd_t = d_t // h_t
    parts = []
    for m in range(3):
        w = fused[..., m * d_t : (m + 1) * d_t]
        heads = [w[..., h * hd_t : h * hd_t + hd_s] for h in range(h_s)]
        part = np.concatenate(heads, axis=-1)
        parts.append(part[:d_s] if part.ndim == 2 else part)
    return np.concatenate(parts, axis=-1)


def ref_out(kernel, h_t, h_s, hd_s, d_s):
    """The output projection's rows are the heads' outputs side by side: the same heads."""
    hd_t = kernel.shape[0] // h_t
    return np.concatenate([kernel[h * hd_t : h * hd_t + hd_s, :d_s] for h in range(h_s)], 0)


def test_inheriting_the_same_shape_is_the_identity():
    rng = np.random.default_rng(0)
    deit = create_model(BASE, **TEACHER)
    params = params_of(deit)
    same = inherit.inherit_model(params, deit, params, deit)
    assert_trees_equal(same, params)
    images = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    apply = jax.jit(deit.apply)
    np.testing.assert_array_equal(
        apply({"params": same}, images), apply({"params": params}, images)
    )

    clip = create_model("clip_vit_ti16", **CLIP_SIZES)
    params = params_of(clip)
    same = inherit.inherit_model(params, clip, params, clip)
    assert_trees_equal(same, params)
    ids = rng.integers(1, 64, size=(2, 8)).astype(np.int32)
    apply = jax.jit(lambda p: clip.apply({"params": p}, images, ids, method="logits_per_image"))
    logits = [apply(p) for p in (same, params)]
    np.testing.assert_array_equal(*logits)


def test_q_k_v_are_sliced_per_head_as_defined():
    """4 heads of 6 -> 2 heads of 4 (another head width too): the fused q|k|v and the output
    projection against the per-head NumPy reference."""
    rng = np.random.default_rng(1)
    teacher = {"blocks_0": {"attn": {
        "qkv": {"kernel": rng.normal(size=(24, 72)), "bias": rng.normal(size=(72,))},
        "proj": {"kernel": rng.normal(size=(24, 24)), "bias": rng.normal(size=(24,))},
    }}}  # fmt: skip
    shapes = {"blocks_0": {"attn": {
        "qkv": {"kernel": jax.ShapeDtypeStruct((8, 24), np.float64),
                "bias": jax.ShapeDtypeStruct((24,), np.float64)},
        "proj": {"kernel": jax.ShapeDtypeStruct((8, 8), np.float64),
                 "bias": jax.ShapeDtypeStruct((8,), np.float64)},
    }}}  # fmt: skip
    got = inherit.inherit(teacher, shapes, heads={"image": (4, 2)})["blocks_0"]["attn"]
    qkv, proj = teacher["blocks_0"]["attn"]["qkv"], teacher["blocks_0"]["attn"]["proj"]
    np.testing.assert_array_equal(got["qkv"]["kernel"], ref_qkv(qkv["kernel"], 4, 2, 4, 8))
    np.testing.assert_array_equal(got["qkv"]["bias"], ref_qkv(qkv["bias"], 4, 2, 4, 8))
    np.testing.assert_array_equal(got["proj"]["kernel"], ref_out(proj["kernel"], 4, 2, 4, 8))
    np.testing.assert_array_equal(got["proj"]["bias"], proj["bias"][:8])


def test_blocks_are_taken_at_even_intervals_or_as_listed():
    # TinyCLIP's interval_front: step = teacher depth // student depth, from block 0.
    assert inherit.chosen_layers("even", 12, 6, "image") == [0, 2, 4, 6, 8, 10]
    assert inherit.chosen_layers("even", 12, 5, "image") == [0, 2, 4, 6, 8]
    assert inherit.chosen_layers("even", 4, 2, "image") == [0, 2]
    teacher_model = create_model(TINY, **dict(STUDENT, depth=6))
    student_model = create_model(TINY, **dict(STUDENT, depth=3))
    teacher, student = params_of(teacher_model), params_of(student_model, seed=1)
    for layers, picked in (("even", [0, 2, 4]), ([5, 1, 3], [5, 1, 3])):
        got = inherit.inherit_model(teacher, teacher_model, student, student_model, layers=layers)
        for i, j in enumerate(picked):
            assert_trees_equal(got[f"blocks_{i}"], teacher[f"blocks_{j}"])

    clip_teacher = create_model("clip_vit_ti16", **dict(CLIP_SIZES, text_layers=3))
    clip_student = create_model("clip_vit_ti16", **CLIP_SIZES)
    teacher, student = params_of(clip_teacher), params_of(clip_student, seed=1)
    got = inherit.inherit_model(
        teacher, clip_teacher, student, clip_student, layers={"image": "even", "text": [2, 0]}
    )
    blocks = lambda p, tower: p[tower]["transformer"]  # noqa: E731
    assert_trees_equal(blocks(got, "text")["resblocks_0"], blocks(teacher, "text")["resblocks_2"])
    assert_trees_equal(blocks(got, "text")["resblocks_1"], blocks(teacher, "text")["resblocks_0"])
    assert_trees_equal(blocks(got, "visual"), blocks(teacher, "visual"))


def test_a_small_deit_from_a_base_shaped_one_attends_with_the_teachers_first_heads():
    """4 blocks, 64 wide, 4 heads -> 2 blocks, 32 wide, 2 heads (DeiT-B -> DeiT-S in small):
    the student runs, and its first block's attention is the NumPy attention of the teacher's
    block 0 cut to its first 2 heads and 32 channels."""
    teacher_model, student_model = create_model(BASE, **TEACHER), create_model(TINY, **STUDENT)
    teacher = params_of(teacher_model)
    got = inherit.inherit_model(teacher, teacher_model, params_of(student_model, 1), student_model)
    np.testing.assert_array_equal(got["pos_embed"], teacher["pos_embed"][..., :32])
    np.testing.assert_array_equal(got["head"]["kernel"], teacher["head"]["kernel"][:32])

    images = np.random.default_rng(2).normal(size=(2, 16, 16, 3)).astype(np.float32)
    logits, state = student_model.apply(
        {"params": got}, images, capture_intermediates=True, mutable=["intermediates"]
    )
    assert logits.shape == (2, 10) and np.isfinite(logits).all()
    block = state["intermediates"]["blocks_0"]
    x = np.asarray(block["norm1"]["__call__"][0], np.float64)  # the attention's input
    attn = teacher["blocks_0"]["attn"]
    w = ref_qkv(np.asarray(attn["qkv"]["kernel"]), 4, 2, 16, 32)
    b = ref_qkv(np.asarray(attn["qkv"]["bias"]), 4, 2, 16, 32)
    q, k, v = np.split(x @ w + b, 3, axis=-1)
    heads = []
    for h in range(2):
        cut = slice(16 * h, 16 * (h + 1))
        logits_h = q[..., cut] @ k[..., cut].transpose(0, 2, 1) / 4.0
        weights = np.exp(logits_h - logits_h.max(-1, keepdims=True))
        heads.append(weights / weights.sum(-1, keepdims=True) @ v[..., cut])
    proj = ref_out(np.asarray(attn["proj"]["kernel"]), 4, 2, 16, 32)
    expected = np.concatenate(heads, -1) @ proj + np.asarray(attn["proj"]["bias"])[:32]
    np.testing.assert_allclose(block["attn"]["__call__"][0], expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save(tmp_path_factory.mktemp("inherit") / "teacher", BASE, **TEACHER)


def test_a_training_run_starts_from_the_inherited_weights(teacher_dir, tmp_path):
    """tests/_train_config.py's student (2 blocks, 32 wide) from a 4-block, 64-wide teacher
    directory with init.inherit: at learning rate 0 the run's weights stay those it started
    from, and they are inherit()'s, not the student's fresh init."""
    config = tiny_config(
        str(tmp_path / "tfds"), init_from=teacher_dir, num_epochs=1 / 44,
        **{"init.inherit": True, "optim.lr": 0.0, "optim.min_lr": 0.0},
    )  # fmt: skip
    train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    trained = load_variables(tmp_path / "run" / "weights")[0]["params"]
    student = build_student(config, 10)
    teacher = load_variables(teacher_dir)[0]["params"]
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trained)
    expected = inherit.inherit_model(teacher, create_model(BASE, **TEACHER), shapes, student)
    assert_trees_equal(trained, expected)  # a fresh init would differ from the teacher's cut


def test_refusals_name_the_key(teacher_dir, tmp_path):
    config = tiny_config(**{"init.inherit": True})
    assert rules.problems(config, num_devices=1) == [
        "config.init.inherit=True: needs config.init_from, the larger model's weights directory "
        "to inherit from; set init_from, or init.inherit=False."
    ]
    config = tiny_config(init_from=teacher_dir, **{"init.inherit": True})
    for layers, said in (("0,1,2", "lists 3 teacher blocks for the student's 2 image blocks"),
                         ("a,b", "must be 'even' or a comma list")):  # fmt: skip
        config.init.inherit_layers = layers
        (line,) = rules.problems(config, num_devices=1)
        assert line.startswith(f"config.init.inherit_layers={layers!r}: {said}")

    student = create_model(TINY, **STUDENT)
    config.init.inherit_layers = "0,9"
    with pytest.raises(ConfigError) as error:
        inherit.load(config, params_of(student), student)
    assert str(error.value) == (
        "config.init.inherit_layers='0,9': block 9 is out of range for the teacher's 4 blocks (0-3)"
    )
    small = save(tmp_path / "small", TINY, **STUDENT)
    wide = create_model(BASE, **TEACHER)
    config = tiny_config(init_from=small, **{"init.inherit": True})
    with pytest.raises(ConfigError) as error:
        inherit.load(config, params_of(wide), wide)
    assert str(error.value) == (
        f"config.init.inherit: the student's embed_dim 64 is wider than the teacher's 32 in "
        f"init_from={small!r}; inherit from a larger model, or set init.inherit=False"
    )


def test_a_deit_block_laid_out_as_clips_computes_the_same():
    """`deit_as_clip_image` on a DeiT III (LayerScale folded into the output projections, the
    patch bias into the position rows): a CLIP block on the mapped weights gives the DeiT
    block's output, and CLIP's embedding the DeiT's (up to LayerNorm eps 1e-5 vs 1e-6)."""
    rng = np.random.default_rng(3)
    deit = create_model("deit3_small_patch16_224", **STUDENT)
    params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32) * 0.3,
                          params_of(deit))  # fmt: skip
    mapped, fresh = inherit.deit_as_clip_image(params, deit)
    x = rng.normal(size=(2, 17, 32)).astype(np.float32)
    ours = ResidualAttentionBlock(2, quick_gelu=False).apply(
        {"params": mapped["visual"]["transformer"]["resblocks_0"]}, x
    )
    theirs = Block(2, init_values=1.0).apply({"params": params["blocks_0"]}, x, True)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    assert ("visual", "proj") in fresh

    clip = create_model("clip_vit_ti16", **CLIP_SIZES)
    visual = params_of(clip)["visual"]
    visual = {**visual, **{k: v for k, v in mapped["visual"].items()}}
    images = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    _, state = clip.apply({"params": {**params_of(clip), "visual": visual}}, images,
                          method="encode_image", capture_intermediates=True)  # fmt: skip
    pre = state["intermediates"]["visual"]["ln_pre"]["__call__"][0]
    params = {**params, "blocks_0": {**params["blocks_0"], "norm1": visual["ln_pre"]}}
    _, state = deit.apply({"params": params}, images, capture_intermediates=True)
    np.testing.assert_allclose(pre, state["intermediates"]["blocks_0"]["norm1"]["__call__"][0],
                               rtol=1e-4, atol=1e-4)  # fmt: skip


def test_a_clip_student_takes_its_towers_from_a_deit_and_a_clip(tmp_path):
    """init.image_tower_from a DeiT (64 wide, 4 blocks), init.text_tower_from a CLIP of the
    student's text size, inherited: the image blocks are the DeiT's even blocks cut per head, the
    text tower and logit_scale the CLIP's, the image `proj` (DeiT has none) the student's."""
    deit_dir = save(tmp_path / "deit", BASE, **TEACHER)
    clip_dir = save(tmp_path / "clip", "clip_vit_ti16", seed=4, **CLIP_SIZES)
    config = base_config()
    config.init.inherit = True
    config.init.image_tower_from, config.init.text_tower_from = deit_dir, clip_dir
    student = create_model("clip_vit_ti16", **CLIP_SIZES)
    fresh = params_of(student, seed=5)
    got = inherit.load(config, fresh, student)

    deit = load_variables(deit_dir)[0]["params"]
    block = got["visual"]["transformer"]["resblocks_1"]
    np.testing.assert_array_equal(
        block["attn"]["in_proj"]["kernel"],
        ref_qkv(deit["blocks_2"]["attn"]["qkv"]["kernel"], 4, 2, 16, 32),
    )
    np.testing.assert_array_equal(block["mlp"]["c_fc"]["kernel"],
                                  deit["blocks_2"]["mlp"]["fc1"]["kernel"][:32, :128])  # fmt: skip
    assert got["visual"]["proj"] is fresh["visual"]["proj"]
    clip = load_variables(clip_dir)[0]["params"]
    assert_trees_equal(got["text"], clip["text"])
    assert got["logit_scale"] == clip["logit_scale"]

    config.init.text_tower_from = deit_dir
    with pytest.raises(ConfigError, match=r"^config.init.text_tower_from='.*': holds a DeiT"):
        inherit.load(config, fresh, student)
    assert os.path.isdir(deit_dir)
