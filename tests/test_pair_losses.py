"""A CLIP student's losses on image-caption pairs (`deit_jax.losses_pair`, the pair train step):
CLIP-KD's FD and ICL, the in-batch KL to an ensemble, their weights and refusals.

References: float64 PyTorch written from CLIP-KD's `KDClipLoss` (winycg/CLIP-KD,
src/open_clip/loss.py: `fd_loss`, `icl_loss`) with the same projection weights, float64 NumPy
from the definitions (MobileCLIP's ensemble: the members' softmaxes averaged). deit_jax computes
in float32 from the same float32 inputs; tolerance 1e-6, absolute for values up to 1 and
relative above (a float32 loss of 37, ICL at scale 100, is only resolved to 3.8e-6); each
error is printed by `-s`. Real components elsewhere: a tiny CLIP student (the sizes of
tests/test_clip_student.py) and random open_clip CLIP teachers converted as a user's would be,
trained through the real loop.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _optional import require
from test_clip_student import WORDS, student_config

from deit_jax import config as config_lib
from deit_jax import losses, losses_pair
from deit_jax.config import rules
from deit_jax.models import create_model
from deit_jax.models.clip import clip_scale
from deit_jax.teacher.clip.two_towers import PairTeacher
from deit_jax.train.clip_student import PairCacheReaders, pair_projections
from deit_jax.train.clip_student_steps import (
    PairTeachers,
    TeacherPair,
    member_key,
    pair_loss,
    pair_weights,
    teacher_pairs,
)
from deit_jax.train.metrics import read_jsonl
from deit_jax.train.projection import PROJECTION, PairProjections

torch = require("torch")
F = torch.nn.functional
ATOL = 1e-6
B, STUDENT_WIDTH = 12, 16
TINY_CLIP = dict(
    img_size=8, patch_size=4, vision_width=32, vision_layers=1, text_width=32, text_layers=1,
    embed_dim=STUDENT_WIDTH, context_length=12,
)  # fmt: skip


def close(ours, reference, what: str) -> None:
    """Within 1e-6, relative above 1 (float32's spacing at 37 is 3.8e-6)."""
    error = abs(float(ours) - float(reference))
    print(f"{what}: |deit_jax - reference| = {error:.2e} (of {float(reference):.4g})")
    assert error <= ATOL * max(1.0, abs(float(reference))), (what, float(ours), float(reference))


def embeddings(seed: int, width: int, batch: int = B) -> tuple[np.ndarray, np.ndarray]:
    """A pair of (batch, width) float32 embeddings, image and text, correlated pair by pair."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(batch, width))
    text = image + rng.normal(scale=1.5, size=(batch, width))
    return image.astype(np.float32), text.astype(np.float32)


def t64(x) -> "torch.Tensor":
    return torch.from_numpy(np.asarray(x, np.float64))


def unboxed(projections: PairProjections, seed: int):
    """`projections`' fresh params as plain arrays (the train state unboxes them the same)."""
    return nn.meta.unbox(projections.init_params(jax.random.PRNGKey(seed)))


def torch_linear(params) -> "torch.nn.Linear":
    """nn.Linear (float64) with a `Projection`'s weights: weight = kernel.T."""
    kernel = np.asarray(params["fc"]["kernel"], np.float64)
    linear = torch.nn.Linear(*kernel.shape).double()
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(kernel.T))
        linear.bias.copy_(t64(params["fc"]["bias"]))
    return linear


# --------------------------------------------------------------------------- the definitions


def test_fd_with_a_projection_is_clip_kds_definition():
    """CLIP-KD: `fd = F.mse_loss(normalize(visual_proj(s_image)), t_image) + F.mse_loss(
    normalize(text_proj(s_text)), t_text)`, the teacher's normalised by its forward; the student
    projected to each teacher's width where it differs, unchanged where it matches."""
    projections = PairProjections(STUDENT_WIDTH, (24, STUDENT_WIDTH), icl=False)
    params = unboxed(projections, 0)
    assert set(params) == {"teacher0"}  # the 16-wide teacher needs no projection
    s_image, s_text = embeddings(0, STUDENT_WIDTH)
    heads = projections.apply({"params": params}, s_image, s_text)
    np.testing.assert_array_equal(heads[1][0], s_image)  # the same width: no projection
    visual_proj, text_proj = (torch_linear(params["teacher0"][k]) for k in ("image", "text"))
    with torch.no_grad():
        for m, (width, projection) in enumerate(
            [(24, (visual_proj, text_proj)), (STUDENT_WIDTH, (None, None))]
        ):
            t_image, t_text = embeddings(10 + m, width)
            ours, parts = losses_pair.pair_feature_loss(*heads[m][:2], t_image, t_text)
            s_i, s_t = t64(s_image), t64(s_text)
            if projection[0] is not None:
                s_i, s_t = projection[0](s_i), projection[1](s_t)
            image = F.mse_loss(F.normalize(s_i, dim=1), F.normalize(t64(t_image), dim=1))
            text = F.mse_loss(F.normalize(s_t, dim=1), F.normalize(t64(t_text), dim=1))
            close(parts["image"], image, f"fd image, teacher {m}")
            close(parts["text"], text, f"fd text, teacher {m}")
            close(ours, image + text, f"fd, teacher {m}")
    # The mean runs over every element: a sum over the width would be `width` times larger.
    assert float(ours) < 4.0 / STUDENT_WIDTH


@pytest.mark.parametrize("log_scale", [losses_pair.ICL_SCALE_INIT, math.log(30.0), 6.0])
def test_icl_is_clip_kds_definition_at_its_own_clamped_scale(log_scale):
    """CLIP-KD: `icl = (CE(scale * n(s_image) @ t_text.T, arange) + CE(scale * n(s_text) @
    t_image.T, arange)) / 2`, the student's projected; the scale min(exp(p), 100) (6.0: 403,
    clamped at 100)."""
    projections = PairProjections(STUDENT_WIDTH, (24,), icl=True)
    params = unboxed(projections, 1)
    assert float(params["teacher0"]["icl_logit_scale"]) == pytest.approx(math.log(1 / 0.07))
    params["teacher0"]["icl_logit_scale"] = jnp.float32(log_scale)
    s_image, s_text = embeddings(1, STUDENT_WIDTH)
    t_image, t_text = embeddings(2, 24)
    ((p_image, p_text, scale),) = projections.apply({"params": params}, s_image, s_text)
    assert float(scale) == pytest.approx(min(math.exp(log_scale), 100.0), rel=1e-6)
    ours, parts = losses_pair.interactive_contrastive_loss(p_image, p_text, t_image, t_text, scale)
    visual_proj, text_proj = (torch_linear(params["teacher0"][k]) for k in ("image", "text"))
    with torch.no_grad():
        s_i = F.normalize(visual_proj(t64(s_image)), dim=1)
        s_t = F.normalize(text_proj(t64(s_text)), dim=1)
        t_i, t_t = F.normalize(t64(t_image), dim=1), F.normalize(t64(t_text), dim=1)
        labels = torch.arange(B)
        c = float(scale)  # the float32 multiplier itself: the same scale on both sides
        image_to_text = F.cross_entropy(c * s_i @ t_t.T, labels)
        text_to_image = F.cross_entropy(c * s_t @ t_i.T, labels)
    close(parts["image_to_text"], image_to_text, "icl image->teacher text")
    close(parts["text_to_image"], text_to_image, "icl text->teacher image")
    close(ours, (image_to_text + text_to_image) / 2, f"icl at scale {c:.1f}")
    # The two directions are different matrices, not one and its transpose.
    assert abs(float(image_to_text) - float(text_to_image)) > 1e-3


def _softmax64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ensemble_logits(scales=(100.0, 20.0)) -> list[np.ndarray]:
    """Two teachers' float32 in-batch logits of the same pairs, each at its own logit scale
    (widths 24 and 16)."""
    return [
        np.asarray(losses.in_batch_logits(*embeddings(20 + m, width), scale))
        for m, (width, scale) in enumerate(zip((24, 16), scales, strict=True))
    ]


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_the_ensemble_target_averages_each_teachers_softmax_at_its_own_scale(tau):
    """MobileCLIP's `--distill-average-after-softmax`: p = sum_m w_m softmax(t_m / tau), both
    directions (t_m: teacher m's logits at its own scale; weights normalised to sum 1)."""
    t = ensemble_logits()
    weights = (1.0, 3.0)  # normalised: 0.25, 0.75
    for name, ts in (("image->text", t), ("text->image", [x.T for x in t])):
        ours = np.exp(np.asarray(losses_pair.ensemble_log_targets(ts, weights, tau), np.float64))
        reference = 0.25 * _softmax64(ts[0] / tau) + 0.75 * _softmax64(ts[1] / tau)
        error = np.abs(ours - reference).max()
        print(f"ensemble target {name}, tau {tau}: max |deit_jax - reference| = {error:.2e}")
        assert error <= ATOL
        np.testing.assert_allclose(ours.sum(-1), 1.0, atol=1e-6)
    # Each at its own scale: one shared scale (MobileCLIP's fixed --distill-logit-scale) or an
    # average before the softmax would be other targets.
    shared = np.exp(losses_pair.ensemble_log_targets(ensemble_logits((100.0, 100.0)), weights, tau))
    assert np.abs(shared - reference).max() > 1e-2
    before = _softmax64((0.25 * ts[0] + 0.75 * ts[1]) / tau)
    assert np.abs(before - reference).max() > 1e-2


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_the_ensemble_kl_is_the_batchmean_kl_to_the_averaged_target(tau):
    t = ensemble_logits()
    rng = np.random.default_rng(5)
    s = (0.5 * t[1] + rng.normal(scale=2.0, size=t[1].shape)).astype(np.float32)
    weights = (1.0, 3.0)
    ours, parts = losses_pair.ensemble_in_batch_distillation_loss(s, t, weights, tau=tau)

    def kl(student, teachers):  # F.kl_div(log_softmax(s / T), p, "batchmean"), p averaged
        p = 0.25 * _softmax64(teachers[0] / tau) + 0.75 * _softmax64(teachers[1] / tau)
        log_q = np.log(_softmax64(np.asarray(student, np.float64) / tau))
        return float((p * (np.log(p) - log_q)).sum(-1).mean())

    i2t, t2i = kl(s, t), kl(s.T, [x.T for x in t])
    close(parts["image_to_text"], i2t, f"ensemble kl image->text, tau {tau}")
    close(parts["text_to_image"], t2i, f"ensemble kl text->image, tau {tau}")
    close(ours, (i2t + t2i) / 2, f"ensemble kl, tau {tau}")
    # One teacher is the single teacher's KL itself (the seed's F.kl_div), bit for bit.
    single, _ = losses_pair.ensemble_in_batch_distillation_loss(s, t[:1], (1.0,), tau=tau)
    assert float(single) == float(losses.in_batch_distillation_loss(s, t[0], tau=tau)[0])


def test_unset_weights_keep_kind_and_alphas_meaning():
    resolve = losses_pair.resolve_pair_weights
    none = {"clip": None, "kl": None, "fd": 0.0, "icl": 0.0}
    assert resolve("in_batch", 0.7, none) == {"clip": 1 - 0.7, "kl": 0.7, "fd": 0.0, "icl": 0.0}
    assert resolve("none", 0.7, none) == {"clip": 1.0, "kl": 0.0, "fd": 0.0, "icl": 0.0}
    given = resolve("in_batch", 0.7, none | {"kl": 2.0, "fd": 2000})
    assert given == {"clip": 1 - 0.7, "kl": 2.0, "fd": 2000.0, "icl": 0.0}


# --------------------------------------------------------------------------- the student's loss


@pytest.fixture(scope="module")
def student():
    """A tiny CLIP student (test_clip_student's sizes), its params and a batch of 8 pairs."""
    model = create_model("clip_vit_ti16", **TINY_CLIP)
    images = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype(np.float32)
    ids = np.random.default_rng(1).integers(1, 400, size=(8, 12)).astype(np.int32)
    ids[:, 6] = 49407  # the end-of-text token: the highest id, where the text is pooled
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), images)["params"])
    return model, params, {"image": images, "text": ids}


def frozen_teachers(widths=(24,), scales=(50.0,)) -> tuple[TeacherPair, ...]:
    pairs = []
    for m, (width, scale) in enumerate(zip(widths, scales, strict=True)):
        image, text = embeddings(30 + m, width, batch=8)
        pairs.append(TeacherPair(image, text, losses.in_batch_logits(image, text, scale)))
    return tuple(pairs)


@pytest.mark.parametrize("kind", ["in_batch", "none"])
def test_the_old_kinds_give_exactly_the_loss_they_gave(pairs, student, tmp_path, kind):
    """kind=in_batch (alpha 0.7, tau 2) with the weights unset: the step's loss is the formula
    the step had before the weights, `(1 - alpha) * ClipLoss + alpha * KL`, bit for bit (both
    jitted); kind=none: CLIP's loss itself. Neither has FD/ICL parameters (the train state's
    layout stays)."""
    config = student_config(pairs, tmp_path, "t" if kind == "in_batch" else "")
    model, params, batch = student
    weights = pair_weights(config)
    teachers = frozen_teachers() if kind == "in_batch" else ()
    alpha, tau = config.distillation.alpha, config.distillation.tau
    assert (alpha, tau) == (0.7, 2.0)

    def today(p):  # clip_student_steps.make_pair_train_step's loss before pair_weights
        image = model.apply({"params": p}, batch["image"], method="encode_image")
        text = model.apply({"params": p}, batch["text"], method="encode_text")
        logits = losses.in_batch_logits(
            image.astype(jnp.float32), text.astype(jnp.float32), clip_scale(p["logit_scale"])
        )
        clip = losses.clip_contrastive_loss(logits)
        if kind == "none":
            return clip
        kl, _ = losses.in_batch_distillation_loss(logits, teachers[0].logits, tau=tau)
        return (1 - alpha) * clip + alpha * kl

    def new(p):
        return pair_loss(model, None, p, batch, teachers, weights=weights, tau=tau)[0]

    ours, theirs = float(jax.jit(new)(params)), float(jax.jit(today)(params))
    print(f"kind={kind}: loss {ours!r}, before the weights {theirs!r}")
    assert ours == theirs
    assert pair_projections(config, model, (24,)) is None


def test_icls_own_scale_and_the_projections_get_gradients(student):
    """ICL's logit scale and the projections are trained: the loss's gradient reaches them (and
    FD's reaches the projections, not the scale)."""
    model, params, batch = student
    projections = PairProjections(STUDENT_WIDTH, (24,), icl=True)
    params = params | {PROJECTION: unboxed(projections, 2)}
    teachers = frozen_teachers()
    zero = {"clip": 0.0, "kl": 0.0, "fd": 0.0, "icl": 0.0}

    @jax.jit
    def gradients(p):  # of ICL alone and of FD alone, in one compilation
        return {
            name: jax.grad(
                lambda q, w=zero | {name: 1.0}: pair_loss(
                    model, projections, q, batch, teachers, weights=w
                )[0]
            )(p)[PROJECTION]["teacher0"]
            for name in ("icl", "fd")
        }

    for name, grads in gradients(params).items():
        scale_grad = float(grads["icl_logit_scale"])
        print(f"{name}: d loss / d icl_logit_scale = {scale_grad:.3e}")
        assert (scale_grad != 0.0) == (name == "icl") and np.isfinite(scale_grad)
        assert float(jnp.abs(grads["image"]["fc"]["kernel"]).max()) > 0
        assert float(jnp.abs(grads["text"]["fc"]["kernel"]).max()) > 0


def test_cached_members_are_read_under_their_own_keys_and_scales():
    """An ensemble from its caches (`teacher.cache=A,B`): member m's embeddings and scale under
    `member_key`, each teacher's logits at its own cached scale."""

    class Fake:
        def __init__(self, width, scale, seed):
            self.out = dict(zip(("teacher_image_embedding", "teacher_text_embedding"),
                                embeddings(seed, width, batch=8), strict=True))  # fmt: skip
            self.out["teacher_scale"] = np.full(8, scale, np.float32)

        def __call__(self, epoch, step):
            return self.out

    readers = PairCacheReaders.__new__(PairCacheReaders)
    readers.paths, readers.readers = ["a", "b"], [Fake(24, 100.0, 0), Fake(16, 30.0, 1)]
    batch = readers(0, 0)
    assert set(batch) == {member_key(k, m) for k in Fake(1, 1, 0).out for m in (0, 1)}
    side = teacher_pairs(PairTeachers(count=2, weights=(0.5, 0.5), cached=True), None, batch)
    for m, reader in enumerate(readers.readers):
        image, text = reader.out["teacher_image_embedding"], reader.out["teacher_text_embedding"]
        scale = reader.out["teacher_scale"][0]
        np.testing.assert_array_equal(side[m].logits, losses.in_batch_logits(image, text, scale))


# --------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """24 images of 8 px with two or three captions each (test_clip_student's folder)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
        captions = [f"a {WORDS[i % 6]} thing number {i} take {k}" for k in range(2 + i % 2)]
        (root / f"{i:03d}.txt").write_text("\n".join(captions) + "\n")
    return str(root)


def converted_clip(root, embed_dim: int, seed: int) -> str:
    """A random open_clip CLIP (1-block towers, 8 px images), saved and converted."""
    open_clip = require("open_clip")
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    from safetensors.torch import save_file

    from deit_jax import convert

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=embed_dim,
        vision_cfg=CLIPVisionCfg(layers=1, width=64, patch_size=4, image_size=8, head_width=64),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1),
    )
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(root / "t.safetensors"))
    out = str(root / "converted")
    convert.main(["--checkpoint", str(root / "t.safetensors"), "--model", "clip_vit_b32"] + [
        "--output", out])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two CLIP teachers: 24 wide (the student's embeddings need a projection) and 16 wide."""
    return [converted_clip(tmp_path_factory.mktemp(f"t{w}"), w, s) for s, w in ((0, 24), (1, 16))]


def test_a_clip_student_trains_with_every_loss_from_a_live_ensemble(pairs, teachers, tmp_path):
    """Two live CLIP teachers (weights 1 and 3), the four losses on: the real loop trains two
    steps; each part is a metric and the loss their weighted sum; ICL's scale of each teacher
    moves after the first step; the run's weights leave FD/ICL's parameters out."""
    from deit_jax.train.loop import train_and_evaluate
    from deit_jax.weights.load import load_weights

    weights = {"clip": 0.5, "kl": 1.0, "fd": 2000.0, "icl": 1.0}
    config = student_config(pairs, tmp_path, **{"num_epochs": 1.0})
    config.distillation.kind = "in_batch"
    config.teacher.members = {
        "wide": dict(framework="clip", name="clip_vit_b32", checkpoint=teachers[0], weight=1.0),
        "narrow": dict(framework="clip", name="clip_vit_b32", checkpoint=teachers[1], weight=3.0),
    }
    for name, w in weights.items():
        config.distillation.pair_weights[name] = w
    assert not rules.problems(config, num_devices=1)
    # One device: the step's sharding is tested elsewhere, its compilation is this test's time.
    final = train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    records = [r for r in read_jsonl(str(tmp_path / "run" / "metrics.jsonl")) if "train/loss" in r]
    assert len(records) == 2
    for r in records:
        parts = {k: r[f"train/loss_{k}"] for k in weights}
        total = sum(weights[k] * parts[k] for k in weights)
        assert r["train/loss"] == pytest.approx(total, rel=1e-6)
        assert all(np.isfinite(v) and v > 0 for v in parts.values()), parts
    first, second = records
    for key in ("train/icl_logit_scale", "train/icl_logit_scale_1"):
        assert first[key] == pytest.approx(1 / 0.07, rel=1e-6)  # before any step
        assert second[key] != first[key]  # after one step
    assert 0 <= final["mean_recall"] <= 1 and "teacher_mean_recall" not in final
    variables, _ = load_weights(str(tmp_path / "run" / "weights"), "clip_vit_ti16")
    assert PROJECTION not in variables["params"]


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "weights, kind, key",
    [
        ({"clip": 0.0, "kl": 0.0}, "in_batch", "distillation.pair_weights"),
        ({"clip": 0.0}, "none", "distillation.pair_weights"),
        ({"fd": 1.0}, "none", "distillation.pair_weights.fd"),
        ({"icl": 1.0}, "none", "distillation.pair_weights.icl"),
        ({"kl": 1.0}, "none", "distillation.pair_weights.kl"),
        ({"fd": -1.0}, "in_batch", "distillation.pair_weights.fd"),
        ({"clip": -0.5}, "none", "distillation.pair_weights.clip"),
    ],
)
def test_a_bad_set_of_weights_is_refused_in_one_line_naming_the_key(
    pairs, teachers, tmp_path, weights, kind, key
):
    config = student_config(pairs, tmp_path, teachers[0] if kind == "in_batch" else "")
    assert not rules.problems(config, num_devices=1)
    for name, w in weights.items():
        config.distillation.pair_weights[name] = w
    found = rules.problems(config, num_devices=1)
    assert len(found) == 1 and found[0].startswith(f"config.{key}="), found
    print(found[0])


@pytest.mark.parametrize("name", ["clip", "kl", "fd", "icl"])
def test_a_pair_loss_on_a_classifier_is_refused_not_ignored(name):
    config = config_lib.base_config()  # a DeiT on ImageNet: a classifier
    assert not rules.problems(config, num_devices=1)
    config.distillation.pair_weights[name] = 1.0
    (problem,) = rules.problems(config, num_devices=1)
    assert problem.startswith(f"config.distillation.pair_weights.{name}=1.0: is a loss of a CLIP")
    assert "not of a classifier" in problem and "\n" not in problem


def test_fd_with_a_teacher_but_no_checkpoint_is_refused_naming_it(pairs, tmp_path):
    config = student_config(pairs, tmp_path, "")
    config.distillation.kind = "in_batch"
    config.distillation.pair_weights.fd = 1.0
    found = rules.problems(config, num_devices=1)
    assert [line.split("=")[0] for line in found] == ["config.teacher.checkpoint"], found


def test_the_pair_steps_logit_scales_are_clamped_at_100(student):
    """The student's and the teacher's in-batch logits use min(exp(logit_scale), 100), as CLIP
    and open_clip do: a scale parameter of 10 (exp: 22,026) gives logits of 100 x cosine."""
    model, params, batch = student
    params = params | {"logit_scale": jnp.float32(10.0)}
    _, (_, logits, scale, _) = pair_loss(
        model, None, params, batch, (), weights={"clip": 1.0, "kl": 0.0, "fd": 0.0, "icl": 0.0}
    )
    image = model.apply({"params": params}, batch["image"], method="encode_image")
    text = model.apply({"params": params}, batch["text"], method="encode_text")
    normalise = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    assert float(scale) == 100.0
    np.testing.assert_allclose(logits, 100 * normalise(image) @ normalise(text).T, atol=1e-4)

    teacher = PairTeacher(model, (0.5,) * 3, (0.25,) * 3)
    variables = {"params": {"clip": params}}
    _, _, t_scale = teacher.apply(variables, batch["image"], batch["text"])
    assert float(t_scale) == 100.0
