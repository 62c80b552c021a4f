"""Mixup / CutMix with label smoothing (timm semantics)."""

import ml_collections
import numpy as np
import pytest
import torch
from timm.data.mixup import mixup_target

from deit_jax import config as config_lib
from deit_jax.data import mixup

tf = mixup.tf
NUM_CLASSES = 10


def mixup_config(**overrides) -> ml_collections.ConfigDict:
    config = config_lib.base_config().mixup
    config.unlock()
    config.update(overrides)
    return config


def constant_batch(batch: int = 6, size: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Image i is filled with the value i, so every output pixel says where it came from."""
    images = np.broadcast_to(
        np.arange(batch, dtype=np.float32)[:, None, None, None], (batch, size, size + 4, 3)
    ).copy()
    return images, np.arange(batch, dtype=np.int32) % NUM_CLASSES


def test_smooth_one_hot_matches_timm():
    labels = np.array([0, 3, 9], np.int32)
    ours = mixup.smooth_one_hot(labels, NUM_CLASSES, 0.1).numpy()
    np.testing.assert_allclose(ours[1], [0.01] * 3 + [0.91] + [0.01] * 6, rtol=1e-6)
    theirs = mixup_target(torch.tensor(labels), NUM_CLASSES, lam=1.0, smoothing=0.1).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_targets_sum_to_one_and_match_images(mode):
    images, labels = constant_batch()
    config = mixup_config(mode=mode, label_smoothing=0.0)
    for step in range(8):
        mixed, targets = mixup.mixup_cutmix(
            images, labels, tf.constant([step, 0]), num_classes=NUM_CLASSES, config=config
        )
        mixed, targets = mixed.numpy(), targets.numpy()
        assert mixed.shape == images.shape and mixed.dtype == np.float32
        assert targets.shape == (6, NUM_CLASSES) and targets.dtype == np.float32
        np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
        for i in range(6):
            j = 5 - i  # the partner: the reversed batch
            lam = targets[i, labels[i]]  # labels are distinct, smoothing 0
            values = mixed[i]
            if len(np.unique(values)) == 1:
                # Mixup (or nothing pasted): lam * own + (1 - lam) * partner everywhere.
                np.testing.assert_allclose(values, lam * i + (1 - lam) * j, atol=1e-5)
            else:
                # CutMix: whole pixels of either image; lambda = the share still its own.
                assert set(np.unique(values)) == {i, j}
                np.testing.assert_allclose((values == i).mean(), lam, atol=1e-6)


def test_batch_mode_shares_one_draw():
    images, labels = constant_batch()
    for step in range(6):
        _, targets = mixup.mixup_cutmix(
            images,
            labels,
            tf.constant([step, 1]),
            num_classes=NUM_CLASSES,
            config=mixup_config(label_smoothing=0.0),
        )
        lams = targets.numpy()[np.arange(6), labels]
        np.testing.assert_allclose(lams, lams[0], atol=1e-6)


def test_cutmix_lambda_is_pasted_area():
    images, labels = constant_batch(batch=4, size=37)
    config = mixup_config(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1)
    for step in range(10):
        mixed, targets = mixup.mixup_cutmix(
            images, labels, tf.constant([step, 2]), num_classes=NUM_CLASSES, config=config
        )
        kept = (mixed.numpy()[0] == 0).mean()  # share of image 0 still its own
        smooth = mixup.smooth_one_hot(labels, NUM_CLASSES, 0.1).numpy()
        expected = kept * smooth[0] + (1 - kept) * smooth[3]
        np.testing.assert_allclose(targets.numpy()[0], expected, atol=1e-6)
        assert set(np.unique(mixed.numpy()[0])) <= {0.0, 3.0}


def test_cutmix_box_matches_timm_formula():
    # timm rand_bbox: side sqrt(1 - lam) of the image, centred anywhere, clipped; lam corrected.
    lam = tf.constant([0.3, 0.7, 0.99, 1.0])
    (y0, y1, x0, x1), corrected = mixup.cutmix_box(40, 60, lam, tf.constant([5, 5]))
    y0, y1, x0, x1, corrected = (t.numpy() for t in (y0, y1, x0, x1, corrected))
    cut_h = (40 * np.sqrt(1 - lam.numpy())).astype(int)
    assert ((y1 - y0) <= cut_h).all() and (
        (x1 - x0) <= (60 * np.sqrt(1 - lam.numpy())).astype(int)
    ).all()
    assert (y0 >= 0).all() and (y1 <= 40).all() and (x0 >= 0).all() and (x1 <= 60).all()
    np.testing.assert_allclose(corrected, 1 - (y1 - y0) * (x1 - x0) / 2400, rtol=1e-6)
    assert corrected[-1] == 1.0


def test_switch_probability():
    images, labels = constant_batch(batch=2, size=16)
    cutmix = 0
    num = 300
    fn = tf.function(
        lambda seed: mixup.mixup_cutmix(
            images, labels, seed, num_classes=NUM_CLASSES, config=mixup_config()
        )[0]
    )
    for step in range(num):
        mixed = fn(tf.constant([step, 3])).numpy()
        # CutMix only moves whole pixels: values stay in {0, 1}; Mixup blends them.
        cutmix += np.isin(mixed, [0.0, 1.0]).all() and not (mixed[0] == 0).all()
    # switch_prob 0.5: Binomial(300, 0.5) has sigma 0.029; tolerance 3.5 sigma (a CutMix box can
    # come out empty at lam close to 1, which reads as no CutMix).
    assert abs(cutmix / num - 0.5) < 0.1, cutmix / num


def test_prob_zero_and_determinism():
    images, labels = constant_batch()
    mixed, targets = mixup.mixup_cutmix(
        images,
        labels,
        tf.constant([1, 1]),
        num_classes=NUM_CLASSES,
        config=mixup_config(prob=0.0),
    )
    np.testing.assert_array_equal(mixed.numpy(), images)
    np.testing.assert_allclose(targets.numpy(), mixup.smooth_one_hot(labels, NUM_CLASSES, 0.1))
    run = lambda s: mixup.mixup_cutmix(
        images, labels, tf.constant(s), num_classes=NUM_CLASSES, config=mixup_config()
    )[1].numpy()
    np.testing.assert_array_equal(run([4, 4]), run([4, 4]))
    assert not np.array_equal(run([4, 4]), run([5, 4]))


def test_bad_arguments_raise():
    images, labels = constant_batch(batch=5)
    with pytest.raises(ValueError, match="even"):
        mixup.mixup_cutmix(
            images,
            labels,
            tf.constant([0, 0]),
            num_classes=NUM_CLASSES,
            config=mixup_config(mode="pair"),
        )
    with pytest.raises(ValueError, match="mode"):
        mixup.mixup_cutmix(
            images,
            labels,
            tf.constant([0, 0]),
            num_classes=NUM_CLASSES,
            config=mixup_config(mode="per_element"),
        )
