"""Throughput of the DeiT train input pipeline per CPU core: deit_jax (tf.data) against timm.

Both sides run the full reference recipe on the same JPEG files, on one thread each:

  deit_jax: read -> decode + RandomResizedCrop -> flip -> RandAugment -> normalise -> random
            erasing (deit_jax.data.augment.train_preprocess, default config.augment) -> batch ->
            Mixup/CutMix + label smoothing (deit_jax.data.mixup), in tf.data with a private
            thread pool of 1 and intra-op parallelism 1.
  timm:     PIL decode -> timm.data.create_transform(224, is_training=True, color_jitter=0.4,
            auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic', re_prob=0.25,
            re_mode='pixel', re_count=1) -> torch DataLoader(num_workers=0) -> timm Mixup, with
            torch.set_num_threads(1).

timm's RandAugment crashes on current Pillow when PosterizeIncreasing draws magnitude 10 (0
bits); the benchmark patches that op to return black, as the Pillow DeiT trained with did.
The pipelines' timed epochs are interleaved so that load from other processes hits all alike;
`mixup` then times deit_jax's mixup_cutmix alone on a ready batch, for its share of the host time.

The images are synthetic (smooth random colour fields plus noise, sizes drawn from
[--min-side, --max-side]) so the run needs no data set; JPEG decoding cost depends on content, so
the absolute numbers are indicative and the ratio is the point. Throughput is reported both per
wall-clock second and per CPU second of the process (`time.process_time`), since runtimes keep a
few helper threads; the per-CPU-second number is the per-core one.

Run: python benchmarks/input_pipeline.py [--num-images 256 --epochs 2 --batch-size 32]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import timm  # noqa: F401  (torch/timm must be imported before TensorFlow)
import torch
from PIL import Image
from timm.data import Mixup, auto_augment, create_transform

from deit_jax._compat import import_tensorflow

tf = import_tensorflow()

from deit_jax import config as config_lib  # noqa: E402
from deit_jax.data import augment, host_throughput, mixup  # noqa: E402


def make_jpegs(directory: str, num: int, min_side: int, max_side: int, seed: int) -> list[str]:
    """Writes `num` JPEGs (quality 90) of smooth random content and returns their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(num):
        h, w = rng.integers(min_side, max_side + 1, size=2)
        coarse = rng.integers(0, 256, size=(rng.integers(4, 17), rng.integers(4, 17), 3))
        image = Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(image, np.float32) + rng.normal(0, 8, size=(h, w, 3))
        path = os.path.join(directory, f"{i:05d}.jpg")
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def tf_batches(paths, labels, args, *, fused: bool):
    """An endless iterator of (images, targets) batches from the deit_jax pipeline."""
    cfg = config_lib.base_config()
    num_classes = int(labels.max()) + 1

    def preprocess(index, path, label):
        data = tf.io.read_file(path)
        if not fused:
            data = tf.io.decode_jpeg(data, channels=3)
        seed = tf.stack([tf.cast(index, tf.int32), 0])
        image = augment.train_preprocess(data, seed, size=args.image_size, config=cfg.augment)
        return image, label

    def batch_mix(step, batch):
        seed = tf.stack([tf.cast(step, tf.int32), 1])
        return mixup.mixup_cutmix(*batch, seed, num_classes=num_classes, config=cfg.mixup)

    ds = tf.data.Dataset.from_tensor_slices((paths, labels)).repeat().enumerate()
    # Synchronous map, no prefetch: the work happens inside next(), so the process CPU time
    # of a timed span belongs to this pipeline only (the timm span runs in the same process).
    ds = ds.map(lambda i, path_label: preprocess(i, *path_label))
    ds = ds.batch(args.batch_size, drop_remainder=True).enumerate().map(batch_mix)
    return iter(ds.with_options(host_throughput.one_thread()))


def mixup_batches(args):
    """An endless iterator of mixed batches of one fixed batch: the cost of mixup alone."""
    cfg = config_lib.base_config()
    rng = np.random.default_rng(args.seed)
    size = (args.batch_size, args.image_size, args.image_size, 3)
    images = tf.constant(rng.normal(size=size).astype(np.float32))
    labels = tf.constant(np.arange(args.batch_size, dtype=np.int32) % 10)
    ds = tf.data.Dataset.from_tensors((images, labels)).repeat().enumerate()
    seed = lambda step: tf.stack([tf.cast(step, tf.int32), 1])
    ds = ds.map(
        lambda step, b: mixup.mixup_cutmix(*b, seed(step), num_classes=10, config=cfg.mixup)
    )
    return iter(ds.with_options(host_throughput.one_thread()))


def timm_batches(paths, labels, args):
    """An endless iterator of (images, targets) batches from timm's DeiT train transform."""
    _posterize_zero_bits_as_black()
    transform = create_transform(
        args.image_size,
        is_training=True,
        color_jitter=0.4,
        auto_augment="rand-m9-mstd0.5-inc1",
        interpolation="bicubic",
        re_prob=0.25,
        re_mode="pixel",
        re_count=1,
    )
    mix = Mixup(
        mixup_alpha=0.8,
        cutmix_alpha=1.0,
        prob=1.0,
        switch_prob=0.5,
        mode="batch",
        label_smoothing=0.1,
        num_classes=int(labels.max()) + 1,
    )

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            with open(paths[i], "rb") as f:
                image = Image.open(f).convert("RGB")
            return transform(image), int(labels[i])

    loader = torch.utils.data.DataLoader(
        Files(), batch_size=args.batch_size, shuffle=True, num_workers=0, drop_last=True
    )
    while True:
        for images, targets in loader:
            yield mix(images, targets)


def _posterize_zero_bits_as_black() -> None:
    """timm asks PIL for 0 bits (PosterizeIncreasing at magnitude 10, reached by mstd noise);
    current Pillow raises there, older Pillow (the one DeiT trained with) returned black."""

    def posterize(img, bits_to_keep, **kwargs):
        if bits_to_keep <= 0:
            return Image.new(img.mode, img.size, 0)
        return original(img, bits_to_keep, **kwargs)

    original = auto_augment.posterize
    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        auto_augment.NAME_TO_OP[name] = posterize


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Prints a Markdown table: images/s per wall second and per CPU second, each "
        "pipeline on one thread, and the ratio to timm.",
    )
    parser.add_argument("--num-images", type=int, default=256, help="JPEGs to generate")
    parser.add_argument("--min-side", type=int, default=300, help="smallest image side (px)")
    parser.add_argument("--max-side", type=int, default=500, help="largest image side (px)")
    parser.add_argument("--image-size", type=int, default=224, help="output resolution")
    parser.add_argument("--batch-size", type=int, default=32, help="batch (mixup) size")
    parser.add_argument("--epochs", type=int, default=2, help="timed passes (after 1 warm-up)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the synthetic images")
    parser.add_argument(
        "--variants",
        default="fused,decoded,mixup,timm",
        help="comma-separated subset of: fused (bytes into train_preprocess: decode_and_crop_jpeg),"
        " decoded (decode_jpeg, then train_preprocess), mixup (mixup_cutmix alone on a fixed"
        " batch), timm",
    )
    args = parser.parse_args()
    if args.batch_size % 2 or args.num_images < args.batch_size:
        parser.error("--batch-size must be even and at most --num-images (timm Mixup needs it).")
    variants = args.variants.split(",")
    unknown = set(variants) - {"fused", "decoded", "mixup", "timm"}
    if unknown:
        parser.error(f"unknown --variants {sorted(unknown)}")

    torch.set_num_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)

    names = {
        "fused": "deit_jax tf.data, decode_and_crop_jpeg + mixup",
        "decoded": "deit_jax tf.data, decode_jpeg then crop + mixup",
        "timm": "timm + PIL + torch DataLoader + Mixup",
    }
    pipelines = [v for v in variants if v in names]
    batches_per_epoch = args.num_images // args.batch_size
    wall = dict.fromkeys(pipelines, 0.0)
    cpu = dict.fromkeys(pipelines, 0.0)
    with tempfile.TemporaryDirectory() as directory:
        paths = make_jpegs(directory, args.num_images, args.min_side, args.max_side, args.seed)
        labels = np.arange(args.num_images, dtype=np.int32) % 10
        iterators = {
            v: timm_batches(paths, labels, args)
            if v == "timm"
            else tf_batches(paths, labels, args, fused=v == "fused")
            for v in pipelines
        }
        # One warm-up epoch each (tracing, caches), then the timed epochs interleaved, so that
        # load from other processes on the machine hits every pipeline alike.
        for epoch in range(args.epochs + 1):
            for v in pipelines:
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                for _ in range(batches_per_epoch):
                    images, _ = next(iterators[v])
                    assert tuple(images.shape[1:]) in {
                        (args.image_size, args.image_size, 3),
                        (3, args.image_size, args.image_size),
                    }
                if epoch:
                    wall[v] += time.perf_counter() - start_wall
                    cpu[v] += time.process_time() - start_cpu
            print(f"epoch {epoch} done" + (" (warm-up)" if not epoch else ""), flush=True)
    images = args.epochs * batches_per_epoch * args.batch_size
    print(
        f"\n{args.epochs} x {args.num_images} JPEGs of {args.min_side}-{args.max_side} px -> "
        f"{args.image_size}px, batch {args.batch_size}, one thread each\n"
    )
    print("| pipeline | img/s (wall) | img/s per CPU-second | vs timm (per CPU-second) |")
    print("|---|---|---|---|")
    for v in pipelines:
        ratio = f"{cpu['timm'] / cpu[v]:.2f}x" if "timm" in pipelines else "-"
        print(f"| {names[v]} | {images / wall[v]:.0f} | {images / cpu[v]:.0f} | {ratio} |")

    if "mixup" in variants:
        # Alone and at length (short interleaved spans would mostly time allocator transients).
        iterator = mixup_batches(args)
        for _ in range(3):
            next(iterator)
        start = time.process_time()
        for _ in range(2 * args.epochs * batches_per_epoch):
            next(iterator)
        per_image = (time.process_time() - start) / (2 * images)
        share = f", {100 * per_image * images / cpu['fused']:.1f}% of the fused pipeline's"
        print(
            f"\nmixup_cutmix alone (tf.data, on a ready batch): {1e6 * per_image:.0f} us of CPU "
            f"per image" + (share if "fused" in pipelines else "") + "."
        )


if __name__ == "__main__":
    main()
