"""DeiT's per-image train and eval transforms, in TensorFlow for use inside `tf.data`.

They reproduce timm's `create_transform` as the official DeiT code calls it:

  train: RandomResizedCrop (bicubic) -> horizontal flip -> RandAugment (or colour jitter when
         RandAugment is off) -> ToTensor + Normalize -> RandomErasing (per-pixel noise).
  eval:  resize the shorter side to int(size / crop_pct) (bicubic, or `data.eval_interpolation`)
         -> centre crop -> Normalize.

With `three_augment` (DeiT III, the official `new_data_aug_generator`): RandomResizedCrop, or
with `src` Resize + RandomCrop(padding 4, reflect) -> flip -> one of greyscale, solarisation and
Gaussian blur (three_augment.py) -> colour jitter -> Normalize; no RandAugment, no erasing.

Between the resize and the normalisation images are float32 holding integers in [0, 255], as the
uint8 PIL images of the reference are, so the RandAugment ops can match PIL exactly (see
randaugment.py). Resizing uses TF's antialiased Keys-cubic kernel (a = -0.5, scaled when
shrinking), the kernel PIL uses; PIL rounds to uint8 between its two separable passes and TF does
not, so resized pixels differ by a grey level or two (tests/test_augment.py states the bound).

`train_preprocess` takes a decoded uint8 image or the encoded bytes (a scalar tf.string); pass
the bytes when you can (tfds: `decoders={"image": tfds.decode.SkipDecoding()}`). JPEGs are then
decoded with `decode_and_crop_jpeg`, which skips the IDCT outside the RandomResizedCrop window:
the same window as for the decoded image, the same pixels except within a few pixels of the
window's edge (chroma upsampling), and less work for the small crops RRC favours (see
benchmarks/input_pipeline.py). Other formats are decoded whole, then cropped.

Speed on CPU: TensorFlow's kernels for broadcasting binary ops, `tf.where` and negative-stride
slices are about ten times slower than same-shape elementwise ops, so the code materialises
per-channel constants at the image's static shape and selects arithmetically.

Randomness is stateless: the output is a function of (image, seed), whatever the threading.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import ml_collections
import numpy as np

from deit_jax._compat import import_tensorflow
from deit_jax.data import randaugment, three_augment

tf = import_tensorflow()
# Plain TF ops only, no Python control flow on tensors: autograph would only slow tracing down
# (about 3x for train_preprocess).
_no_autograph = tf.autograph.experimental.do_not_convert

_ERASE_MODES = ("pixel", "rand", "const")


def height_width(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if len(size) != 2:
        raise ValueError(f"size must be an int or (height, width), got {size!r}.")
    return int(size[0]), int(size[1])


def _uniform(seed: tf.Tensor, shape: Sequence[int], lo: float = 0.0, hi: float = 1.0):
    return tf.random.stateless_uniform(shape, seed, lo, hi, dtype=tf.float32)


def _randint(u: tf.Tensor, high: tf.Tensor) -> tf.Tensor:
    """Maps u ~ U[0, 1) to an integer uniform on [0, high] (inclusive, like random.randint)."""
    return tf.minimum(tf.cast(tf.floor(u * tf.cast(high + 1, tf.float32)), tf.int32), high)


# ---------------------------------------------------------------------------------------------
# RandomResizedCrop


@_no_autograph
def sample_crop_window(
    height: tf.Tensor,
    width: tf.Tensor,
    seed: tf.Tensor,
    *,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """timm's `RandomResizedCropAndInterpolation.get_params`: (top, left, crop_h, crop_w), int32.

    Up to `attempts` windows of area U(scale) x image area and log-uniform aspect ratio (w / h)
    in `ratio`; the first that fits wins, else the central crop clamped to `ratio`. The attempts
    are drawn at once and the first fitting one picked, which is the same distribution.
    """
    height, width = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
    h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    area_seed, ratio_seed, pos_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    target_area = _uniform(area_seed, [attempts], *scale) * h_f * w_f
    log_ratio = _uniform(ratio_seed, [attempts], math.log(ratio[0]), math.log(ratio[1]))
    aspect = tf.exp(log_ratio)
    crop_w = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
    crop_h = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
    fits = (crop_w <= width) & (crop_h <= height) & (crop_w > 0) & (crop_h > 0)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)

    # Fallback: the whole image, cut to the nearest allowed aspect ratio.
    in_ratio = w_f / h_f
    fb_w = tf.where(in_ratio > ratio[1], tf.cast(tf.round(h_f * ratio[1]), tf.int32), width)
    fb_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(w_f / ratio[0]), tf.int32), height)
    found = tf.reduce_any(fits)
    crop_h = tf.maximum(tf.where(found, crop_h[first], fb_h), 1)
    crop_w = tf.maximum(tf.where(found, crop_w[first], fb_w), 1)
    u_top, u_left = tf.unstack(_uniform(pos_seed, [2]))
    top = tf.where(found, _randint(u_top, height - crop_h), (height - crop_h) // 2)
    left = tf.where(found, _randint(u_left, width - crop_w), (width - crop_w) // 2)
    return top, left, crop_h, crop_w


def _decode_and_crop(
    encoded: tf.Tensor, seed: tf.Tensor, scale: Sequence[float], ratio: Sequence[float]
) -> tf.Tensor:
    """Decodes only the RandomResizedCrop window of an encoded image (JPEG fast path)."""

    def jpeg():
        shape = tf.image.extract_jpeg_shape(encoded)
        window = sample_crop_window(shape[0], shape[1], seed, scale=scale, ratio=ratio)
        return tf.image.decode_and_crop_jpeg(encoded, tf.stack(window), channels=3)

    def other():  # PNG, GIF, BMP: decode everything, then crop.
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        return _crop(image, seed, scale, ratio)

    return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def _crop(image: tf.Tensor, seed: tf.Tensor, scale, ratio) -> tf.Tensor:
    shape = tf.shape(image)
    top, left, h, w = sample_crop_window(shape[0], shape[1], seed, scale=scale, ratio=ratio)
    return image[top : top + h, left : left + w]


def resize(image: tf.Tensor, size_hw: Sequence[int] | tf.Tensor, method: str) -> tf.Tensor:
    """PIL-style resize of an (H, W, 3) image: antialiased, rounded and clipped to [0, 255]."""
    out = tf.image.resize(image, size_hw, method=method, antialias=True)
    return tf.clip_by_value(tf.round(out), 0.0, 255.0)


@_no_autograph
def simple_random_crop(image: tf.Tensor, seed: tf.Tensor, size_hw: tuple[int, int]) -> tf.Tensor:
    """DeiT III's `--src` crop: Resize(size) (bicubic), RandomCrop(size, padding=4, reflect).

    A square size resizes the shorter side to it (torchvision `Resize(int)`, the longer side
    truncated); another (height, width) resizes to exactly that.
    """
    out_h, out_w = size_hw
    x = tf.cast(image, tf.float32)
    if out_h == out_w:
        shape = tf.shape(x)
        height, width = shape[0], shape[1]
        h_is_short = height <= width
        long_side = tf.where(h_is_short, width, height) * out_h // tf.minimum(height, width)
        new_hw = tf.stack(
            [tf.where(h_is_short, out_h, long_side), tf.where(h_is_short, long_side, out_h)]
        )
    else:
        new_hw = tf.constant([out_h, out_w])
    x = resize(x, new_hw, "bicubic")
    pad = 4
    x = tf.pad(x, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")  # numpy/torch 'reflect'
    shape = tf.shape(x)
    # torchvision RandomCrop: top = randint(0, h - th), left = randint(0, w - tw), inclusive.
    u_top, u_left = tf.unstack(_uniform(seed, [2]))
    top, left = _randint(u_top, shape[0] - out_h), _randint(u_left, shape[1] - out_w)
    return tf.ensure_shape(x[top : top + out_h, left : left + out_w], (out_h, out_w, 3))


def _resize_random_interp(image, size_hw, interpolation: str, seed) -> tf.Tensor:
    if interpolation != "random":
        return resize(image, size_hw, interpolation)
    # timm's 'random': bilinear or bicubic, with equal probability.
    return tf.cond(
        _uniform(seed, []) < 0.5,
        lambda: resize(image, size_hw, "bilinear"),
        lambda: resize(image, size_hw, "bicubic"),
    )


# ---------------------------------------------------------------------------------------------
# Colour jitter (torchvision ColorJitter on PIL images; only used without RandAugment)


def jitter_params(seed: tf.Tensor, strength: Sequence[float]) -> tuple[tf.Tensor, tf.Tensor]:
    """(brightness, contrast, saturation) factors ~ U(max(0, 1 - s), 1 + s) and their order."""
    factor_seed, order_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    u = _uniform(factor_seed, [3])
    s = tf.constant(strength, tf.float32)
    factors = tf.maximum(0.0, 1.0 - s) + u * (1.0 + s - tf.maximum(0.0, 1.0 - s))
    return factors, tf.argsort(_uniform(order_seed, [3]))


@_no_autograph
def color_jitter(x: tf.Tensor, seed: tf.Tensor, strength: Sequence[float]) -> tf.Tensor:
    """Brightness, contrast and saturation factors ~ U(max(0, 1 - s), 1 + s), in random order."""
    return apply_color_jitter(x, *jitter_params(seed, strength))


@_no_autograph
def apply_color_jitter(x: tf.Tensor, factors: tf.Tensor, order: tf.Tensor) -> tf.Tensor:
    """torchvision's PIL adjust_brightness / contrast / saturation, in `order` (indices 0-2)."""
    ops = (randaugment.brightness, randaugment.contrast, randaugment.color)
    for i in range(3):
        index = order[i]
        factor = tf.gather(factors, index)
        # A zero strength leaves its factor at exactly 1.0, which the blend maps to identity.
        x = tf.switch_case(index, [lambda op=op, x=x, f=factor: op(x, f) for op in ops])
    return x


# ---------------------------------------------------------------------------------------------
# Random erasing (timm RandomErasing, on the normalised image)


@_no_autograph
def random_erasing(
    x: tf.Tensor,
    seed: tf.Tensor,
    *,
    prob: float,
    mode: str = "pixel",
    area: Sequence[float] = (0.02, 1 / 3),
    min_aspect: float = 0.3,
    attempts: int = 10,
) -> tf.Tensor:
    """With probability `prob`, replaces one random box of `x` (H, W, C) by noise.

    Box: area U(area) x image area, aspect ratio log-uniform in (min_aspect, 1 / min_aspect);
    the first of `attempts` boxes that fits strictly inside the image is used (none: no erasing).
    Fill: 'pixel' per-pixel N(0, 1), 'rand' one N(0, 1) colour per box, 'const' zeros.
    """
    if mode not in _ERASE_MODES:
        raise ValueError(f"Random erasing mode {mode!r} is unknown; use one of {_ERASE_MODES}.")
    if prob <= 0:
        return x
    apply_seed, box_seed, pos_seed, noise_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4)
    )
    shape = tf.shape(x)
    height, width, channels = shape[0], shape[1], shape[2]
    box = _uniform(box_seed, [2, attempts])
    target_area = (area[0] + box[0] * (area[1] - area[0])) * tf.cast(height * width, tf.float32)
    log_lo, log_hi = math.log(min_aspect), math.log(1 / min_aspect)
    aspect = tf.exp(log_lo + box[1] * (log_hi - log_lo))
    box_h = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
    box_w = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
    fits = (box_w < width) & (box_h < height)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    box_h, box_w = box_h[first], box_w[first]
    u_top, u_left = tf.unstack(_uniform(pos_seed, [2]))
    top, left = _randint(u_top, height - box_h), _randint(u_left, width - box_w)

    def erase():
        if mode == "pixel":
            noise = tf.random.stateless_normal([box_h, box_w, channels], noise_seed)
        elif mode == "rand":
            noise = tf.random.stateless_normal([1, 1, channels], noise_seed)
            noise = tf.broadcast_to(noise, [box_h, box_w, channels])
        else:
            noise = tf.zeros([box_h, box_w, channels])
        # Slices and concats: one copy of the image, faster than a strided update or a where.
        bottom, right = top + box_h, left + box_w
        band = tf.concat([x[top:bottom, :left], noise, x[top:bottom, right:]], axis=1)
        return tf.ensure_shape(tf.concat([x[:top], band, x[bottom:]], axis=0), x.shape)

    apply = (_uniform(apply_seed, []) < prob) & tf.reduce_any(fits)
    return tf.cond(apply, erase, lambda: x)


# ---------------------------------------------------------------------------------------------
# Full transforms


def normalize(x: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """ToTensor + Normalize: (x / 255 - mean) / std, as x * a + b with full-shape a and b."""
    std = np.asarray(std, np.float64)
    scale = randaugment.full_like(1.0 / (255.0 * std), x)
    offset = randaugment.full_like(-np.asarray(mean, np.float64) / std, x)
    return tf.cast(x, tf.float32) * scale + offset


def _jitter_strength(value) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    value = tuple(float(v) for v in value)
    if len(value) == 4 and value[3] == 0:
        value = value[:3]
    if len(value) != 3:
        raise ValueError(
            "augment.color_jitter must be one float or (brightness, contrast, saturation); hue "
            f"jitter is not implemented. Got {value!r}."
        )
    return value


@_no_autograph
def train_preprocess(
    image: tf.Tensor,
    seed: tf.Tensor,
    *,
    size: int | tuple[int, int],
    config: ml_collections.ConfigDict,
) -> tf.Tensor:
    """DeiT's training transform of one image.

    Args:
      image: (H, W, 3) uint8, or the encoded image as a scalar tf.string (faster for JPEGs).
      seed: int32 [2] stateless seed; equal seeds give equal outputs.
      size: output size, an int or (height, width).
      config: `config.augment` (see deit_jax/config/defaults.py).

    Returns:
      float32 (height, width, 3), normalised with config.mean / config.std.
    """
    size_hw = height_width(size)
    if config.three_augment:
        return _three_augment_preprocess(image, seed, size_hw, config)
    policy = randaugment.parse_policy(config.randaugment) if config.randaugment else None
    crop_seed, interp_seed, flip_seed, aug_seed, erase_seed = tf.unstack(
        tf.random.experimental.stateless_split(tf.cast(seed, tf.int32), 5)
    )
    x = _random_resized_crop(image, crop_seed, interp_seed, size_hw, config)
    x = _random_flip(x, flip_seed, config.hflip)
    if policy is not None:
        # timm's img_mean: the fill colour of the geometric ops, the mean in [0, 255].
        fill = tuple(min(255, round(255 * m)) for m in config.mean)
        x = randaugment.randaugment(x, aug_seed, policy, fill=fill)
    elif config.color_jitter:
        x = color_jitter(x, aug_seed, _jitter_strength(config.color_jitter))
    x = normalize(x, config.mean, config.std)
    x = random_erasing(x, erase_seed, prob=config.reprob, mode=config.remode)
    return tf.ensure_shape(x, (*size_hw, 3))


def _random_resized_crop(image, crop_seed, interp_seed, size_hw, config) -> tf.Tensor:
    """RandomResizedCrop: an area/aspect window (decoded alone from JPEG bytes), resized."""
    scale, ratio = tuple(config.scale), tuple(config.ratio)
    if image.dtype == tf.string:
        x = _decode_and_crop(image, crop_seed, scale, ratio)
    else:
        x = _crop(image, crop_seed, scale, ratio)
    return _resize_random_interp(x, size_hw, config.interpolation, interp_seed)


def _random_flip(x: tf.Tensor, seed: tf.Tensor, prob: float) -> tf.Tensor:
    if prob <= 0:
        return x
    # tf.reverse: a negative-stride slice is ~20x slower on CPU.
    return tf.cond(_uniform(seed, []) < prob, lambda: tf.reverse(x, [1]), lambda: x)


def _three_augment_preprocess(
    image: tf.Tensor, seed: tf.Tensor, size_hw: tuple[int, int], config
) -> tf.Tensor:
    """DeiT III's train transform (`train_preprocess` with `config.three_augment`)."""
    # The same seed split as train_preprocess: crop, interpolation, flip, ops (erasing unused).
    crop_seed, interp_seed, flip_seed, aug_seed, _ = tf.unstack(
        tf.random.experimental.stateless_split(tf.cast(seed, tf.int32), 5)
    )
    op_seed, jitter_seed = tf.unstack(tf.random.experimental.stateless_split(aug_seed, 2))
    if config.src:
        if image.dtype == tf.string:
            image = tf.io.decode_image(image, channels=3, expand_animations=False)
        x = simple_random_crop(image, crop_seed, size_hw)
    else:
        x = _random_resized_crop(image, crop_seed, interp_seed, size_hw, config)
    x = _random_flip(x, flip_seed, config.hflip)
    x = three_augment.three_augment(tf.ensure_shape(x, (*size_hw, 3)), op_seed)
    if config.color_jitter:
        x = color_jitter(x, jitter_seed, _jitter_strength(config.color_jitter))
    return tf.ensure_shape(normalize(x, config.mean, config.std), (*size_hw, 3))


@_no_autograph
def eval_preprocess(
    image: tf.Tensor,
    *,
    size: int | tuple[int, int],
    crop_pct: float,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
) -> tf.Tensor:
    """timm's eval transform: resize to size / crop_pct, centre crop, normalise.

    Args:
      image: (H, W, 3) uint8, or the encoded image as a scalar tf.string.
      size: output size, an int or (height, width).
      crop_pct: the centre crop's share of the resized image (0.875 for DeiT at 224).
      mean, std: per-channel normalisation, in [0, 1] units.
      interpolation: the resize's filter, "bicubic" (DeiT's, timm's default) or "bilinear"
        (antialiased, as PIL).

    Returns:
      float32 (height, width, 3).
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}.")
    if image.dtype == tf.string:
        image = tf.io.decode_image(image, channels=3, expand_animations=False)
    out_h, out_w = height_width(size)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    if out_h == out_w:
        # torchvision Resize(int): the shorter side to `short`, the longer one truncated.
        short = int(math.floor(out_h / crop_pct))
        h_is_short = height <= width
        long_side = tf.where(h_is_short, width, height) * short // tf.minimum(height, width)
        new_h = tf.where(h_is_short, short, long_side)
        new_w = tf.where(h_is_short, long_side, short)
    else:
        # timm ResizeKeepRatio: fit the shorter relative side, rounding each side.
        target_h, target_w = math.floor(out_h / crop_pct), math.floor(out_w / crop_pct)
        h_f, w_f = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
        ratio = tf.minimum(h_f / target_h, w_f / target_w)
        new_h = tf.cast(tf.round(h_f / ratio), tf.int32)
        new_w = tf.cast(tf.round(w_f / ratio), tf.int32)
    x = resize(image, tf.stack([new_h, new_w]), interpolation)
    # torchvision CenterCrop: offset round((n - crop) / 2), Python's round-half-to-even.
    top, left = _half_even(new_h - out_h), _half_even(new_w - out_w)
    x = x[top : top + out_h, left : left + out_w]
    return tf.ensure_shape(normalize(x, mean, std), (out_h, out_w, 3))


def _half_even(n: tf.Tensor) -> tf.Tensor:
    """round(n / 2) with ties to even, for an int32 tensor n >= 0."""
    half = n // 2
    return half + (n % 2) * (half % 2)
