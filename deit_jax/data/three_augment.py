"""DeiT III's 3-Augment ops (official `augment.py`), in TensorFlow for use inside `tf.data`.

After the crop and flip, exactly one of three ops, chosen uniformly per image:

  greyscale     torchvision `Grayscale(3)`: PIL's RGB -> L, replicated to three channels;
  solarisation  PIL `ImageOps.solarize(img)`: pixels >= 128 inverted;
  Gaussian blur PIL `ImageFilter.GaussianBlur(radius)`, radius ~ U(0.1, 2.0).

Then colour jitter and normalisation (deit_jax/data/augment.py, which also holds `--src`'s
`simple_random_crop`).

Images are float32 (H, W, 3) holding integers in [0, 255], as in augment.py. PIL's Gaussian blur
is not a Gaussian kernel but three passes of an "extended box" blur per axis (fractional radius,
edge pixels repeated, uint8 rounding after each pass); `gaussian_blur` computes that, in float64
so that PIL's 24-bit fixed-point sums are exact. Randomness is stateless: a function of the seed.
"""

from __future__ import annotations

import math

from deit_jax._compat import import_tensorflow
from deit_jax.data import randaugment

tf = import_tensorflow()
_no_autograph = tf.autograph.experimental.do_not_convert

OPS = ("greyscale", "solarize", "blur")
BLUR_RADIUS = (0.1, 2.0)
_PASSES = 3  # PIL's box-blur passes per axis for a Gaussian blur
_SOLARIZE_THRESHOLD = 128.0


def _box_radius(radius):
    """PIL's `_gaussian_blur_radius`: the extended-box radius whose passes match the Gaussian."""
    radius = tf.cast(radius, tf.float32)
    sigma2 = radius * radius / _PASSES
    length = tf.cast(tf.sqrt(12.0 * tf.cast(sigma2, tf.float64) + 1.0), tf.float32)
    whole = tf.floor((length - 1.0) / 2.0)
    frac = (2.0 * whole + 1.0) * (whole * (whole + 1.0) - 3.0 * sigma2)
    frac = frac / (6.0 * (sigma2 - (whole + 1.0) * (whole + 1.0)))
    return whole + frac


# The widest box the radius range can ask for, as a static bound on the kernel's taps.
_MAX_REACH = int(
    (lambda s: math.floor((math.sqrt(12 * s + 1) - 1) / 2) + 1)(BLUR_RADIUS[1] ** 2 / _PASSES)
)


def _box_blur_pass(x: tf.Tensor, weights: tuple[tf.Tensor, ...]) -> tf.Tensor:
    """One PIL `ImagingHorizontalBoxBlur` pass along axis 0 of a float64 (N, M, C) image.

    Output = (ww * sum of the 2r+1 window pixels + fw * the two pixels at distance r+1 + 2**23)
    >> 24 (`_box_weights`), in float64, where these integer sums (< 2**40) are exact. Axis 0,
    because slices along it are contiguous copies (axis 1 slices are slower).
    """
    reach, n = _MAX_REACH, tf.shape(x)[0]
    # Edge pixels repeated: PIL clamps the indices at the borders.
    padded = tf.concat([x[:1]] * reach + [x] + [x[-1:]] * reach, 0)
    bulk = weights[0] * x
    for distance in range(1, reach + 1):
        pair = padded[reach - distance : reach - distance + n] + padded[reach + distance :][:n]
        bulk += weights[distance] * pair
    return tf.floor((bulk + 2.0**23) * 2.0**-24)  # a power of two: exact


def _box_weights(box_radius: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """The weight of the pixels at distance 0, 1, ... of a pass: ww up to int(radius), fw at
    int(radius) + 1, 0 beyond, with ww = 2**24 / (2 * radius + 1) and fw the remainder, halved."""
    whole = tf.floor(box_radius)
    ww = tf.floor(16777216.0 / (box_radius * 2.0 + 1.0))  # float32 division, as in PIL
    whole, ww = tf.cast(whole, tf.float64), tf.cast(ww, tf.float64)
    fw = tf.floor((16777216.0 - (2.0 * whole + 1.0) * ww) / 2.0)
    zero = tf.zeros([], tf.float64)
    return tuple(
        tf.where(float(d) <= whole, ww, tf.where(float(d) == whole + 1.0, fw, zero))
        for d in range(_MAX_REACH + 1)
    )


@_no_autograph
def gaussian_blur(x: tf.Tensor, radius: tf.Tensor) -> tf.Tensor:
    """PIL `ImageFilter.GaussianBlur(radius)` of a float32 (H, W, 3) image, for radius <= 2."""
    weights = _box_weights(_box_radius(radius))
    y = tf.transpose(tf.cast(x, tf.float64), [1, 0, 2])  # PIL blurs the rows first
    for _ in range(_PASSES):
        y = _box_blur_pass(y, weights)
    y = tf.transpose(y, [1, 0, 2])
    for _ in range(_PASSES):
        y = _box_blur_pass(y, weights)
    return tf.cast(y, tf.float32)


def greyscale(x: tf.Tensor) -> tf.Tensor:
    """torchvision `Grayscale(num_output_channels=3)` on a PIL image."""
    return randaugment._grayscale(x)


def solarize(x: tf.Tensor) -> tf.Tensor:
    """PIL `ImageOps.solarize(img)` with its default threshold, 128."""
    return randaugment.solarize(x, _SOLARIZE_THRESHOLD)


def sample_params(seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(op index into OPS, uniform on {0, 1, 2}; blur radius ~ U(0.1, 2.0)) for one image."""
    u = tf.random.stateless_uniform([2], seed, dtype=tf.float32)
    choice = tf.minimum(tf.cast(tf.floor(u[0] * len(OPS)), tf.int32), len(OPS) - 1)
    radius = BLUR_RADIUS[0] + u[1] * (BLUR_RADIUS[1] - BLUR_RADIUS[0])
    return choice, radius


@_no_autograph
def apply_op(x: tf.Tensor, choice: tf.Tensor, radius: tf.Tensor) -> tf.Tensor:
    """The op `OPS[choice]` (the radius is used by the blur only)."""
    return tf.switch_case(
        choice,
        [lambda: greyscale(x), lambda: solarize(x), lambda: gaussian_blur(x, radius)],
    )


@_no_autograph
def three_augment(x: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """One of greyscale, solarisation and Gaussian blur, chosen uniformly from `seed`."""
    return tf.ensure_shape(apply_op(x, *sample_params(seed)), x.shape)
