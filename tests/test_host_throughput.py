"""The plan's input side: ImageNet-sized JPEGs from scikit-learn's photographs, and the rate one
thread turns them into a run's batches (real tf.data, the train pipeline's own functions)."""

import numpy as np
from _train_config import tiny_config
from PIL import Image

from deit_jax.data import host_throughput, pipeline


def test_the_jpegs_are_imagenet_sized_photographs(tmp_path):
    paths = host_throughput.sample_jpegs(str(tmp_path), num=12, seed=3)
    assert len(paths) == 12
    sizes, pixels = [], []
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            sizes.append(image.size)
            pixels.append(np.asarray(image, np.float32))
    for w, h in sizes:
        assert 400 <= max(w, h) <= 500 and 0.6 <= min(w, h) / max(w, h) <= 0.8
    # Photographs' detail, not flat colour: neighbouring pixels differ, and the crops differ.
    assert all(np.abs(np.diff(p, axis=1)).mean() > 2 for p in pixels)
    assert len({p.tobytes() for p in pixels}) == len(pixels)
    assert np.mean([(tmp_path / p).stat().st_size for p in paths]) > 30_000
    host_throughput.sample_jpegs(str(tmp_path / "again"), num=2, seed=3)  # the same seed
    assert (tmp_path / "again" / "00000.jpg").read_bytes() == (tmp_path / "00000.jpg").read_bytes()


def test_the_rate_is_the_runs_own_augmentation_on_one_thread(tmp_path):
    config = tiny_config("/nonexistent/tfds")
    paths = host_throughput.sample_jpegs(str(tmp_path), num=8)
    rate = host_throughput.measure(config, paths, seconds=1.0, batch=4)
    assert rate.image_size == (config.data.img_size, config.data.img_size) and rate.mixed
    assert rate.images % 4 == 0 and rate.images >= 4
    assert rate.images_per_cpu_second == rate.images / rate.cpu_seconds > 0
    # The train pipeline maps these very functions (one trace per configuration).
    assert pipeline.train_augment_fn(config) is pipeline.train_augment_fn(
        config.copy_and_resolve_references()
    )
    unmixed = host_throughput.measure(config, paths, seconds=0.5, batch=4, mix=False)
    assert not unmixed.mixed and unmixed.images >= 4
