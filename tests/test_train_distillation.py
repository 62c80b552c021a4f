"""Distilling a plain student (no distillation token) end to end: soft, hard and feature KD.

A tiny plain DeiT (32 wide) learns from a `cnn_small` teacher (128 pooled features, so feature
KD trains a 32 -> 128 projection) on the offline digits data, 8 steps. Tolerances as
tests/test_train.py: a 2-device mesh against 1 device to a relative 1e-4 on the losses and
1e-4 absolute on the parameters; a resumed run against the uninterrupted one to 1e-6.
"""

import logging
import os
import shutil
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from _train_config import save_random_teacher, tiny_config

from deit_jax import train
from deit_jax.models import create_model, list_models, register_model
from deit_jax.teacher import cache
from deit_jax.train.metrics import read_jsonl
from deit_jax.weights.directory import load_variables, save_variables

STUDENT = "deit_tiny_patch16_224"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def convnet_config(data_dir, name="cnn_small", **changes):
    config = tiny_config(data_dir, model_name=name, **changes)
    with config.unlocked():
        config.model = ml_collections.ConfigDict({"num_classes": None})
    config.optim.ema_decay = 0.0
    return config


@pytest.fixture(scope="module")
def teacher(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("teacher")
    train.train_and_evaluate(convnet_config(data_dir), str(workdir))
    return str(workdir / "weights")


def student_config(data_dir, teacher, kind, **changes):
    changes = {
        "distillation.kind": kind,
        "distillation.kl_reduction": "batchmean",
        "distillation.tau": 2.0,
        "teacher.name": "cnn_small",
        "teacher.checkpoint": teacher,
        **changes,
    }
    return tiny_config(data_dir, model_name=STUDENT, **changes)


def train_losses(workdir):
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return [(r["train/loss"], r["train/loss_distillation"]) for r in records if "train/loss" in r]


def checkpoint_params(workdir):
    """The params subtree of the latest training checkpoint (a plain Orbax read)."""
    import orbax.checkpoint as ocp

    directory = os.path.join(workdir, "checkpoints")
    step = max(int(d) for d in os.listdir(directory) if d.isdigit())
    with ocp.StandardCheckpointer() as reader:
        return reader.restore(os.path.join(directory, str(step), "state"))["params"]


def assert_trees_close(a, b, atol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def assert_exported_student(workdir, stored):
    """The exported weights are the student alone, usable for inference without a projection."""
    variables, metadata = load_variables(os.path.join(workdir, "weights"))
    assert "projection" not in variables["params"] and metadata["model_name"] == STUDENT
    assert_trees_close(
        variables["params"], {k: v for k, v in stored.items() if k != "projection"}, 0
    )
    model = create_model(STUDENT, **metadata["model_overrides"])
    logits = model.apply(variables, np.zeros((2, 16, 16, 3), np.float32), train=False)
    assert logits.shape == (2, 10) and np.all(np.isfinite(logits))


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_plain_student_logit_kd_on_a_two_device_mesh(kind, data_dir, teacher, tmp_path):
    config = student_config(data_dir, teacher, kind)
    one = train.train_and_evaluate(config, str(tmp_path / "one"), devices=jax.devices()[:1])
    metrics = train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:2])
    losses = np.array(train_losses(tmp_path))
    assert losses.shape == (8, 2) and np.all(np.isfinite(losses)) and np.all(losses[:, 1] > 0)
    np.testing.assert_allclose(losses, train_losses(tmp_path / "one"), rtol=1e-4)
    for key in ("top1", "teacher_top1", "agreement"):
        assert metrics[key] == pytest.approx(one[key], abs=1 / 360), key
    stored = checkpoint_params(tmp_path)
    assert "projection" not in stored  # the checkpoint layout of logit KD is the usual one
    assert_exported_student(tmp_path, stored)


def test_plain_student_feature_kd_one_and_two_devices_resume_and_export(
    data_dir, teacher, tmp_path, caplog
):
    config = student_config(data_dir, teacher, "feature")
    one = str(tmp_path / "one")
    metrics = train.train_and_evaluate(config, one, devices=jax.devices()[:1])
    losses = np.array(train_losses(one))
    assert losses.shape == (8, 2) and np.all(np.isfinite(losses)) and np.all(losses[:, 1] > 0)
    stored = checkpoint_params(one)
    assert stored["projection"]["fc"]["kernel"].shape == (32, 128)  # DeiT 32 -> cnn_small 128

    two = str(tmp_path / "two")
    train.train_and_evaluate(config, two, devices=jax.devices()[:2])
    np.testing.assert_allclose(train_losses(two), losses, rtol=1e-4)
    assert_trees_close(checkpoint_params(two), stored, atol=1e-4)

    # Resume: drop everything after the step-4 checkpoint and train again.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(one, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "8"))
    shutil.rmtree(os.path.join(resumed, "weights"))
    with caplog.at_level(logging.INFO, logger="deit_jax.train"):
        train.train_and_evaluate(config, resumed, devices=jax.devices()[:1])
    assert "Resumed from step 4 in" in caplog.text
    # The copied metrics hold steps 1-8; the resumed run appended 5-8 (a restart, 1-8), and
    # the redone steps repeat the uninterrupted run's losses.
    records = read_jsonl(os.path.join(resumed, "metrics.jsonl"))
    assert [r["step"] for r in records if "train/loss" in r] == [*range(1, 9), 5, 6, 7, 8]
    np.testing.assert_allclose(train_losses(resumed)[8:], losses[4:], rtol=1e-6)
    assert_trees_close(checkpoint_params(resumed), stored, atol=1e-6)

    # Evaluating the checkpoint restores the state with its projection.
    assert train.evaluate(config, one, devices=jax.devices()[:1])["top1"] == metrics["top1"]
    assert_exported_student(one, stored)
    plain = tiny_config(data_dir, model_name=STUDENT, init_from=os.path.join(one, "weights"))
    evaluated = train.evaluate(plain, str(tmp_path / "eval"), devices=jax.devices()[:1])
    assert evaluated["top1"] == metrics["top1"]


class _NoFeatures(nn.Module):
    """A classifier that sows no pooled features."""

    num_classes: int = 10
    img_size: int = 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, *, train=False):
        return nn.Dense(self.num_classes)(images.mean(axis=(1, 2)))


if "test_without_features" not in list_models():
    register_model("test_without_features", _NoFeatures)


def random_weights(directory, name, **overrides):
    """A weights directory of a freshly initialised registry model (a teacher for error tests)."""
    model = create_model(name, **overrides)
    variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))
    variables = {k: v for k, v in variables.items() if k != "intermediates"}
    save_variables(directory, nn.meta.unbox(variables), model_name=name, model_overrides=overrides)
    return str(directory)


def test_feature_kd_with_models_that_expose_no_features_is_refused(data_dir, tmp_path):
    bare = random_weights(tmp_path / "bare", "test_without_features")
    config = student_config(data_dir, bare, "feature")
    config.teacher.name = "test_without_features"
    with pytest.raises(ValueError, match="_NoFeatures exposes no pooled features"):
        train.train_and_evaluate(config, str(tmp_path / "a"))
    student = convnet_config(data_dir, "test_without_features", **{"distillation.kind": "feature"})
    student.teacher.name = "cnn_small"
    student.teacher.checkpoint = random_weights(tmp_path / "cnn", "cnn_small", img_size=16)
    with pytest.raises(ValueError, match="_NoFeatures exposes no pooled features"):
        train.train_and_evaluate(student, str(tmp_path / "b"))


def test_unknown_kl_reduction_in_the_config_is_refused(data_dir, tmp_path):
    config = student_config(data_dir, "never read", "soft", **{"distillation.kl_reduction": "sum"})
    with pytest.raises(ValueError, match="distillation.kl_reduction='sum': must be 'numel'"):
        train.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_logit_kd_from_a_teacher_of_another_class_count_is_refused(kind, data_dir, tmp_path):
    five = random_weights(tmp_path / "five", "cnn_small", num_classes=5, img_size=16)
    config = student_config(data_dir, five, kind)
    with pytest.raises(ValueError, match="predicts 5 classes but data set 'digits' has 10"):
        train.train_and_evaluate(config, str(tmp_path / "student"))


def test_plain_student_hard_kd_from_the_teacher_cache_equals_the_live_teacher(data_dir, tmp_path):
    """The cache serves a single-head student as it serves a distilled one (tolerances of
    tests/test_teacher_cache.py: losses to a relative 1e-5)."""
    weights = save_random_teacher(str(tmp_path / "teacher"))
    live = student_config(data_dir, weights, "hard")
    cache.write_cache(live, str(tmp_path / "cache"), devices=jax.devices()[:1])
    train.train_and_evaluate(live, str(tmp_path / "live"), devices=jax.devices()[:1])
    cached = student_config(data_dir, "", "hard", **{"teacher.cache": str(tmp_path / "cache")})
    train.train_and_evaluate(cached, str(tmp_path / "cached"), devices=jax.devices()[:1])
    live_losses = np.array(train_losses(tmp_path / "live"))
    assert live_losses.shape == (8, 2)
    np.testing.assert_allclose(train_losses(tmp_path / "cached"), live_losses, rtol=1e-5)
