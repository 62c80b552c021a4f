"""Train / eval transforms: shapes, determinism, the crop and erasing samplers, parity with timm.

Resizing tolerance: TF's antialiased Keys-cubic resize and PIL's bicubic use the same kernel, but
PIL rounds to uint8 between its two passes. Measured on the test photo: mean |difference| 0.15-0.2
grey levels, 99.9% of values within 1 grey level, max 7 (overshoot at sharp edges). The tests
allow mean < 0.35, more than 1 level on < 0.3% of values, max <= 10.
"""

import io
import random

import matplotlib.cbook
import ml_collections
import numpy as np
import pytest
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation

from deit_jax import config as config_lib
from deit_jax.config import rules
from deit_jax.data import augment

tf = augment.tf
MEAN, STD = config_lib.IMAGENET_MEAN, config_lib.IMAGENET_STD


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return Image.open(path).convert("RGB")  # 512 x 600


def augment_config(**overrides) -> ml_collections.ConfigDict:
    config = config_lib.base_config().augment
    config.unlock()
    config.update(overrides)
    return config


def grey_levels(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """|difference| of two normalised (H, W, 3) images, in 0-255 grey levels."""
    return np.abs(ours - theirs) * np.asarray(STD) * 255


def assert_close_resize(diff: np.ndarray) -> None:
    assert diff.mean() < 0.35, diff.mean()
    assert (diff > 1.01).mean() < 0.003, (diff > 1.01).mean()
    assert diff.max() <= 10, diff.max()


def crop_windows(height: int, width: int, num: int) -> np.ndarray:
    fn = tf.function(
        lambda seeds: tf.map_fn(
            lambda s: tf.stack(augment.sample_crop_window(height, width, s)),
            seeds,
            fn_output_signature=tf.int32,
        )
    )
    seeds = tf.stack([tf.range(num), tf.fill([num], 7)], axis=1)
    return fn(seeds).numpy()


@pytest.mark.parametrize("height, width", [(300, 400), (500, 320), (60, 600)])
def test_crop_window_bounds_and_distribution(height, width):
    num = 2000
    top, left, h, w = crop_windows(height, width, num).T
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    area = h * w / (height * width)
    assert area.min() >= 0.08 * 0.97 and area.max() <= 1.0
    aspect = w / h
    assert aspect.min() >= 0.75 * 0.97 and aspect.max() <= 4 / 3 * 1.03
    # Same distribution as timm's sampler (2000 draws each; the tolerances are > 3.5 sigma).
    random.seed(0)
    image = Image.new("RGB", (width, height))
    theirs = np.array(
        [
            RandomResizedCropAndInterpolation.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
            for _ in range(num)
        ]
    )
    their_area = theirs[:, 2] * theirs[:, 3] / (height * width)
    assert abs(area.mean() - their_area.mean()) < 0.03
    assert abs(np.log(aspect).mean() - np.log(theirs[:, 3] / theirs[:, 2]).mean()) < 0.03

    # Fallback (central crop) as often as timm's: its windows are centred and full-height or
    # full-width.
    def centred(t, lft, hh, ww):
        return (
            (t == (height - hh) // 2)
            & (lft == (width - ww) // 2)
            & ((hh == height) | (ww == width))
        )

    ours_fb = centred(top, left, h, w).mean()
    theirs_fb = centred(*theirs.T).mean()
    assert abs(ours_fb - theirs_fb) < 0.04, (ours_fb, theirs_fb)


def test_resize_matches_pil_resized_crop(photo):
    x = np.asarray(photo)
    for top, left, h, w in [(10, 20, 300, 250), (100, 50, 90, 120), (0, 0, 600, 512)]:
        ours = augment.resize(x[top : top + h, left : left + w], [224, 224], "bicubic").numpy()
        theirs = TF.resized_crop(photo, top, left, h, w, [224, 224], TF.InterpolationMode.BICUBIC)
        assert_close_resize(np.abs(ours - np.asarray(theirs)))


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_eval_matches_timm(photo, interpolation):
    timm_eval = create_transform(224, crop_pct=0.875, interpolation=interpolation)
    # Tall, wide (odd margins: the centre crop rounds half to even) and upscaled inputs.
    for image in [photo, photo.resize((452, 300)), photo.resize((150, 131))]:
        ours = augment.eval_preprocess(
            tf.constant(np.asarray(image)),
            size=224,
            crop_pct=0.875,
            mean=MEAN,
            std=STD,
            interpolation=interpolation,
        ).numpy()
        theirs = timm_eval(image).permute(1, 2, 0).numpy()
        assert ours.shape == theirs.shape == (224, 224, 3)
        assert_close_resize(grey_levels(ours, theirs))


def test_eval_accepts_encoded_and_non_square(photo):
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    out = augment.eval_preprocess(
        tf.constant(buffer.getvalue()), size=(160, 128), crop_pct=0.9, mean=MEAN, std=STD
    )
    assert out.shape == (160, 128, 3) and out.dtype == tf.float32


def test_train_matches_timm_when_deterministic(photo):
    # scale = ratio = (1, 1) on a square image: the crop is the whole image; no flip, no
    # RandAugment, no jitter, no erasing: the transform is deterministic, in both libraries.
    square = photo.crop((0, 0, 512, 512))
    for hflip in (0.0, 1.0):
        config = augment_config(
            scale=(1.0, 1.0),
            ratio=(1.0, 1.0),
            hflip=hflip,
            randaugment="",
            color_jitter=0.0,
            reprob=0.0,
        )
        ours = augment.train_preprocess(
            tf.constant(np.asarray(square)), tf.constant([1, 2]), size=224, config=config
        ).numpy()
        theirs = create_transform(
            224,
            is_training=True,
            scale=(1.0, 1.0),
            ratio=(1.0, 1.0),
            hflip=hflip,
            color_jitter=0.0,
            interpolation="bicubic",
            re_prob=0.0,
        )(square)
        assert_close_resize(grey_levels(ours, theirs.permute(1, 2, 0).numpy()))


@pytest.fixture(scope="module")
def train_fn():
    config = augment_config()
    spec = [tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([2], tf.int32)]
    return tf.function(
        lambda image, seed: augment.train_preprocess(image, seed, size=224, config=config),
        input_signature=spec,
    )


def test_train_shapes_seeds_and_range(photo, train_fn):
    x = tf.constant(np.asarray(photo))
    outs = [train_fn(x, tf.constant([s, 1])).numpy() for s in range(16)]
    for out in outs:
        assert out.shape == (224, 224, 3) and out.dtype == np.float32
        assert np.isfinite(out).all()
    np.testing.assert_array_equal(outs[0], train_fn(x, tf.constant([0, 1])).numpy())
    assert len({out.tobytes() for out in outs}) == len(outs)
    # Without erasing (per-pixel N(0, 1) noise) every value is a normalised pixel in [0, 255].
    lo = (0 - np.asarray(MEAN)) / np.asarray(STD)
    hi = (1 - np.asarray(MEAN)) / np.asarray(STD)
    config = augment_config(reprob=0.0)
    out = augment.train_preprocess(x, tf.constant([5, 5]), size=(192, 160), config=config)
    assert out.shape == (192, 160, 3)
    assert (out.numpy() >= lo - 1e-5).all() and (out.numpy() <= hi + 1e-5).all()


@pytest.mark.parametrize("interpolation", ["bilinear", "random"])
def test_train_other_interpolations(photo, interpolation):
    config = augment_config(interpolation=interpolation, randaugment="rand-m9-n1")
    out = augment.train_preprocess(
        tf.constant(np.asarray(photo)), tf.constant([2, 2]), size=(96, 80), config=config
    )
    assert out.shape == (96, 80, 3) and np.isfinite(out.numpy()).all()


def test_train_encoded_jpeg_equals_decoded(photo, train_fn):
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=95)
    encoded = buffer.getvalue()
    fused = tf.function(
        lambda data, seed: augment.train_preprocess(data, seed, size=224, config=augment_config())
    )
    decoded = tf.io.decode_jpeg(encoded, channels=3)
    for seed in ([3, 1], [4, 1]):
        a = fused(tf.constant(encoded), tf.constant(seed)).numpy()
        b = train_fn(decoded, tf.constant(seed)).numpy()
        # Same window; decode_and_crop_jpeg only differs at the crop edge's chroma upsampling.
        assert np.abs(a - b).mean() < 0.01


def test_colour_jitter_path(photo):
    x = tf.constant(np.asarray(photo))
    outs = [
        augment.train_preprocess(
            x, tf.constant([9, 9]), size=64, config=augment_config(randaugment="", color_jitter=s)
        ).numpy()
        for s in (0.0, 0.4, 0.4)
    ]
    np.testing.assert_array_equal(outs[1], outs[2])
    assert np.abs(outs[0] - outs[1]).mean() > 0.01
    hue = ml_collections.ConfigDict(
        {**augment_config().to_dict(), "randaugment": "", "color_jitter": (0.4,) * 4}
    )
    with pytest.raises(ValueError, match="hue"):
        augment.train_preprocess(x, tf.constant([9, 9]), size=64, config=hue)


def test_random_erasing_frequency_and_boxes():
    num, p = 600, 0.25
    fn = tf.function(
        lambda seeds: tf.map_fn(
            lambda s: augment.random_erasing(tf.zeros([64, 80, 3]), s, prob=p, mode="pixel"),
            seeds,
            fn_output_signature=tf.float32,
        )
    )
    out = fn(tf.stack([tf.range(num), tf.fill([num], 3)], axis=1)).numpy()
    erased = np.abs(out).sum(-1) != 0  # (num, 64, 80)
    hit = erased.any(axis=(1, 2))
    # Binomial(600, 0.25): sigma = 0.018; the tolerance is 3.5 sigma.
    assert abs(hit.mean() - p) < 0.063, hit.mean()
    for mask in erased[hit]:
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert mask.sum() == h * w  # one rectangle
        assert 0.02 * 0.85 <= h * w / (64 * 80) <= 1 / 3 * 1.1
        assert 0.3 * 0.8 <= h / w <= 1 / 0.3 * 1.2
    noise = out[hit][np.broadcast_to(erased[hit][..., None], out[hit].shape)]
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02


def test_random_erasing_modes():
    x = tf.ones([32, 32, 3])
    seed = tf.constant([0, 0])
    const = augment.random_erasing(x, seed, prob=1.0, mode="const").numpy()
    assert (const == 0).any() and set(np.unique(const)) <= {0.0, 1.0}
    rand = augment.random_erasing(x, seed, prob=1.0, mode="rand").numpy()
    box = rand[(rand != 1).any(-1)]
    assert len(box) and (box == box[0]).all()  # one colour per box
    assert augment.random_erasing(x, seed, prob=0.0).numpy().min() == 1
    with pytest.raises(ValueError, match="mode"):
        augment.random_erasing(x, seed, prob=1.0, mode="noise")


def test_a_bad_randaugment_string_is_refused_where_it_is_parsed():
    with pytest.raises(ValueError, match="Unknown key"):
        augment.train_preprocess(
            tf.zeros([8, 8, 3], tf.uint8),
            tf.constant([0, 0]),
            size=8,
            config=augment_config(randaugment="rand-q3"),
        )


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("interpolation", "lanczos", "must be 'bicubic', 'bilinear' or 'random'"),
        ("remode", "noise", "must be 'pixel', 'rand' or 'const'"),
        ("scale", (0.5, 0.1), "must be (min, max) with 0 < min <= max"),
        ("ratio", (2.0, 0.5), "must be (min, max) with 0 < min <= max"),
    ],
)
def test_bad_augment_values_are_refused_by_the_config_rules(key, value, message):
    # The augmentation's values are checked where every config value is, before any work.
    config = config_lib.base_config()
    config.augment[key] = value
    (problem,) = rules.problems(config, num_devices=1)
    assert problem.startswith(f"config.augment.{key}=") and message in problem, problem


def test_a_section_without_its_keys_is_refused_by_the_config_rules():
    config = config_lib.base_config()
    with config.unlocked():
        config.augment = ml_collections.ConfigDict({"scale": (0.08, 1.0)})
    (problem,) = rules.problems(config, num_devices=1)
    assert problem.startswith("config.augment={") and "lacks color_jitter, hflip" in problem
    assert "base_config()" in problem
