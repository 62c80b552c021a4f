"""Data sources: the digits tfds builder, image folders, shards, and the errors users meet."""

import io
import logging
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from deit_jax.data import catalog
from deit_jax.errors import DataError


def data_config(name: str, data_dir, manual_dir: str = "") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {"name": name, "data_dir": str(data_dir), "manual_dir": manual_dir}
    )


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return catalog.get_source(data_config("digits", tmp_path_factory.mktemp("tfds")))


def records(source, split, *args, **kwargs):
    ds = source.read(split, *args, **kwargs)
    return list(ds.map(lambda r: {"id": r["id"], **source.load(r)}).as_numpy_iterator())


def write_folder(root, corrupt: bool = True) -> dict[str, int]:
    """root/<split>/<class>/ images in JPEG, grey PNG and RGBA PNG; returns good counts."""
    rng = np.random.default_rng(0)
    good = {"train": 0, "val": 0}
    for split, per_class in (("train", 5), ("val", 3)):
        for c, cls in enumerate(("cat", "dog", "emu")):
            os.makedirs(root / split / cls)
            for i in range(per_class):
                h, w = 20 + 3 * i, 24 + c
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                if i % 3 == 0:
                    Image.fromarray(pixels).save(root / split / cls / f"{i}.jpg", quality=90)
                elif i % 3 == 1:
                    Image.fromarray(pixels[..., 0], "L").save(root / split / cls / f"{i}.png")
                else:
                    rgba = np.concatenate([pixels, pixels[..., :1]], -1)
                    Image.fromarray(rgba, "RGBA").save(root / split / cls / f"{i}.PNG")
                good[split] += 1
    (root / "train" / "dog" / "notes.txt").write_text("not an image, not listed")
    if corrupt:
        (root / "train" / "cat" / "garbage.jpg").write_bytes(b"\x00 not a jpeg at all")
        whole = (root / "train" / "dog" / "0.jpg").read_bytes()
        (root / "train" / "emu" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    return good


def test_digits_builder_is_a_stratified_deterministic_split(digits, tmp_path):
    from sklearn.datasets import load_digits

    assert digits.num_classes == 10
    assert digits.split_sizes() == {"train": 1437, "test": 360}
    train, test = records(digits, "train"), records(digits, "test")
    sk = load_digits()
    # Class proportions are the same in both splits (stratified): at most one image off.
    for c in range(10):
        n_test = sum(r["label"] == c for r in test)
        assert abs(n_test - (sk.target == c).sum() * 360 / 1797) <= 1
    # The images are scikit-learn's, scaled 0..16 -> 0..255, one grey channel.
    expected = np.round(sk.images * 255 / 16).astype(np.uint8)
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(r["image"]))) for r in test])
    assert decoded.shape == (360, 8, 8) and decoded.dtype == np.uint8 and decoded.max() == 255
    sk_index = {e.tobytes(): i for i, e in enumerate(expected)}
    rows = [sk_index[d.tobytes()] for d in decoded]  # KeyError: an image that is not digits'
    assert [r["label"] for r in test] == sk.target[rows].tolist()
    assert len(train) + len(test) == 1797
    # Preparing elsewhere again gives the same split, in the same order.
    again = records(catalog.get_source(data_config("digits", tmp_path)), "test")
    assert [r["image"] for r in again] == [r["image"] for r in test]


def test_shards_partition_a_split_and_ids_are_positions(digits):
    whole = records(digits, "test")
    assert [r["id"] for r in whole] == list(range(360))
    shards = [records(digits, "test[:100]", i, 3) for i in range(3)]
    assert [len(s) for s in shards] == [33, 33, 34]
    ids = [r["id"] for s in shards for r in s]
    assert sorted(ids) == list(range(100))
    by_id = {r["id"]: r for r in whole}
    assert all(r["label"] == by_id[r["id"]]["label"] for s in shards for r in s)
    # Slices count as tfds counts them.
    tfds_count = digits.builder.info.splits["train[10%:20%]"].num_examples
    assert digits.num_examples("train[10%:20%]") == tfds_count == 143


def test_folder_source_skips_and_counts_corrupt_images(tmp_path, caplog):
    good = write_folder(tmp_path / "images")
    name = f"folder:{tmp_path / 'images'}"
    with caplog.at_level(logging.WARNING):
        source = catalog.get_source(data_config(name, tmp_path / "tfds"))
        sizes = source.split_sizes()
    assert source.class_names == ["cat", "dog", "emu"] and source.num_classes == 3
    assert sizes == good
    assert source.num_corrupt == {"train": 2, "val": 0}
    assert "skipped 2 of 17 images of split 'train'" in caplog.text
    # The check is remembered, and still reported, next time.
    checks = os.listdir(tmp_path / "tfds" / "deit_jax_folder_checks")
    assert len(checks) == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = catalog.get_source(data_config(name, tmp_path / "tfds"))
        assert again.split_sizes() == good
    assert "skipped 2 of 17" in caplog.text
    train = records(source, "train")
    assert [r["id"] for r in train] == list(range(good["train"]))
    assert [r["label"] for r in train] == sorted(r["label"] for r in train)  # class order
    # A seed shuffles the whole list, the same way for the same seed.
    order = lambda seed: [r["id"] for r in records(source, "train", shuffle_seed=seed)]
    a, b, c = order(1), order(1), order(2)
    assert a == b and a != c and sorted(a) == list(range(good["train"]))


def test_missing_data_sets_say_how_to_prepare_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tfds build cifar10 --data_dir="):
        catalog.get_source(data_config("cifar10", tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        catalog.get_source(data_config("imagenet2012", tmp_path))
    for words in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "manual_dir"):
        assert words in str(e.value)
    with pytest.raises(ValueError, match="Unknown data set 'no_such_set'"):
        catalog.get_source(data_config("no_such_set", tmp_path))
    with pytest.raises(FileNotFoundError, match="<root>/<split>/<class>"):
        catalog.get_source(data_config(f"folder:{tmp_path / 'nothing'}", tmp_path))


def test_unknown_split_names_the_splits(digits):
    with pytest.raises(ValueError, match=r"splits: \['test', 'train'\]"):
        digits.num_examples("validation")


def test_a_split_or_slice_that_does_not_exist_names_it_and_the_path(digits):
    where = digits.location()
    assert where.startswith(str(digits.builder.data_dir_root))
    with pytest.raises(DataError) as e:
        digits.num_examples("validation")
    assert "'validation'" in str(e.value) and where in str(e.value)
    for empty in ("test[360:]", "train[5:5]", "test[:0%]"):
        with pytest.raises(DataError, match="selects no examples") as e:
            digits.num_examples(empty)
        assert repr(empty) in str(e.value) and where in str(e.value)


def test_folder_splits_without_usable_images_name_the_split_and_the_path(tmp_path):
    root = tmp_path / "images"
    for cls in ("cat", "dog"):
        os.makedirs(root / "train" / cls)
        (root / "train" / cls / "a.jpg").write_bytes(b"\x00 not a jpeg")
    (root / "train" / "dog" / "b.png").write_bytes(b"\x89PNG truncated")
    pixels = np.zeros((8, 8, 3), np.uint8)
    for cls in ("cat", "dog"):
        os.makedirs(root / "val" / cls)
    Image.fromarray(pixels).save(root / "val" / "cat" / "0.png")  # val/dog stays empty
    os.makedirs(root / "test")  # a split folder without class folders
    source = catalog.get_source(data_config(f"folder:{root}", tmp_path / "tfds"))
    with pytest.raises(DataError, match=r"'train'.* none of its 3 images .* decode") as e:
        source.num_examples("train")
    assert str(root / "train") in str(e.value)
    with pytest.raises(DataError, match=r"'val'.*class folder .* has no") as e:
        source.num_examples("val[:50%]")
    assert str(root / "val" / "dog") in str(e.value)
    with pytest.raises(DataError, match=r"'test'.* has no images") as e:
        source.num_examples("test")
    assert str(root / "test") in str(e.value)
