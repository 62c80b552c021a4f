"""Input pipelines on real data (the digits builder, an image folder) and a real 8-device mesh."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from test_data_sources import records, write_folder

from deit_jax.config import IMAGENET_MEAN, IMAGENET_STD, base_config
from deit_jax.data import build_eval, build_train, catalog, dataset_info

SIZE = 32


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    config = digits_config(path)
    dataset_info(config)  # prepares digits once, before any test (or subprocess) reads it
    return path


def digits_config(data_dir: str, **data):
    config = base_config()
    config.data.name = "digits"
    config.data.data_dir = data_dir
    config.data.eval_split = "test"
    config.data.img_size = SIZE
    config.data.repeated_aug = 1
    config.batch_size = 32
    config.eval_batch_size = 64
    for k, v in data.items():
        config.data[k] = v
    return config


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((8,), ("data",))


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
    return [{k: np.asarray(v) for k, v in next(iterator).items()} for _ in range(n)]


@pytest.fixture(scope="module")
def seed0_run(digits_dir, mesh):
    """Eight batches of an uninterrupted run (5 steps an epoch: crosses an epoch boundary)."""
    config = digits_config(digits_dir, train_split="train[:160]")
    with build_train(config, mesh, with_ids=True) as train:
        assert train.steps_per_epoch == 5
        first = next(train)
        return first, [{k: np.asarray(v) for k, v in first.items()}] + take(train, 7)


def test_train_batches(seed0_run, digits_dir):
    first, batches = seed0_run
    assert set(first) == {"image", "target", "label", "id"}
    for key, shape, dtype in (
        ("image", (32, SIZE, SIZE, 3), np.float32),
        ("target", (32, 10), np.float32),
        ("label", (32,), np.int32),
    ):
        assert first[key].shape == shape and first[key].dtype == dtype
        assert first[key].sharding.spec == P(("data",))
        assert len(first[key].sharding.device_set) == 8
    for b in batches:
        assert np.isfinite(b["image"]).all()
        # Normalised with the ImageNet statistics: [0, 1] maps into [-2.2, 2.7]; random erasing
        # adds standard normal noise, so allow a little more.
        assert -6 < b["image"].min() < -1.5 and 1.5 < b["image"].max() < 6
        assert ((b["label"] >= 0) & (b["label"] < 10)).all()
        np.testing.assert_allclose(b["target"].sum(1), 1.0, atol=1e-5)
        assert (b["target"] >= 0).all() and (b["target"] <= 1).all()
        # Label smoothing 0.1 and mixup: a target never puts more than 1 - 0.1 + 0.01 anywhere.
        assert b["target"].max() <= 0.91 + 1e-6
    # One epoch is 5 batches of distinct examples (no repeated augmentation in this config).
    epoch = np.concatenate([b["id"] for b in batches[:5]])
    assert len(set(epoch.tolist())) == 160 and epoch.max() < 160


def test_same_seed_same_stream_other_seed_other_stream(seed0_run, digits_dir, mesh):
    _, reference = seed0_run
    config = digits_config(digits_dir, train_split="train[:160]")
    with build_train(config, mesh, with_ids=True) as train:
        again = take(train, 2)
    config.seed = 1
    with build_train(config, mesh, with_ids=True) as train:
        other = take(train, 2)
    for a, b in zip(reference, again, strict=False):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(reference[0]["id"], other[0]["id"])
    assert not np.allclose(reference[0]["image"], other[0]["image"])


def test_resume_continues_the_same_stream(seed0_run, digits_dir, mesh):
    _, reference = seed0_run
    config = digits_config(digits_dir, train_split="train[:160]")
    with build_train(config, mesh, with_ids=True) as train:
        take(train, 3)
        state = json.loads(json.dumps(train.get_state()))
    assert state["epoch"] == 0 and state["step"] == 3
    with build_train(config, mesh, with_ids=True) as resumed:
        resumed.set_state(state)
        rest = take(resumed, 5)  # the last two of epoch 0, then the first three of epoch 1
        assert resumed.get_state()["epoch"] == 1
    for a, b in zip(reference[3:], rest, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_fixed_share_count_feeds_each_share_its_part_of_the_batch(digits_dir, mesh):
    # num_shares=2 in one process: rows 0-15 come from the first half of the split, rows 16-31
    # from the second, as two processes would feed them (tests/test_train_processes.py compares
    # whole training runs).
    config = digits_config(digits_dir, train_split="train[:160]", num_shares=2)
    with build_train(config, mesh, with_ids=True) as train:
        batches = take(train, 5)  # One epoch.
        assert train.get_state()["num_shares"] == 2
    ids = np.stack([b["id"] for b in batches])
    assert (ids[:, :16] < 80).all() and (ids[:, 16:] >= 80).all()
    assert len(set(ids.ravel().tolist())) == 160
    with pytest.raises(ValueError, match="num_shares=3"):
        build_train(digits_config(digits_dir, num_shares=3), mesh)


def test_repeated_augmentation_takes_a_third_three_times(digits_dir, mesh):
    config = digits_config(digits_dir, train_split="train[:192]", repeated_aug=3)
    config.mixup.prob = 0.0  # compare the augmented images themselves
    with build_train(config, mesh, with_ids=True) as train:
        assert train.steps_per_epoch == 6  # the epoch is as long as the data set
        epochs = [take(train, 6) for _ in range(2)]
    distinct_sets = []
    for batches in epochs:
        ids = np.concatenate([b["id"] for b in batches])
        images = np.concatenate([b["image"] for b in batches])
        assert len(ids) == 192
        # 64 distinct images, each three times in a row, under three different augmentations.
        triples = ids.reshape(64, 3)
        assert (triples == triples[:, :1]).all() and len(set(ids.tolist())) == 64
        copies = images.reshape(64, 3, -1)
        assert not np.allclose(copies[:, 0], copies[:, 1])
        assert not np.allclose(copies[:, 1], copies[:, 2])
        distinct_sets.append(set(ids.tolist()))
    assert distinct_sets[0] != distinct_sets[1]  # each epoch draws its own third


def test_eval_counts_every_example_once(digits_dir, mesh):
    config = digits_config(digits_dir)
    evaluation = build_eval(config, mesh, with_ids=True)
    assert evaluation.num_examples == 360 and evaluation.steps == 6 == len(evaluation)
    digits = catalog.get_source(config.data)
    labels = {int(r["id"]): int(r["label"]) for r in records(digits, "test")}
    for _ in range(2):  # every pass is a full pass
        ids, masked_images = [], []
        for batch in evaluation:
            assert set(batch) == {"image", "label", "mask", "id"}
            assert batch["image"].shape == (64, SIZE, SIZE, 3)
            assert batch["mask"].dtype == np.bool_ and batch["mask"].sharding.spec == P(("data",))
            mask = np.asarray(batch["mask"])
            ids += np.asarray(batch["id"])[mask].tolist()
            assert (np.asarray(batch["id"])[~mask] == -1).all()
            assert [labels[i] for i in np.asarray(batch["id"])[mask]] == np.asarray(batch["label"])[
                mask
            ].tolist()
            masked_images.append(np.asarray(batch["image"])[mask])
        assert sorted(ids) == list(range(360))
    # Grey digits become three equal channels before normalisation.
    pixels = np.concatenate(masked_images) * IMAGENET_STD + IMAGENET_MEAN
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-5)
    plain = build_eval(config, mesh)
    assert set(next(iter(plain))) == {"image", "label", "mask"}


def test_eval_over_two_processes_counts_every_example_once(digits_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = os.path.join(os.path.dirname(__file__), "_data_worker.py")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": repo}
    outs = [os.path.join(digits_dir, f"worker{i}.json") for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(i), str(port), digits_dir, outs[i]],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    reports = []
    for out in outs:
        with open(out) as f:
            reports.append(json.load(f))
    # Every process ran the same number of steps; the union of the counted ids is the split.
    assert [r["steps"] for r in reports] == [8, 8] == [r["declared_steps"] for r in reports]
    assert [len(r["eval_ids"]) for r in reports] == [177, 178]
    counted = reports[0]["eval_ids"] + reports[1]["eval_ids"]
    assert sorted(counted) == list(range(355))
    digits = catalog.get_source(digits_config(digits_dir).data)
    labels = {int(r["id"]): int(r["label"]) for r in records(digits, "test")}
    for r in reports:
        assert r["eval_labels"] == [labels[i] for i in r["eval_ids"]]
    # Training: each process feeds its half of every batch from its own half of the data.
    half = 1437 // 2
    for step in range(2):
        assert all(i < half for i in reports[0]["train_ids"][step])
        assert all(i >= half for i in reports[1]["train_ids"][step])
        assert len(reports[0]["train_ids"][step]) == 8


def test_folder_pipeline_with_a_corrupt_image(tmp_path, mesh):
    good = write_folder(tmp_path / "images")
    config = base_config()
    config.data.name = f"folder:{tmp_path / 'images'}"
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.eval_split = "val"
    config.data.img_size = SIZE
    config.data.repeated_aug = 1
    config.batch_size = config.eval_batch_size = 8
    info = dataset_info(config)
    assert (info.num_classes, info.num_train, info.num_eval) == (3, good["train"], good["val"])
    assert info.image_shape == (SIZE, SIZE, 3)
    with build_train(config, mesh, with_ids=True) as train:
        assert train.steps_per_epoch == 1
        batches = take(train, 3)
    for b in batches:  # grey, RGBA and JPEG files all come out as RGB
        assert b["image"].shape == (8, SIZE, SIZE, 3) and np.isfinite(b["image"]).all()
    ids = set()
    for batch in build_eval(config, mesh, with_ids=True):
        mask = np.asarray(batch["mask"])
        ids.update(np.asarray(batch["id"])[mask].tolist())
    assert ids == set(range(good["val"]))


def test_batches_shard_over_several_data_axes(digits_dir):
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
    config = digits_config(digits_dir)
    evaluation = build_eval(config, mesh, data_axes=("data", "fsdp"))
    batch = next(iter(evaluation))
    assert batch["image"].sharding.spec == P(("data", "fsdp"))
    replicated = next(iter(build_eval(config, mesh, data_axes=("data",))))
    assert replicated["image"].sharding.spec == P(("data",))
    np.testing.assert_array_equal(np.asarray(batch["image"]), np.asarray(replicated["image"]))
    config.eval_batch_size = 12
    with pytest.raises(ValueError, match="multiple of 8"):
        build_eval(config, mesh, data_axes=("data", "fsdp"))
    with pytest.raises(ValueError, match="not axes of the mesh"):
        build_eval(config, mesh, data_axes=("batch",))
