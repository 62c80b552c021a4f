"""Eval sets that hold only some of the model's classes (ImageNet-A and -R hold 200 of 1,000),
scored on those classes only, and the results table of `--config.mode=eval`.

The set is a real tfds builder, prepared by the test: 200 of 1,000 classes (every fifth), one
random 8x8 image each, split `test` only, labelled like tfds's ImageNet-R (a ClassLabel of all
1,000). The model is a random 1,000-class tiny DeiT; evaluated through `train.evaluate` as
`--config.mode=eval --config.init_from=WEIGHTS` runs it. References are NumPy's, on the model's
logits for the same preprocessed images; accuracies agree to 1e-6.
"""

import csv
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from _train_config import tiny_config

from deit_jax import data as data_lib
from deit_jax import sharding, train
from deit_jax.models import create_model
from deit_jax.weights.directory import save_variables

SUBSET = np.arange(0, 1000, 5)  # 200 classes
OUTSIDE = 999
OVERRIDES = dict(embed_dim=32, depth=2, num_heads=2, patch_size=4, img_size=16, num_classes=1000)


class SubsetOfImagenet(tfds.core.GeneratorBasedBuilder):
    """200 of ImageNet's 1,000 classes, one image each, in a split `test` (no training split)."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # no checksums file to look for beside the code (deit_jax/data/digits.py)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 3)),
                    "label": tfds.features.ClassLabel(num_classes=1000),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(0)
        for i, label in enumerate(SUBSET):
            yield i, {"image": rng.integers(0, 256, (8, 8, 3), np.uint8), "label": int(label)}


def save_model(path, outside_bias=0.0):
    """A random tiny DeiT of 1,000 classes; `outside_bias` added to class OUTSIDE's logit."""
    model = create_model("deit_tiny_patch16_224", **OVERRIDES)
    variables = nn.meta.unbox(model.init(jax.random.key(3), np.zeros((1, 16, 16, 3), np.float32)))
    variables = jax.tree.map(np.array, dict(variables))  # writable copies
    variables["params"]["head"]["bias"][OUTSIDE] += outside_bias
    save_variables(path, variables, model_name="deit_tiny_patch16_224", model_overrides=OVERRIDES)
    return model, variables


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("subset")
    SubsetOfImagenet(data_dir=str(path)).download_and_prepare()
    return str(path)


def eval_config(data_dir, weights, **changes):
    config = tiny_config(data_dir, **changes)
    config.mode = "eval"
    config.data.name = "subset_of_imagenet"
    config.data.eval_split = "test"  # the config's train split, 'train', does not exist
    config.eval_batch_size = 64
    config.init_from = str(weights)
    config.distillation.kind = "none"
    config.model_name = "deit_tiny_patch16_224"
    return config


def reference(config, model, variables):
    """(labels, logits) of every eval image, by image id, from the model outside any step."""
    mesh = sharding.create_mesh(config.mesh, jax.devices()[:1])
    labels, logits = np.zeros(200, np.int64), np.zeros((200, 1000), np.float32)
    predict = jax.jit(lambda x: model.apply(variables, x))
    for batch in data_lib.build_eval(config, mesh, with_ids=True):
        keep = np.asarray(batch["mask"])
        ids = np.asarray(batch["id"])[keep]
        labels[ids] = np.asarray(batch["label"])[keep]
        logits[ids] = np.asarray(predict(batch["image"]))[keep]
    return labels, logits


def topk_on_subset(labels, logits, k):
    scored = logits[:, SUBSET]
    ranked = SUBSET[np.argsort(-scored, axis=1)[:, :k]]
    return float((ranked == labels[:, None]).any(1).mean())


@pytest.mark.parametrize("outside_bias", [0.0, 100.0], ids=["random", "best_logit_outside"])
def test_a_200_of_1000_class_set_is_scored_on_its_classes(data_dir, tmp_path, caplog, outside_bias):
    model, variables = save_model(tmp_path / "weights", outside_bias)
    config = eval_config(data_dir, tmp_path / "weights")
    with caplog.at_level("INFO"):
        metrics = train.evaluate(config, str(tmp_path / "work"), devices=jax.devices()[:1])
    assert "scoring 200 of the model's 1000 classes" in caplog.text
    labels, logits = reference(config, model, variables)
    assert set(labels) == set(SUBSET)
    assert metrics["count"] == 200 and metrics["scored_classes"] == 200
    assert metrics["top1"] == pytest.approx(topk_on_subset(labels, logits, 1), abs=1e-6)
    assert metrics["top5"] == pytest.approx(topk_on_subset(labels, logits, 5), abs=1e-6)
    if outside_bias:  # over all 1,000 classes it would score 0: OUTSIDE wins every image
        assert (logits.argmax(1) == OUTSIDE).all()
        assert metrics["top1"] > 0
    # The classes were kept beside the data: a second evaluation reads no labels.
    assert os.listdir(os.path.join(data_dir, "deit_jax_eval_classes"))
    caplog.clear()
    with caplog.at_level("INFO"):
        again = train.evaluate(config, str(tmp_path / "work"), devices=jax.devices()[:1])
    assert "reading its 200 labels" not in caplog.text and again["top1"] == metrics["top1"]


def test_results_csv_and_md_hold_the_metrics_of_every_set(data_dir, tmp_path):
    save_model(tmp_path / "weights")
    workdir = tmp_path / "work"
    config = eval_config(
        data_dir, tmp_path / "weights", **{"data.extra_eval": "subset_of_imagenet:test[:100]"}
    )
    metrics = train.evaluate(config, str(workdir), devices=jax.devices()[:1])
    with open(workdir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "set", "model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size",
        "crop_pct", "interpolation", "classes",
    ]  # fmt: skip
    assert [r["set"] for r in rows] == ["subset_of_imagenet:test", "subset_of_imagenet:test[:100]"]
    extra = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("eval_")}
    params = sum(x.size for x in jax.tree.leaves(save_model(tmp_path / "again")[1]["params"]))
    for row, values in zip(rows, (metrics, extra), strict=True):
        assert float(row["top1"]) == pytest.approx(100 * values["top1"], abs=5e-4)
        assert float(row["top1_err"]) == pytest.approx(100 - 100 * values["top1"], abs=5e-4)
        assert float(row["top5"]) == pytest.approx(100 * values["top5"], abs=5e-4)
        assert int(row["classes"]) == values["scored_classes"]
        assert row["model"] == "deit_tiny_patch16_224" and row["img_size"] == "16"
        assert (row["crop_pct"], row["interpolation"]) == ("0.875", "bicubic")
        assert float(row["param_count"]) == pytest.approx(params / 1e6, abs=5e-3)
    assert int(rows[1]["classes"]) == 100  # the first 100 images: classes 0, 5, ..., 495
    table = (workdir / "results.md").read_text().splitlines()
    assert table[0].startswith("| set | model | top1 |") and len(table) == 2 + len(rows)
    assert f"| {rows[0]['top1']} |" in table[2]


def test_eval_mode_reads_only_the_split_it_scores(tmp_path):
    """A model evaluated on a folder that has only `test/`: the config's training split
    ('train', which the folder lacks) is not looked at, through the real command line."""
    import subprocess
    import sys

    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path / "other"
    for label in range(10):
        (root / "test" / str(label)).mkdir(parents=True)
        for i, image in enumerate(digits.images[digits.target == label][:3]):
            pixels = np.round(image * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels).save(root / "test" / str(label) / f"{i}.png")
    overrides = {**OVERRIDES, "num_classes": 10}
    model = create_model("deit_tiny_patch16_224", **overrides)
    variables = nn.meta.unbox(model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32)))
    weights = tmp_path / "weights"
    save_variables(
        weights, dict(variables), model_name="deit_tiny_patch16_224", model_overrides=overrides
    )
    config = os.path.join(os.path.dirname(__file__), "_train_config.py")
    flags = [
        "--config.mode=eval", f"--config.init_from={weights}", f"--config.data.name=folder:{root}",
        "--config.data.eval_split=test", "--config.distillation.kind=none",
        "--config.model_name=deit_tiny_patch16_224", f"--config.data.data_dir={tmp_path / 'tfds'}",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "deit_jax.main", f"--config={config}", f"--workdir={tmp_path / 'w'}"]
        + flags,
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "does not exist" not in result.stderr
    with open(tmp_path / "w" / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["set"] == f"folder:{root}:test" and row["classes"] == "10"
