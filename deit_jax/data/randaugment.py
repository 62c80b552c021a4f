"""RandAugment (Cubuk et al., arXiv 1909.13719) as timm implements it, in TensorFlow.

The official DeiT recipe uses timm's `rand-m9-mstd0.5-inc1`: two ops per image, each picked
uniformly (with replacement) from the "increasing" op set, each applied with probability 0.5, with
a magnitude drawn per op from N(9, 0.5) and clipped to [0, 10]. This module parses the same policy
strings and reproduces timm's ops (PIL underneath) bit-for-bit for the colour ops, so that a model
trained here sees the distribution the released checkpoints saw.

Images travel between ops as float32 (H, W, 3) holding integers in [0, 255]: every op ends by
quantising the way PIL's uint8 arithmetic does, which keeps the ops exact without uint8 casts.

One documented difference: timm resamples the geometric ops (rotate, shear, translate) with the
recipe's interpolation (bicubic for DeiT); TensorFlow's projective transform only has nearest and
bilinear, so they are bilinear here: within one grey level of PIL's bilinear everywhere, border
and fill included, and about 2 grey levels on average from PIL's bicubic.

PosterizeIncreasing at magnitude 10 (reached through the magnitude noise) asks PIL for 0 bits: the
Pillow the reference trained with returned a black image; current Pillow (13.0 here) raises, so
timm's op crashes there; this keeps the black image.

All randomness is stateless (`tf.random.stateless_*`), so one seed always gives one output.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import numpy as np

from deit_jax._compat import import_tensorflow
from deit_jax.data.randaugment_policy import (  # noqa: F401  (re-exported)
    _LEVEL_DENOM,
    RAND_INCREASING_TRANSFORMS,
    RAND_TRANSFORMS,
    RAND_WEIGHTED_0,
    Policy,
    parse_policy,
)

tf = import_tensorflow()
# Plain TF ops only, no Python control flow on tensors: autograph would only slow tracing down
# (about 3x for train_preprocess).
_no_autograph = tf.autograph.experimental.do_not_convert


# ---------------------------------------------------------------------------------------------
# Ops. `x` is float32 (H, W, 3) with integer values in [0, 255]; each op returns the same.


def full_like(values, x: tf.Tensor) -> tf.Tensor:
    """Per-channel `values` (3,) broadcast to x's shape, as a constant when the shape is static.

    TensorFlow's CPU kernels run broadcasting binary ops and `tf.where` about ten times slower
    than same-shape elementwise ops, so the ops below use full-shape operands and arithmetic
    selects (`_select`); that is most of the speed of this module.
    """
    if x.shape.is_fully_defined() and not isinstance(values, tf.Tensor):
        return tf.constant(np.broadcast_to(np.asarray(values, np.float32), x.shape))
    return tf.broadcast_to(tf.cast(values, tf.float32), tf.shape(x))


@dataclasses.dataclass(frozen=True)
class Constants:
    """Full-shape operands shared by the ops of one image (built once, outside the op switch,
    so that the graph holds one copy rather than one per op and layer)."""

    fill: tf.Tensor  # the geometric ops' fill colour
    xs: tf.Tensor  # PIL x coordinate of each pixel centre (column + 0.5)
    ys: tf.Tensor  # PIL y coordinate (row + 0.5)
    lut_offset: tf.Tensor  # int32 channel * 256, to index a flattened (3, 256) lookup table


def make_constants(x: tf.Tensor, fill: Sequence[float] = (128.0, 128.0, 128.0)) -> Constants:
    if x.shape.is_fully_defined():
        h, w, c = x.shape
        xs, ys = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
        xs, ys = (tf.constant(np.repeat(g[..., None], c, -1), tf.float32) for g in (xs, ys))
    else:
        shape = tf.shape(x)
        cols = tf.cast(tf.range(shape[1]), tf.float32) + 0.5
        rows = tf.cast(tf.range(shape[0]), tf.float32) + 0.5
        xs = tf.broadcast_to(cols[None, :, None], shape)
        ys = tf.broadcast_to(rows[:, None, None], shape)
    offset = tf.cast(full_like([0.0, 256.0, 512.0], x), tf.int32)
    return Constants(full_like(tuple(float(v) for v in fill), x), xs, ys, offset)


def _select(mask: tf.Tensor, a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """tf.where(mask, a, b) for same-shape integer-valued floats (exact), without `Select`."""
    return b + tf.cast(mask, tf.float32) * (a - b)


def _quantize_blend(degenerate: tf.Tensor, x: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    # PIL Image.blend on uint8: float32 in1 + alpha * (in2 - in1), clipped, then truncated.
    factor = tf.cast(factor, tf.float32)
    return tf.floor(tf.clip_by_value(degenerate + factor * (x - degenerate), 0.0, 255.0))


# PIL's RGB -> L weights in 16-bit fixed point, one column per output channel.
_GRAY = np.array([[19595] * 3, [38470] * 3, [7471] * 3], np.float32)


def _grayscale(x: tf.Tensor) -> tf.Tensor:
    """PIL's RGB -> L conversion, replicated to 3 channels.

    As a matmul: the products and sums are integers below 2**24, so float32 is exact.
    """
    gray = tf.matmul(tf.reshape(x, [-1, 3]), _GRAY)
    return tf.reshape(tf.floor((gray + 32768.0) / 65536.0), tf.shape(x))


def _apply_lut(x: tf.Tensor, lut: tf.Tensor, consts: Constants | None) -> tf.Tensor:
    """Per-channel lookup: `lut` is (3, 256)."""
    offset = (consts or make_constants(x)).lut_offset
    return tf.gather(tf.reshape(tf.cast(lut, tf.float32), [-1]), tf.cast(x, tf.int32) + offset)


def _histogram(x: tf.Tensor) -> tf.Tensor:
    """Per-channel 256-bin histogram, (3, 256) int32."""
    channels = tf.transpose(tf.reshape(tf.cast(x, tf.int32), [-1, 3]))
    return tf.math.bincount(channels, minlength=256, maxlength=256, axis=-1)


def auto_contrast(x: tf.Tensor, consts: Constants | None = None) -> tf.Tensor:
    """PIL ImageOps.autocontrast: stretch each channel's [min, max] to [0, 255]."""
    flat = tf.reshape(x, [-1, 3])
    lo = tf.cast(tf.reduce_min(flat, axis=0), tf.float64)[:, None]
    hi = tf.cast(tf.reduce_max(flat, axis=0), tf.float64)[:, None]
    # float64 as in PIL's Python LUT code, so the truncation lands on the same side.
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    ramp = tf.range(256, dtype=tf.float64)[None]
    # Truncation and flooring agree here: negative entries are clipped to 0 either way.
    lut = tf.clip_by_value(tf.floor(ramp * scale + (-lo * scale)), 0.0, 255.0)
    lut = tf.where(hi > lo, lut, ramp)
    return _apply_lut(x, lut, consts)


def equalize(x: tf.Tensor, consts: Constants | None = None) -> tf.Tensor:
    """PIL ImageOps.equalize, per channel."""
    hist = _histogram(x)
    last_index = 255 - tf.argmax(tf.reverse(tf.cast(hist > 0, tf.int32), [1]), axis=1)
    last = tf.gather(hist, last_index, batch_dims=1)
    step = (tf.reduce_sum(hist, axis=1) - last) // 255
    safe_step = tf.maximum(step, 1)[:, None]
    cumulative = tf.cumsum(hist, axis=1, exclusive=True)
    lut = (safe_step // 2 + cumulative) // safe_step
    lut = tf.where(step[:, None] > 0, lut, tf.range(256)[None])
    return _apply_lut(x, tf.clip_by_value(lut, 0, 255), consts)


def invert(x: tf.Tensor) -> tf.Tensor:
    return 255.0 - x


def posterize(x: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
    """Keeps the top `bits` bits (bits >= 8 is the identity, as in timm)."""
    shift = tf.pow(2.0, 8.0 - tf.minimum(tf.cast(bits, tf.float32), 8.0))
    return tf.floor(x / shift) * shift


def solarize(x: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
    """Inverts the pixels at or above `threshold` (256: identity)."""
    return _select(x < tf.cast(threshold, tf.float32), x, 255.0 - x)


def solarize_add(x: tf.Tensor, add: tf.Tensor, threshold: float = 128.0) -> tf.Tensor:
    return _select(x < threshold, tf.minimum(x + tf.cast(add, tf.float32), 255.0), x)


def color(x: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL ImageEnhance.Color: blend with the greyscale image."""
    return _quantize_blend(_grayscale(x), x, factor)


def contrast(x: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL ImageEnhance.Contrast: blend with the rounded mean grey level."""
    # Summed in int32 (exact); 3x the grey sum, as the grey plane is replicated.
    total = tf.cast(tf.reduce_sum(tf.cast(_grayscale(x), tf.int32)), tf.float64)
    mean = total / tf.cast(tf.size(x), tf.float64)
    return _quantize_blend(tf.cast(tf.floor(mean + 0.5), tf.float32), x, factor)


def brightness(x: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL ImageEnhance.Brightness: blend with black."""
    return _quantize_blend(tf.zeros([], tf.float32), x, factor)


def sharpness(x: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL ImageEnhance.Sharpness: blend with PIL's SMOOTH filter (border pixels unfiltered)."""
    # SMOOTH = (3x3 box + 4 x centre) / 13, as separable slice sums (a conv is ~10x slower).
    rows = x[:-2] + x[1:-1] + x[2:]
    box = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]
    inner = x[1:-1, 1:-1]
    # Integer sums are exact in float32, and n / 13 is never a tie, so this rounds like PIL.
    smooth = tf.clip_by_value(tf.floor((box + 4.0 * inner) / 13.0 + 0.5), 0.0, 255.0)
    degenerate = tf.pad(smooth - inner, [[1, 1], [1, 1], [0, 0]]) + x
    return _quantize_blend(degenerate, x, factor)


def affine(x: tf.Tensor, matrix: Sequence[tf.Tensor], consts: Constants) -> tf.Tensor:
    """PIL `Image.transform(AFFINE, matrix, BILINEAR, fillcolor=consts.fill)`.

    `matrix` = (a, b, c, d, e, f) maps an output pixel centre (x, y) to the input point
    (a x + b y + c, d x + e y + f), in PIL's coordinates where pixel centres sit at +0.5.
    """
    a, b, c, d, e, f = (tf.cast(m, tf.float32) for m in matrix)
    # TF samples in pixel-index coordinates (centres at integers): shift by half a pixel.
    shifted_c, shifted_f = c + 0.5 * (a + b) - 0.5, f + 0.5 * (d + e) - 0.5
    transform = tf.stack([a, b, shifted_c, d, e, shifted_f, 0.0, 0.0])[None]
    # PIL interpolates edge-clamped neighbours for every output pixel whose source centre lies
    # inside the image, and fills the others.
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=x[None],
        transforms=transform,
        output_shape=tf.shape(x)[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="NEAREST",
    )[0]
    out = tf.floor(tf.clip_by_value(out, 0.0, 255.0))  # PIL truncates to uint8
    xs, ys = consts.xs, consts.ys
    src_x, src_y = a * xs + (b * ys + c), d * xs + (e * ys + f)
    height, width = (tf.cast(n, tf.float32) for n in (tf.shape(x)[0], tf.shape(x)[1]))
    inside = (src_x >= 0.0) & (src_x < width) & (src_y >= 0.0) & (src_y < height)
    return _select(inside, out, consts.fill)


def rotate(x: tf.Tensor, degrees: tf.Tensor, consts: Constants) -> tf.Tensor:
    """PIL `Image.rotate(degrees)`: counter-clockwise about the image centre, same size."""
    h, w = (tf.cast(s, tf.float64) for s in (tf.shape(x)[0], tf.shape(x)[1]))
    angle = -tf.cast(degrees, tf.float64) * (math.pi / 180.0)
    cos, sin = tf.cos(angle), tf.sin(angle)
    cx, cy = w / 2.0, h / 2.0
    # PIL: the rotation about the origin, then moved so the centre maps to itself.
    c = cos * -cx + sin * -cy + cx
    f = -sin * -cx + cos * -cy + cy
    return affine(x, (cos, sin, c, -sin, cos, f), consts)


def shear_x(x: tf.Tensor, factor: tf.Tensor, consts: Constants) -> tf.Tensor:
    return affine(x, (1.0, factor, 0.0, 0.0, 1.0, 0.0), consts)


def shear_y(x: tf.Tensor, factor: tf.Tensor, consts: Constants) -> tf.Tensor:
    return affine(x, (1.0, 0.0, 0.0, factor, 1.0, 0.0), consts)


def translate_x_rel(x: tf.Tensor, pct: tf.Tensor, consts: Constants) -> tf.Tensor:
    pixels = tf.cast(pct, tf.float32) * tf.cast(tf.shape(x)[1], tf.float32)
    return affine(x, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), consts)


def translate_y_rel(x: tf.Tensor, pct: tf.Tensor, consts: Constants) -> tf.Tensor:
    pixels = tf.cast(pct, tf.float32) * tf.cast(tf.shape(x)[0], tf.float32)
    return affine(x, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), consts)


# ---------------------------------------------------------------------------------------------
# timm's magnitude -> op argument mappings. `level` is the clipped magnitude and `sign` is +-1
# (timm's `_randomly_negate`, used only by the signed mappings), both float64 scalars: timm does
# this arithmetic in Python floats, and float32 would move factors such as 0.64 by one ulp, which
# flips PIL's truncation on a few pixels.

_Op = Callable[[tf.Tensor, tf.Tensor, tf.Tensor, Sequence[float]], tf.Tensor]


def _frac(level: tf.Tensor) -> tf.Tensor:
    return level / _LEVEL_DENOM


def _enhance(level):
    return _frac(level) * 1.8 + 0.1


def _enhance_increasing(level, sign):
    return tf.maximum(1.0 + sign * _frac(level) * 0.9, 0.1)


def _posterize_bits(level):
    # PosterizeIncreasing at magnitude 10 keeps 4 - 4 = 0 bits: black (see the module docstring).
    return tf.floor(_frac(level) * 4.0)


def _solarize_threshold(level):
    return tf.minimum(tf.floor(_frac(level) * 256.0), 256.0)


OPS: dict[str, _Op] = {
    "AutoContrast": lambda x, level, sign, consts: auto_contrast(x, consts),
    "Equalize": lambda x, level, sign, consts: equalize(x, consts),
    "Invert": lambda x, level, sign, consts: invert(x),
    "Rotate": lambda x, level, sign, consts: rotate(x, sign * _frac(level) * 30.0, consts),
    "Posterize": lambda x, level, sign, consts: posterize(x, _posterize_bits(level)),
    "PosterizeIncreasing": lambda x, level, sign, consts: posterize(
        x, 4.0 - _posterize_bits(level)
    ),
    "Solarize": lambda x, level, sign, consts: solarize(x, _solarize_threshold(level)),
    "SolarizeIncreasing": lambda x, level, sign, consts: solarize(
        x, 256.0 - _solarize_threshold(level)
    ),
    "SolarizeAdd": lambda x, level, sign, consts: solarize_add(
        x, tf.minimum(tf.floor(_frac(level) * 110.0), 128.0)
    ),
    "Color": lambda x, level, sign, consts: color(x, _enhance(level)),
    "ColorIncreasing": lambda x, level, sign, consts: color(x, _enhance_increasing(level, sign)),
    "Contrast": lambda x, level, sign, consts: contrast(x, _enhance(level)),
    "ContrastIncreasing": lambda x, level, sign, consts: contrast(
        x, _enhance_increasing(level, sign)
    ),
    "Brightness": lambda x, level, sign, consts: brightness(x, _enhance(level)),
    "BrightnessIncreasing": lambda x, level, sign, consts: brightness(
        x, _enhance_increasing(level, sign)
    ),
    "Sharpness": lambda x, level, sign, consts: sharpness(x, _enhance(level)),
    "SharpnessIncreasing": lambda x, level, sign, consts: sharpness(
        x, _enhance_increasing(level, sign)
    ),
    "ShearX": lambda x, level, sign, consts: shear_x(x, sign * _frac(level) * 0.3, consts),
    "ShearY": lambda x, level, sign, consts: shear_y(x, sign * _frac(level) * 0.3, consts),
    "TranslateXRel": lambda x, level, sign, consts: translate_x_rel(
        x, sign * _frac(level) * 0.45, consts
    ),
    "TranslateYRel": lambda x, level, sign, consts: translate_y_rel(
        x, sign * _frac(level) * 0.45, consts
    ),
}


@_no_autograph
def apply_op(
    x: tf.Tensor,
    name: str,
    magnitude: float | tf.Tensor,
    sign: float | tf.Tensor = 1.0,
    fill: Sequence[float] = (128.0, 128.0, 128.0),
) -> tf.Tensor:
    """Applies one named op at a fixed magnitude (what timm's `AugmentOp` does with p=1, mstd=0)."""
    if name not in OPS:
        raise ValueError(f"Unknown RandAugment op {name!r}; known: {', '.join(OPS)}.")
    level = tf.clip_by_value(tf.cast(magnitude, tf.float64), 0.0, _LEVEL_DENOM)
    x = tf.cast(x, tf.float32)
    return OPS[name](x, level, tf.cast(sign, tf.float64), make_constants(x, fill))


@_no_autograph
def randaugment(
    image: tf.Tensor, seed: tf.Tensor, policy: Policy | str, *, fill: Sequence[float]
) -> tf.Tensor:
    """timm's `RandAugment` on one image.

    Args:
      image: (H, W, 3) uint8, or float32 holding integers in [0, 255].
      seed: int32 [2] stateless seed.
      policy: a `Policy` or a policy string ('rand-m9-mstd0.5-inc1').
      fill: per-channel fill colour of the geometric ops (timm's `img_mean`, the dataset mean
        in [0, 255]).

    Returns:
      float32 (H, W, 3) with integer values in [0, 255].
    """
    if isinstance(policy, str):
        policy = parse_policy(policy)
    x = tf.cast(image, tf.float32)
    if policy.num_layers == 0 or not policy.ops:
        return x
    num_ops, num_layers = len(policy.ops), policy.num_layers
    choice_seed, apply_seed, sign_seed, level_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4)
    )
    if policy.weights is None:
        choices = tf.random.stateless_uniform([num_layers], choice_seed, 0, num_ops, tf.int32)
    else:
        # Weighted choice without replacement, as numpy's: Gumbel top-k on the log weights.
        uniform = tf.random.stateless_uniform([num_ops], choice_seed, 1e-12, 1.0)
        keys = tf.math.log(tf.constant(policy.weights)) - tf.math.log(-tf.math.log(uniform))
        _, choices = tf.math.top_k(keys, num_layers)
    if math.isinf(policy.magnitude_std):
        level = tf.random.stateless_uniform([num_layers], level_seed, 0.0, policy.magnitude)
    else:
        noise = tf.random.stateless_normal([num_layers], level_seed)
        level = policy.magnitude + policy.magnitude_std * noise
    level = tf.cast(tf.clip_by_value(level, 0.0, policy.magnitude_max), tf.float64)
    sign = tf.where(
        tf.random.stateless_uniform([num_layers], sign_seed) > 0.5,
        tf.constant(-1.0, tf.float64),
        1.0,
    )
    # One extra identity branch for "op not applied" (probability 1 - p).
    applied = tf.random.stateless_uniform([num_layers], apply_seed) < policy.prob
    index = tf.where(applied, choices, num_ops)
    consts = make_constants(x, fill)
    # A loop over the layers rather than a Python loop: one copy of the op switch in the graph
    # halves the tracing time (it is most of train_preprocess's).
    _, x = tf.while_loop(
        lambda i, x: i < num_layers,
        lambda i, x: (i + 1, _switch(x, index[i], level[i], sign[i], policy.ops, consts)),
        (tf.constant(0), x),
    )
    return x


def _switch(x, index, level, sign, names: Sequence[str], consts: Constants) -> tf.Tensor:
    """Runs op `names[index]`, or returns `x` when `index == len(names)` (one branch executes)."""
    branches = [functools.partial(OPS[name], x, level, sign, consts) for name in names]
    return tf.switch_case(index, branches + [lambda: x])
