"""How many images a second one host CPU core turns into training batches, with a run's own
augmentation, on real photographs at ImageNet's sizes: what the plan divides a target's
images/s by to say how many host cores the input pipeline needs.

The photographs are scikit-learn's two sample images (`load_sample_images`, 427 x 640, real
JPEG content: a temple and a flower), cut into crops of ImageNet's typical sizes and re-encoded
at ImageNet's typical quality, so that decoding costs what an ImageNet JPEG costs. No download.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import ml_collections
import numpy as np

from deit_jax._compat import import_tensorflow
from deit_jax.data import augment
from deit_jax.data.pipeline import train_augment_fn, train_mix_fn

tf = import_tensorflow()

# ImageNet-1k train images: most are 500 px on the long side (500 x 375, 500 x 333), ~110 KB on
# average. These crops come out at ~70 KB (quality 96; the two photographs have less fine detail
# than an average ImageNet image), so their decode is, if anything, a little cheaper.
_LONG_SIDE = (400, 500)
_SHORT_RATIO = (0.66, 0.8)
_QUALITY = 96


def sample_jpegs(directory: str, num: int = 64, seed: int = 0) -> list[str]:
    """Writes `num` ImageNet-sized JPEGs cut from scikit-learn's sample photographs (random
    crops, downscaled to a long side of 400-500 px, most landscape) and returns their paths."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two (427, 640, 3) uint8 photographs
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(num):
        photo = photos[i % len(photos)]
        portrait = rng.random() >= 0.75
        long_side = int(rng.integers(*_LONG_SIDE, endpoint=True))
        if portrait:  # the photographs' 427 px height bounds a portrait's long side
            long_side = min(long_side, photo.shape[0])
        short_side = int(long_side * rng.uniform(*_SHORT_RATIO))
        h, w = (long_side, short_side) if portrait else (short_side, long_side)
        # Downscaled from a larger crop of the photograph: the detail of a camera's image.
        scale = rng.uniform(1.0, min(photo.shape[0] / h, photo.shape[1] / w))
        ch, cw = min(photo.shape[0], round(h * scale)), min(photo.shape[1], round(w * scale))
        top = rng.integers(0, photo.shape[0] - ch + 1)
        left = rng.integers(0, photo.shape[1] - cw + 1)
        crop = Image.fromarray(photo[top : top + ch, left : left + cw])
        crop = crop.resize((w, h), Image.BICUBIC)
        path = os.path.join(directory, f"{i:05d}.jpg")
        crop.save(path, quality=_QUALITY)
        paths.append(path)
    return paths


@dataclass(frozen=True)
class InputRate:
    images_per_cpu_second: float  # the per-core rate: images over the CPU time they took
    images: int
    cpu_seconds: float
    mean_jpeg_bytes: float
    image_size: tuple[int, int]
    mixed: bool  # Mixup/CutMix included (not for image-caption pairs)


def measure(
    config: ml_collections.ConfigDict,
    paths: list[str],
    *,
    seconds: float = 20.0,
    batch: int = 32,
    mix: bool = True,
) -> InputRate:
    """The run's train augmentation (`config.augment`, `config.data.img_size`) and, with
    `mix`, its Mixup/CutMix (`config.mixup`), on `paths` in tf.data on one thread, for about
    `seconds` after one warm-up batch: the same compiled functions the train pipeline maps."""
    augment_fn, num_classes = train_augment_fn(config), 1000
    mix_fn = train_mix_fn(config, batch, num_classes)

    def preprocess(index, path):
        seed = tf.stack([tf.cast(index, tf.int32), 0])
        return augment_fn(tf.io.read_file(path), seed), tf.cast(index % num_classes, tf.int32)

    def mixed(step, images_labels):
        seed = tf.stack([tf.cast(step, tf.int32), 1])
        return mix_fn(*images_labels, seed) if mix else images_labels

    ds = tf.data.Dataset.from_tensor_slices(paths).repeat().enumerate().map(preprocess)
    ds = ds.batch(batch, drop_remainder=True).enumerate().map(mixed)
    batches = iter(ds.with_options(one_thread()))
    next(batches)  # tracing, file cache
    images, start_cpu, start_wall = 0, time.process_time(), time.perf_counter()
    while images == 0 or time.perf_counter() - start_wall < seconds:
        image, _ = next(batches)
        images += int(image.shape[0])
    cpu = time.process_time() - start_cpu
    return InputRate(
        images_per_cpu_second=images / cpu,
        images=images,
        cpu_seconds=cpu,
        mean_jpeg_bytes=float(np.mean([os.path.getsize(p) for p in paths])),
        image_size=augment.height_width(config.data.img_size),
        mixed=mix,
    )


def one_thread() -> tf.data.Options:
    """Synchronous, one thread: the work happens inside next(), so the process's CPU time over
    a span is this pipeline's."""
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = False
    options.experimental_optimization.inject_prefetch = False
    return options
