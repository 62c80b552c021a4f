"""A CLIP student on image-caption pairs: the caption stream, the train step live and from a
teacher cache, the held-out evaluation, and the config's refusals.

Real components throughout: a caption folder the test writes (img2dataset's layout), open_clip's
tokenizer, a random open_clip CLIP saved as .safetensors and converted as a user's would be, the
training loop, Orbax checkpoints and a TensorStore cache on disk. Tolerances: cached = live
losses to 1e-5 relative (float32 embeddings), held-out metrics against NumPy to 1e-6.
"""

import copy
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from _optional import require
from _train_config import set_keys

from deit_jax import data, losses, sharding
from deit_jax.config import base_config, rules
from deit_jax.models.clip import CLIP_MEAN, CLIP_STD
from deit_jax.train.metrics import read_jsonl

open_clip = require("open_clip")

WORDS = ("red", "green", "blue", "round", "square", "small")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """24 images of 8 px, each with two or three captions (distinct texts)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    for i in range(24):
        sub = root / f"{i // 12:02d}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(sub / f"{i:03d}.png")
        captions = [f"a {WORDS[i % 6]} thing number {i} take {k}" for k in range(2 + i % 2)]
        (sub / f"{i:03d}.txt").write_text("\n".join(captions) + "\n")
    return str(root)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A random open_clip CLIP (32-wide 1-block towers, 8 px images in 4 px patches, the usual
    77-token context: another tokenizer length than the student's), converted."""
    import torch
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    from safetensors.torch import save_file

    from deit_jax import convert

    root = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=24,
        vision_cfg=CLIPVisionCfg(layers=1, width=64, patch_size=4, image_size=8, head_width=64),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1),
    )
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "t.safetensors")
    )
    out = str(root / "converted")
    convert.main(
        ["--checkpoint", str(root / "t.safetensors"), "--model", "clip_vit_b32"] + ["--output", out]
    )
    return out


def student_config(pairs, tmp_path, teacher="", **changes):
    c = base_config()
    c.model_name = "clip_vit_ti16"
    with c.unlocked():
        for key, value in dict(
            img_size=8, patch_size=4, vision_width=32, vision_layers=1, text_width=32,
            text_layers=1, embed_dim=16, context_length=12,
        ).items():  # fmt: skip
            c.model[key] = value
    c.model.drop_path_rate = 0.0
    c.data.name = "captions:" + pairs
    c.data.data_dir = str(tmp_path / "tfds")
    c.data.train_split, c.data.eval_split = "train[:16]", "train[16:]"
    c.data.img_size, c.data.crop_pct, c.data.repeated_aug = 8, 1.0, 1
    c.augment.mean, c.augment.std = CLIP_MEAN, CLIP_STD
    c.augment.randaugment, c.augment.reprob, c.augment.color_jitter = "", 0.0, 0.0
    c.mixup.mixup_alpha = c.mixup.cutmix_alpha = 0.0
    c.teacher.framework, c.teacher.name, c.teacher.checkpoint = "clip", "clip_vit_b32", teacher
    c.distillation.kind = "in_batch" if teacher else "none"
    c.distillation.alpha, c.distillation.tau = 0.7, 2.0
    c.teacher.cache_embedding_dtype = "float32"
    c.batch_size, c.eval_batch_size, c.num_epochs = 8, 8, 2.0
    c.optim.lr, c.optim.warmup_epochs, c.optim.ema_decay = 1e-3, 0.0, 0.0
    c.log_every_steps, c.progress_bar = 1, False
    return set_keys(c, changes)


def tokenizer(length):
    from deit_jax.weights.tokenizer import tokenizer_of

    return tokenizer_of(("open_clip", str(length)))


def test_the_stream_draws_each_examples_caption_from_the_seed(pairs, tmp_path):
    from deit_jax.data.captions import read_caption_pairs

    tokenize = tokenizer(12)
    captions = [p.captions for p in read_caption_pairs(pairs)]
    token_of = [{tuple(t) for t in tokenize(list(c))} for c in captions]
    mesh = sharding.create_mesh(base_config().mesh)

    def epochs(seed, n=20, state=None):
        config = student_config(pairs, tmp_path, seed=seed)
        train = data.build_train(config, mesh, with_ids=True, tokenizers={"text": tokenize})
        if state:
            train.set_state(state)
        drawn = {}
        with train:
            for step in range(n * train.steps_per_epoch):
                batch = next(train)
                epoch = step // train.steps_per_epoch + (state or {}).get("epoch", 0)
                for i, ids in zip(np.asarray(batch["id"]), np.asarray(batch["text"]), strict=True):
                    drawn[(epoch, int(i))] = tuple(ids)
        return drawn

    drawn = epochs(0)
    assert all(ids in token_of[i] for (_, i), ids in drawn.items())  # one of its own captions
    for i in range(16):  # over 20 epochs every example shows each of its 2-3 captions
        assert {drawn[(e, i)] for e in range(20)} == token_of[i]
    assert epochs(0) == drawn  # the seed fixes it
    resumed = epochs(0, n=2, state={"epoch": 3, "step": 0, "seed": 0, "batch_size": 8})
    assert all(drawn[k] == v for k, v in resumed.items())  # a resume draws the same
    other = epochs(1)
    assert sum(other[k] != drawn[k] for k in drawn) > len(drawn) // 4

    config = student_config(pairs, tmp_path)
    held_out = data.build_eval(config, mesh, with_ids=True, tokenizers={"text": tokenize})
    for batch in held_out:  # evaluation: each image's first caption
        for i, ids, m in zip(batch["id"], np.asarray(batch["text"]), batch["mask"], strict=True):
            if m:
                assert tuple(ids) == tuple(tokenize([captions[int(i)][0]])[0])


def retrieval_reference(logits, text_ids, k):
    """Recall@k by definition: image i hits if its caption's text is among its k best distinct
    texts; caption j hits if one of the images paired with its text is among its k best."""
    n = len(logits)
    i2t, t2i = [], []
    for i in range(n):
        texts = {}
        for j in np.argsort(-logits[i], kind="stable"):
            texts.setdefault(text_ids[j], len(texts))
        i2t.append(texts[text_ids[i]] < k)
    for j in range(n):
        order = np.argsort(-logits[:, j], kind="stable")[:k]
        t2i.append(any(text_ids[i] == text_ids[j] for i in order))
    return np.mean(i2t), np.mean(t2i)


@pytest.mark.parametrize("repeated", [False, True])
def test_recall_with_repeated_captions_is_the_definition(repeated):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(40, 40)).astype(np.float32)
    text_ids = rng.integers(0, 7, 40) if repeated else np.arange(40)
    for i in range(40):  # repeated texts have the same embedding: equal columns
        logits[:, i] = logits[:, np.flatnonzero(text_ids == text_ids[i])[0]]
    hits = losses.retrieval_hits(logits, ks=(1, 5), text_ids=text_ids)
    for k in (1, 5):
        i2t, t2i = retrieval_reference(logits, text_ids, k)
        assert float(np.mean(hits[f"image_to_text_r{k}"])) == pytest.approx(i2t, abs=1e-6)
        assert float(np.mean(hits[f"text_to_image_r{k}"])) == pytest.approx(t2i, abs=1e-6)


def test_a_clip_student_from_the_teachers_cache_equals_the_live_run(pairs, teacher, tmp_path):
    from deit_jax.teacher.cache.store import CacheStore
    from deit_jax.teacher.cache.write import write_cache
    from deit_jax.train.loop import train_and_evaluate

    config = student_config(pairs, tmp_path, teacher)
    summary = write_cache(config, str(tmp_path / "cache"))
    stored = CacheStore(str(tmp_path / "cache")).read_all()
    assert set(stored) == {"embeddings", "text_embeddings"}
    assert summary["bytes_per_example"] == 2 * 24 * 4

    live = train_and_evaluate(config, str(tmp_path / "live"))
    cached_config = copy.deepcopy(config)
    cached_config.teacher.cache = str(tmp_path / "cache")
    cached = train_and_evaluate(cached_config, str(tmp_path / "cached"))

    def losses_of(run):
        records = read_jsonl(str(tmp_path / run / "metrics.jsonl"))
        return np.array(
            [[r["train/loss"], r["train/loss_distillation"]] for r in records if "train/loss" in r]
        )

    assert len(losses_of("live")) == 4  # 2 epochs of 2 steps
    np.testing.assert_allclose(losses_of("cached"), losses_of("live"), rtol=1e-5)
    assert cached["kl"] == pytest.approx(live["kl"], rel=1e-5)

    # Reading the next row's embeddings instead: the losses differ (the test can fail).
    shifted = np.roll(stored["text_embeddings"], 1, axis=2)
    store = CacheStore(str(tmp_path / "cache")).open_arrays()
    store["text_embeddings"].write(shifted).result()
    shifted_run = train_and_evaluate(cached_config, str(tmp_path / "shifted"))
    assert not np.allclose(losses_of("shifted"), losses_of("live"), rtol=1e-3)
    del shifted_run


def test_the_held_out_metrics_are_the_definitions_on_the_saved_student(pairs, teacher, tmp_path):
    """Recall, KL and zero-shot top-1 of the final eval, recomputed in NumPy from the student
    and teacher weights on disk and the held-out pairs."""
    from deit_jax.models import create_model
    from deit_jax.teacher.clip.two_towers import build_pair_teacher
    from deit_jax.train.clip_student import tokenizer_specs
    from deit_jax.train.loop import train_and_evaluate
    from deit_jax.weights.load import load_weights
    from deit_jax.weights.tokenizer import tokenizer_of

    config = student_config(pairs, tmp_path, teacher)
    specs = tokenizer_specs(config)
    assert set(specs) == {"text", "teacher_text"}  # context 12 against the teacher's 77
    final = train_and_evaluate(config, str(tmp_path / "run"))
    assert final["count"] == 8

    variables, overrides = load_weights(str(tmp_path / "run" / "weights"), "clip_vit_ti16")
    student = create_model("clip_vit_ti16", **overrides)
    t_model, t_variables = build_pair_teacher(config)
    mesh = sharding.create_mesh(config.mesh)
    tokenizers = {k: tokenizer_of(s) for k, s in specs.items()}
    images, text, t_text = [], [], []
    for batch in data.build_eval(config, mesh, tokenizers=tokenizers):
        keep = np.asarray(batch["mask"])
        images.append(np.asarray(batch["image"])[keep])
        text.append(np.asarray(batch["text"])[keep])
        t_text.append(np.asarray(batch["teacher_text"])[keep])
    images, text, t_text = map(np.concatenate, (images, text, t_text))

    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    s_image = unit(student.apply(variables, images, method="encode_image"))
    s_text = unit(student.apply(variables, text, method="encode_text"))
    scale = min(np.exp(float(variables["params"]["logit_scale"])), 100.0)
    logits = scale * s_image @ s_text.T
    t_image, t_txt, t_scale = (
        np.asarray(x, np.float64) for x in t_model.apply(t_variables, images, t_text)
    )
    t_logits = float(t_scale) * unit(t_image) @ unit(t_txt).T
    ids = np.arange(8)  # the held-out captions are all different
    for k in (1, 5):
        i2t, t2i = retrieval_reference(logits, ids, k)
        assert final[f"image_to_text_r{k}"] == pytest.approx(i2t, abs=1e-6)
        assert final[f"text_to_image_r{k}"] == pytest.approx(t2i, abs=1e-6)

    def kl(s, t, tau=2.0):  # the seed's F.kl_div(log_softmax(s/T), softmax(t/T), "batchmean")
        ls = s / tau - np.log(np.exp(s / tau).sum(1, keepdims=True))
        lt = t / tau - np.log(np.exp(t / tau).sum(1, keepdims=True))
        return float((np.exp(lt) * (lt - ls)).sum(1).mean())

    expected = (kl(logits, t_logits) + kl(logits.T, t_logits.T)) / 2
    assert final["kl"] == pytest.approx(expected, rel=1e-4)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["eval"]["kl"] == final["kl"]

    # The finished student is an open_clip CLIP too: its state dict loads strictly into
    # open_clip's model of its sizes and embeds the held-out images the same (1e-5).
    import torch
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    from deit_jax.weights.clip import flax_to_open_clip

    theirs = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, patch_size=4, image_size=8, head_width=32),
        text_cfg=CLIPTextCfg(context_length=12, vocab_size=49408, width=32, heads=1, layers=1),
    )
    theirs.load_state_dict(flax_to_open_clip(variables), strict=True)
    with torch.no_grad():
        embedded = theirs.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(unit(embedded), s_image, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "change, key",
    [
        ({"model_name": "deit_tiny_patch16_224"}, "model_name"),
        ({"distillation.kind": "soft"}, "distillation.kind"),
        ({"mixup.mixup_alpha": 0.8}, "mixup.mixup_alpha"),
        ({"data.repeated_aug": 3}, "data.repeated_aug"),
        ({"teacher.framework": "flax"}, "teacher.framework"),
        ({"teacher.cache": "/a,/b"}, "teacher.cache"),
        ({"mode": "quickstart"}, "mode"),
        ({"data.eval_split": "validation"}, "data.eval_split"),
    ],
)
def test_a_caption_runs_bad_config_is_refused_naming_the_key(pairs, teacher, tmp_path, change, key):
    config = student_config(pairs, tmp_path, teacher, **change)
    found = rules.problems(config, num_devices=1, num_processes=1)
    assert any(p.startswith(f"config.{key}=") for p in found), found
    assert not rules.problems(
        student_config(pairs, tmp_path, teacher), num_devices=1, num_processes=1
    )


def test_in_batch_distillation_needs_caption_data(tmp_path):
    config = base_config()
    config.distillation.kind = "in_batch"
    found = rules.problems(config, num_devices=1, num_processes=1)
    assert any("config.distillation.kind='in_batch'" in p and "captions:" in p for p in found)


def test_the_clip_quickstart_runs_as_a_newcomer_would(tmp_path):
    """configs/clip_quickstart.py as a real process, shortened: the teacher trained by open_clip
    and converted, then the four students of one seed, and the table."""
    from _processes import cpu_env

    workdir = tmp_path / "qs"
    cmd = [
        sys.executable,
        "-m",
        "deit_jax.main",
        "--config=configs/clip_quickstart.py",
        f"--workdir={workdir}",
        "--config.clip_quickstart.seeds=(0,)",
        "--config.clip_quickstart.teacher_epochs=2",
        "--config.num_epochs=1",
        "--config.eval_every_epochs=1",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
        "--config.progress_bar=False",
    ]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        cmd, cwd=root, env=cpu_env(1), capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = (workdir / "results.md").read_text()
    for row in ("(a) DeiT", "with labels", "(b) CLIP student", "CLIP loss alone"):
        assert row in table
    results = json.loads((workdir / "results.json").read_text())
    assert 0 <= results["teacher_top1"] <= 1
    assert results["rows"]["clip_kl"]["mean_recall"]["mean"] >= 0
    assert os.path.isfile(workdir / "teacher" / "open_clip.safetensors")
    assert jax.tree.leaves(results["rows"])  # every stage reported


@pytest.fixture(scope="module")
def labelled_test_only(tmp_path_factory):
    """A labelled folder holding only a `test` split (as ImageNet-A, -R and -Sketch hold one
    split): 12 images of 8 px in three classes."""
    from PIL import Image

    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(1)
    for i in range(12):
        folder = root / "test" / WORDS[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return str(root)


def test_a_finished_clip_student_is_evaluated_by_one_command(
    pairs, teacher, labelled_test_only, tmp_path
):
    """`--config.mode=eval` on a finished CLIP student run, as a real process with the shipped
    config: the held-out recall and KL and the zero-shot top-1 on an extra set that has only a
    `test` split (which stopped such a run before its first step), equal to the run's own final
    evaluation, in results.csv."""
    import csv
    import functools

    from _processes import cpu_env

    from deit_jax.data import eval_sets
    from deit_jax.train.loop import train_and_evaluate

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a {}.\n")
    extra = f"folder:{labelled_test_only}:test"
    changes = {
        "teacher.prompts": str(prompts),
        "data.extra_eval": extra,
        "num_epochs": 1.0,
    }
    config = student_config(pairs, tmp_path, teacher, **changes)
    run = tmp_path / "run"
    final = train_and_evaluate(config, str(run))  # stopped here before the mend
    trained = read_jsonl(str(run / "metrics.jsonl"))[-1]
    zero_shot = eval_sets.parse(extra)[0].prefix
    assert f"{zero_shot}/top1" in trained, sorted(trained)
    os.remove(run / "results.csv")

    overrides = {
        **{f"model.{k}": v for k, v in config.model.to_dict().items()},
        **{k: functools.reduce(getattr, k.split("."), config) for k in (
            "data.name", "data.data_dir", "data.train_split", "data.eval_split",
            "data.img_size", "data.crop_pct", "teacher.checkpoint", "teacher.prompts",
            "data.extra_eval", "distillation.tau", "eval_batch_size",
        )},
        "augment.mean": tuple(config.augment.mean),
        "augment.std": tuple(config.augment.std),
    }  # fmt: skip
    cmd = [
        sys.executable, "-m", "deit_jax.main", "--config=configs/clip_quickstart.py",
        f"--workdir={run}", "--config.mode=eval",
        *(f"--config.{k}={v}" for k, v in overrides.items() if v is not None),
    ]  # fmt: skip
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        cmd, cwd=root, env=cpu_env(1), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"evaluation: image_to_text_r1 {100 * final['image_to_text_r1']:.2f}" in result.stdout
    assert f"mean_recall {100 * final['mean_recall']:.2f}" in result.stdout
    assert f"{zero_shot} evaluation: top1 {100 * trained[f'{zero_shot}/top1']:.2f}" in (
        result.stdout
    )
    with open(run / "results.csv") as f:
        rows = {r["set"]: r for r in csv.DictReader(f)}
    held_out = rows[f"captions:{pairs}:train[16:]"]
    assert float(held_out["mean_recall"]) == pytest.approx(100 * final["mean_recall"], abs=1e-3)
    assert float(held_out["kl"]) == pytest.approx(final["kl"], rel=1e-5)
    top1 = float(rows[f"{extra}"]["top1"])
    assert top1 == pytest.approx(100 * trained[f"{zero_shot}/top1"], abs=1e-3)
    assert rows[extra]["teacher_top1"] and rows[extra]["agreement"]
