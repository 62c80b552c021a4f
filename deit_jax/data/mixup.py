"""Mixup / CutMix with label smoothing, as timm's `Mixup` does it for DeiT, in TensorFlow.

Where it runs: inside `tf.data`, on each process's batch right after batching. The reference
mixes each GPU process's local batch with its own reverse (`x.flip(0)`), so mixing the per-process
batch is the reference's semantics. On the accelerators the global batch is sharded over the data
axis, so the reversed batch means moving every image between devices (a collective permute of the
whole image batch, every step); reversing within each device's shard instead would avoid that but
tie the pairs to the device layout. On the host it costs about 0.25-0.5 ms of CPU per 224 px image
(one copy of the batch for CutMix, three passes for Mixup), 5-10% of the per-image host time of the
train pipeline (benchmarks/input_pipeline.py prints it), and keeps the mixing independent of the
mesh.

Semantics (timm, `mode='batch'`, the DeiT default): with probability `prob` the batch is mixed;
then CutMix with probability `switch_prob` (lambda ~ Beta(cutmix_alpha, cutmix_alpha)) else Mixup
(lambda ~ Beta(mixup_alpha, mixup_alpha)). CutMix pastes a box of the reversed batch whose side
is sqrt(1 - lambda) of the image's, clipped at the borders, and lambda is then corrected to the
area actually kept (timm `correct_lam`). Targets are lambda * smooth(y) + (1 - lambda) *
smooth(y reversed), label smoothing folded in. Modes 'elem' and 'pair' draw per element / per
pair as timm does.
"""

from __future__ import annotations

import ml_collections

from deit_jax._compat import import_tensorflow

tf = import_tensorflow()
# Plain TF ops only, no Python control flow on tensors: autograph would only slow tracing down
# (about 3x for train_preprocess).
_no_autograph = tf.autograph.experimental.do_not_convert

_MODES = ("batch", "pair", "elem")


def smooth_one_hot(labels: tf.Tensor, num_classes: int, smoothing: float) -> tf.Tensor:
    """One-hot (B, num_classes) float32 with off value eps / C and on value 1 - eps + eps / C."""
    off = smoothing / num_classes
    return tf.one_hot(labels, num_classes, on_value=1.0 - smoothing + off, off_value=off)


def _beta(seed: tf.Tensor, alpha: float, shape) -> tf.Tensor:
    """Beta(alpha, alpha) from two stateless gammas (TF has no stateless beta)."""
    s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    g1 = tf.random.stateless_gamma(shape, s1, alpha)
    g2 = tf.random.stateless_gamma(shape, s2, alpha)
    return g1 / tf.maximum(g1 + g2, 1e-12)


@_no_autograph
def cutmix_box(
    height: int | tf.Tensor, width: int | tf.Tensor, lam: tf.Tensor, seed: tf.Tensor
) -> tuple[tuple[tf.Tensor, ...], tf.Tensor]:
    """timm `rand_bbox` + `correct_lam` for any shape of `lam`.

    Returns ((y_lo, y_hi, x_lo, x_hi), corrected_lam): the box, int32, clipped to the image, and
    1 - box area / image area.
    """
    height, width = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
    ratio = tf.sqrt(1.0 - lam)
    cut_h = tf.cast(tf.cast(height, tf.float32) * ratio, tf.int32)  # int() truncates
    cut_w = tf.cast(tf.cast(width, tf.float32) * ratio, tf.int32)
    cy = tf.random.stateless_uniform(tf.shape(lam), seed, 0, height, dtype=tf.int32)
    cx = tf.random.stateless_uniform(
        tf.shape(lam), tf.random.experimental.stateless_fold_in(seed, 1), 0, width, dtype=tf.int32
    )
    y_lo = tf.clip_by_value(cy - cut_h // 2, 0, height)
    y_hi = tf.clip_by_value(cy + (cut_h + 1) // 2, 0, height)
    x_lo = tf.clip_by_value(cx - cut_w // 2, 0, width)
    x_hi = tf.clip_by_value(cx + (cut_w + 1) // 2, 0, width)
    area = tf.cast((y_hi - y_lo) * (x_hi - x_lo), tf.float32)
    return (y_lo, y_hi, x_lo, x_hi), 1.0 - area / tf.cast(height * width, tf.float32)


def _draw_params(config, seed, shape):
    """Per-draw (lam, use_cutmix), timm's `_params_per_batch` / `_params_per_elem`."""
    mix_seed, switch_seed, cut_seed, mixup_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4)
    )
    if config.mixup_alpha > 0 and config.cutmix_alpha > 0:
        use_cutmix = tf.random.stateless_uniform(shape, switch_seed) < config.switch_prob
        lam = tf.where(
            use_cutmix,
            _beta(cut_seed, config.cutmix_alpha, shape),
            _beta(mixup_seed, config.mixup_alpha, shape),
        )
    elif config.mixup_alpha > 0:
        use_cutmix = tf.zeros(shape, tf.bool)
        lam = _beta(mixup_seed, config.mixup_alpha, shape)
    else:
        use_cutmix = tf.ones(shape, tf.bool)
        lam = _beta(cut_seed, config.cutmix_alpha, shape)
    mixed = tf.random.stateless_uniform(shape, mix_seed) < config.prob
    return tf.where(mixed, lam, 1.0), use_cutmix & mixed


@_no_autograph
def mixup_cutmix(
    images: tf.Tensor,
    labels: tf.Tensor,
    seed: tf.Tensor,
    *,
    num_classes: int,
    config: ml_collections.ConfigDict,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Mixes a batch with its reverse and returns (images, soft targets).

    Args:
      images: float32 (B, H, W, C).
      labels: int32 (B,).
      seed: int32 [2] stateless seed, one per batch.
      num_classes: number of classes of the targets.
      config: `config.mixup` (mixup_alpha, cutmix_alpha, prob, switch_prob, mode,
        label_smoothing).

    Returns:
      (images float32 (B, H, W, C), targets float32 (B, num_classes)); each target row sums to 1.
    """
    if config.mode not in _MODES:
        raise ValueError(f"mixup.mode {config.mode!r} is unknown; use one of {_MODES}.")
    if config.mixup_alpha < 0 or config.cutmix_alpha < 0:
        raise ValueError("mixup.mixup_alpha and mixup.cutmix_alpha must be >= 0.")
    images = tf.convert_to_tensor(images, tf.float32)
    targets = smooth_one_hot(labels, num_classes, config.label_smoothing)
    if config.prob <= 0 or (config.mixup_alpha == 0 and config.cutmix_alpha == 0):
        return images, targets
    batch = images.shape[0]
    if config.mode == "pair" and batch is not None and batch % 2:
        raise ValueError(f"mixup.mode 'pair' needs an even batch size, got {batch}.")
    shape = tf.shape(images)
    height, width = shape[1], shape[2]
    param_seed, box_seed = tf.unstack(
        tf.random.experimental.stateless_split(tf.cast(seed, tf.int32), 2)
    )
    if config.mode == "batch":
        lam, use_cutmix = _draw_params(config, param_seed, [1])
    elif config.mode == "elem":
        lam, use_cutmix = _draw_params(config, param_seed, shape[:1])
    else:  # pair: element i and its partner B - 1 - i share their draw
        lam, use_cutmix = _draw_params(config, param_seed, shape[:1] // 2)
        lam, use_cutmix = (
            tf.concat([lam, lam[::-1]], 0),
            tf.concat([use_cutmix, use_cutmix[::-1]], 0),
        )
        # The shared box too: draw per pair, mirror below.
    (y_lo, y_hi, x_lo, x_hi), cut_lam = cutmix_box(height, width, lam, box_seed)
    if config.mode == "pair":
        half = shape[0] // 2
        y_lo, y_hi, x_lo, x_hi = (
            tf.concat([v[:half], v[:half][::-1]], 0) for v in (y_lo, y_hi, x_lo, x_hi)
        )
        cut_lam = tf.concat([cut_lam[:half], cut_lam[:half][::-1]], 0)
    # timm leaves an unmixed draw (lam == 1) alone, CutMix included.
    use_cutmix &= lam < 1.0
    lam = tf.where(use_cutmix, cut_lam, lam)
    targets = targets * lam[:, None] + tf.reverse(targets, [0]) * (1.0 - lam[:, None])
    if config.mode == "batch":
        # One draw for the whole batch: scalar lambda, one box, and only the branch it picked
        # runs (broadcasting ops and tf.where are ~10x slower than these on CPU).
        def paste():  # CutMix: the box comes from the reversed batch
            y0, y1, x0, x1 = y_lo[0], y_hi[0], x_lo[0], x_hi[0]
            # Slices and concats: one copy of the batch, 5x faster than a strided update.
            box = tf.reverse(images[:, y0:y1, x0:x1], [0])
            band = tf.concat([images[:, y0:y1, :x0], box, images[:, y0:y1, x1:]], axis=2)
            pasted = tf.concat([images[:, :y0], band, images[:, y1:]], axis=1)
            return tf.ensure_shape(pasted, images.shape)

        def blend():  # Mixup
            return tf.reverse(images, [0]) * (1.0 - lam[0]) + images * lam[0]

        images = tf.case([(use_cutmix[0], paste), (lam[0] < 1.0, blend)], default=lambda: images)
        return images, targets

    per_image = lambda v: v[:, None, None, None]
    rows = tf.range(height)[None, :, None, None]
    cols = tf.range(width)[None, None, :, None]
    in_box = (rows >= per_image(y_lo)) & (rows < per_image(y_hi))
    in_box &= (cols >= per_image(x_lo)) & (cols < per_image(x_hi))
    reverse = tf.reverse(images, [0])
    pasted = tf.where(in_box, reverse, images)
    blended = images * per_image(lam) + reverse * (1.0 - per_image(lam))
    return tf.where(per_image(use_cutmix), pasted, blended), targets
