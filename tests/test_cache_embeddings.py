"""Embedding targets in the teacher cache (`--config.teacher.cache_embeddings=True`): the writer
stores each example's teacher embedding next to its top-k logits, and `distillation.kind=feature`
trains from the cache without the teacher.

A random `cnn_small` teacher (128 pooled features) and the tiny DeiT student (32 wide, through the
learned projection) on the tiny config's stream (tests/_train_config.py: 8 steps of 32 digits at
16x16). Tolerances: a float32 cache gives the live run's losses to a relative 1e-5 and its
parameters to 1e-4 absolute (tests/test_teacher_cache.py's bounds for the logit cache); a float16
cache holds the float32 one rounded to float16 (relative 2^-11).
"""

import json
import os

import jax
import numpy as np
import pytest
from _train_config import save_random_teacher, tiny_config

from deit_jax import data, sharding, train
from deit_jax.teacher import cache
from deit_jax.teacher.build import build_teacher
from deit_jax.teacher.cache import store
from deit_jax.teacher.forward import teacher_features
from deit_jax.train.metrics import read_jsonl
from deit_jax.weights.directory import load_variables

STEPS = 8
# The manifest's layout keys of a cache without embeddings: the same as before they existed.
LOGITS_LAYOUT = {
    "num_epochs", "steps_per_epoch", "total_steps", "batch_size", "num_shares", "topk",
    "chunk_steps", "values_dtype", "indices_dtype",
}  # fmt: skip


def feature_config(data_dir, teacher="", **changes):
    base = {
        "distillation.kind": "feature",
        "teacher.name": "cnn_small",
        "teacher.checkpoint": teacher,
        "teacher.cache_chunk_steps": 3,
        "teacher.cache_embeddings": True,
    }
    return tiny_config(data_dir, **{**base, **changes})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_random_teacher(str(tmp_path_factory.mktemp("teacher") / "weights"))


@pytest.fixture(scope="module")
def caches(data_dir, teacher_dir, tmp_path_factory):
    """The teacher's cache with float32 and with float16 (the default) embeddings."""
    paths = {}
    for dtype in ("float32", "float16"):
        path = str(tmp_path_factory.mktemp(f"cache_{dtype}"))
        config = feature_config(data_dir, teacher_dir, **{"teacher.cache_embedding_dtype": dtype})
        summary = cache.write_cache(config, path, devices=jax.devices()[:1])
        assert summary["steps_written"] == STEPS
        paths[dtype] = path
    return paths


def losses_and_params(workdir):
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    losses = np.array([r["train/loss_distillation"] for r in records if "train/loss" in r])
    return losses, load_variables(os.path.join(workdir, "weights"))[0]["params"]


def test_the_cache_stores_the_teachers_features_of_each_batch(data_dir, teacher_dir, caches):
    config = feature_config(data_dir, teacher_dir)
    teacher, variables = build_teacher(config, 10)
    stored = {k: cache.CacheStore(p).read_all() for k, p in caches.items()}
    assert stored["float32"]["embeddings"].shape == (1, 44, 32, 128)
    assert stored["float16"]["embeddings"].dtype == np.float16
    mesh = sharding.create_mesh(config.mesh, jax.devices()[:1])
    with data.build_train(config, mesh, data_axes=sharding.DATA_AXES) as batches:
        for step in range(STEPS):
            expected = np.asarray(teacher_features(teacher, variables, next(batches)["image"]))
            np.testing.assert_allclose(
                stored["float32"]["embeddings"][0, step], expected, rtol=1e-6, atol=1e-6
            )
    f32, f16 = (
        stored["float32"]["embeddings"][0, :STEPS],
        stored["float16"]["embeddings"][0, :STEPS],
    )
    np.testing.assert_array_equal(f16, f32.astype(np.float16))
    # The logits stay what a cache without embeddings holds (the same forward pass).
    assert stored["float32"]["values"].dtype == np.float16


def test_feature_distillation_from_cached_embeddings_equals_the_live_run(
    data_dir, teacher_dir, caches, tmp_path
):
    devices = jax.devices()[:1]
    live, cached = str(tmp_path / "live"), str(tmp_path / "cached")
    train.train_and_evaluate(feature_config(data_dir, teacher_dir), live, devices=devices)
    reading = feature_config(data_dir, **{"teacher.cache": caches["float32"]})
    train.train_and_evaluate(reading, cached, devices=devices)
    (live_losses, live_params), (cached_losses, cached_params) = (
        losses_and_params(live),
        losses_and_params(cached),
    )
    assert len(live_losses) == STEPS and (live_losses > 0).all()
    np.testing.assert_allclose(cached_losses, live_losses, rtol=1e-5)
    assert "projection" in cached_params or "projection" not in live_params
    for x, y in zip(jax.tree.leaves(cached_params), jax.tree.leaves(live_params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def plain_cache(data_dir, teacher_dir, tmp_path_factory):
    """A cache of 3 steps without embeddings (as every cache before them), and its summary."""
    path = str(tmp_path_factory.mktemp("plain"))
    changes = {"teacher.cache_embeddings": False, "distillation.kind": "hard", "num_epochs": 3 / 44}
    config = feature_config(data_dir, teacher_dir, **changes)
    return path, cache.write_cache(config, path, devices=jax.devices()[:1])


def test_the_layout_and_the_storage_per_example(caches, plain_cache):
    with open(os.path.join(caches["float16"], "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["layout"]["embedding_dim"] == 128
    assert manifest["layout"]["embedding_dtype"] == "float16"
    assert manifest["teacher"]["teacher.cache_embedding_dtype"] == "float16"
    # Top-10 float16 values and int16 indices: 40 bytes; a 128-wide float16 embedding adds 256.
    assert store.Layout(**manifest["layout"]).bytes_per_example() == 296
    # A cache without embeddings keeps the manifest it had before they existed.
    plain, summary = plain_cache
    with open(os.path.join(plain, "manifest.json")) as f:
        plain_manifest = json.load(f)
    assert set(plain_manifest["layout"]) == LOGITS_LAYOUT
    assert "teacher.cache_embedding_dtype" not in plain_manifest["teacher"]
    assert sorted(os.listdir(plain)) == ["indices", "manifest.json", "values"]
    assert summary["bytes_per_example"] == 40


def test_a_feature_run_from_a_cache_without_embeddings_is_refused_before_any_build(
    data_dir, plain_cache, tmp_path
):
    reading = feature_config(data_dir, **{"teacher.cache": plain_cache[0]})
    with pytest.raises(cache.CacheError) as e:
        train.train_and_evaluate(reading, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert "holds no teacher embeddings" in str(e.value)
    assert "--config.teacher.cache_embeddings=True" in str(e.value)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_completing_a_cache_with_other_embeddings_is_refused_naming_the_keys(
    data_dir, teacher_dir, caches
):
    other = feature_config(data_dir, teacher_dir, **{"teacher.cache_embedding_dtype": "float32"})
    with pytest.raises(cache.CacheError, match="was written with another config") as e:
        cache.write_cache(other, caches["float16"], devices=jax.devices()[:1])
    # Refused before the teacher is built: the teacher key (the layout's follows the teacher).
    assert "config.teacher.cache_embedding_dtype: cache 'float16', this run 'float32'" in str(
        e.value
    )
