"""DeiT III's 3-Augment against PIL / torchvision on the same image and the same parameters.

Tolerances: greyscale, solarisation, Gaussian blur and colour jitter are all required to equal
PIL exactly (the blur replicates PIL's fixed-point box passes; measured difference 0 on every
radius tried). The op choice is tested for uniformity with a chi-square bound (below).
"""

import io

import matplotlib.cbook
import ml_collections
import numpy as np
import pytest
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

from deit_jax import config as config_lib
from deit_jax.data import augment, three_augment

tf = augment.tf
MEAN, STD = config_lib.IMAGENET_MEAN, config_lib.IMAGENET_STD


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return Image.open(path).convert("RGB").resize((96, 80), Image.BICUBIC)


def as_tensor(image: Image.Image) -> tf.Tensor:
    return tf.constant(np.asarray(image), tf.float32)


def augment_config(**overrides) -> ml_collections.ConfigDict:
    config = config_lib.base_config().augment
    config.unlock()
    config.update({"three_augment": True, "color_jitter": 0.3, **overrides})
    return config


def test_greyscale_and_solarize_equal_torchvision_and_pil_exactly(photo):
    grey = three_augment.greyscale(as_tensor(photo)).numpy()
    np.testing.assert_array_equal(grey, np.asarray(T.Grayscale(3)(photo)))
    solar = three_augment.solarize(as_tensor(photo)).numpy()
    np.testing.assert_array_equal(solar, np.asarray(ImageOps.solarize(photo)))
    assert (solar != np.asarray(photo)).any() and (solar == np.asarray(photo)).any()


@pytest.mark.parametrize("radius", [0.1, 0.37, 0.8, 1.0, 1.42, 2.0])
def test_gaussian_blur_equals_pil(photo, radius):
    radius = float(np.float32(radius))  # the float32 value both sides see
    ours = three_augment.gaussian_blur(as_tensor(photo), tf.constant(radius)).numpy()
    expected = np.asarray(photo.filter(ImageFilter.GaussianBlur(radius=radius)))
    np.testing.assert_array_equal(ours, expected)


def test_colour_jitter_equals_torchvision_with_the_same_factors_and_order(photo):
    rng = np.random.default_rng(0)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for _ in range(4):
        factors = rng.uniform(0.7, 1.3, 3).astype(np.float32)
        order = rng.permutation(3)
        ours = augment.apply_color_jitter(
            as_tensor(photo), tf.constant(factors), tf.constant(order, tf.int32)
        ).numpy()
        expected = photo
        for i in order:
            expected = ops[i](expected, float(factors[i]))
        np.testing.assert_array_equal(ours, np.asarray(expected))


def test_op_choice_is_uniform_and_radius_in_range():
    """3,000 seeds: chi-square (2 degrees of freedom) below 13.8, the 0.1% critical value;
    radius in [0.1, 2.0] with mean 1.05 within 4 standard errors."""
    n = 3000
    seeds = tf.stack([tf.range(n), tf.fill([n], 11)], axis=1)
    sample = tf.function(
        lambda s: tf.map_fn(
            three_augment.sample_params, s, fn_output_signature=(tf.int32, tf.float32)
        )
    )
    choices, radii = sample(seeds)
    counts = np.bincount(choices.numpy(), minlength=3)
    assert counts.size == 3
    chi2 = float(((counts - n / 3) ** 2 / (n / 3)).sum())
    assert chi2 < 13.8, counts
    radii = radii.numpy()
    assert radii.min() >= 0.1 and radii.max() <= 2.0
    assert abs(radii.mean() - 1.05) < 4 * 1.9 / np.sqrt(12 * n)


def test_apply_op_dispatches_by_index(photo):
    x = as_tensor(photo)
    radius = tf.constant(1.2)
    expected = [
        three_augment.greyscale(x),
        three_augment.solarize(x),
        three_augment.gaussian_blur(x, radius),
    ]
    for index, want in enumerate(expected):
        got = three_augment.apply_op(x, tf.constant(index), radius)
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def denormalise(x: np.ndarray) -> np.ndarray:
    return np.round((x * np.asarray(STD) + np.asarray(MEAN)) * 255)


def test_train_transform_applies_one_op_and_no_erasing(photo):
    """The full transform: about a third of the outputs are grey (all channels equal), and with
    RandAugment and random erasing (probability 1) configured every output equals the one of
    the same seed with neither (3-Augment replaces both; RandAugment changes pixels, grey or
    not, and erasing fills a box with noise); seeded outputs."""
    assert augment_config().randaugment  # the base config's RandAugment policy is on
    image = tf.constant(np.asarray(photo))
    config = augment_config(color_jitter=0.0, reprob=1.0)
    fn = tf.function(lambda s: augment.train_preprocess(image, s, size=32, config=config))
    bare = augment_config(color_jitter=0.0, reprob=0.0, randaugment="")
    without = tf.function(lambda s: augment.train_preprocess(image, s, size=32, config=bare))
    grey = 0
    n = 60
    for i in range(n):
        out = fn(tf.constant([i, 3])).numpy()
        assert out.shape == (32, 32, 3) and np.isfinite(out).all()
        np.testing.assert_array_equal(out, without(tf.constant([i, 3])).numpy(), err_msg=str(i))
        pixels = denormalise(out)
        grey += bool(
            (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
        )
    # Binomial(60, 1/3): mean 20, sd 3.65; 4.5 sd either side.
    assert 4 <= grey <= 36, grey
    a, b = fn(tf.constant([5, 5])).numpy(), fn(tf.constant([5, 5])).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, fn(tf.constant([6, 5])).numpy())
    jittered = augment_config()
    out = augment.train_preprocess(image, tf.constant([5, 5]), size=32, config=jittered)
    assert not np.array_equal(out.numpy(), a)


def test_simple_random_crop_is_resize_reflect_pad_and_crop():
    """`--src`: Resize(32) keeps the aspect (40x56 -> 32x44), then every output is a 32x32
    window of the 4-pixel reflect-padded image (torchvision's padding), at offsets spread over
    the whole range."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(40, 56, 3)).astype(np.uint8)
    resized = augment.resize(tf.constant(image, tf.float32), (32, 44), "bicubic").numpy()
    padded = np.asarray(
        TF.pad(Image.fromarray(resized.astype(np.uint8)), 4, padding_mode="reflect")
    )
    assert padded.shape == (40, 52, 3)
    offsets = set()
    for i in range(40):
        out = augment.simple_random_crop(tf.constant(image), tf.constant([i, 1]), (32, 32)).numpy()
        matches = [
            (t, left)
            for t in range(9)
            for left in range(21)
            if np.array_equal(out, padded[t : t + 32, left : left + 32])
        ]
        assert matches, i
        offsets.update(matches)
    tops, lefts = {t for t, _ in offsets}, {left for _, left in offsets}
    assert min(tops) <= 1 and max(tops) >= 7 and min(lefts) <= 3 and max(lefts) >= 17


def test_src_train_transform_on_encoded_and_decoded_images(photo):
    """The pipeline passes encoded bytes: `--src` decodes the whole image, then the same ops."""
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=90)
    encoded = tf.constant(buffer.getvalue())
    config = augment_config(src=True)
    fn = tf.function(
        lambda image: augment.train_preprocess(image, tf.constant([1, 2]), size=32, config=config)
    )
    out = fn(encoded).numpy()
    assert out.shape == (32, 32, 3) and np.isfinite(out).all()
    np.testing.assert_array_equal(out, fn(tf.io.decode_jpeg(encoded, channels=3)).numpy())
