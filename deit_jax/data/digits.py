"""An offline image data set: scikit-learn's 8x8 handwritten digits as a tfds builder.

scikit-learn ships the UCI "Optical Recognition of Handwritten Digits" test set (1,797 grey
images of 8x8 pixels, classes 0-9) inside its package, so this builder prepares without any
network access. It exists so that deit_jax can train, evaluate and be tested end to end on a real
image classification task anywhere.

Preparation (done on first use by `deit_jax.data.catalog.get_source`, into `config.data.data_dir`):

- pixel values 0..16 become uint8 by `round(v * 255 / 16)`, so 16 -> 255;
- images stay single-channel (8, 8, 1) PNGs; the input pipeline turns grey into RGB;
- the split is stratified by class and deterministic (`train_test_split(test_size=360,
  stratify=labels, random_state=0)`): `train` has 1,437 images and `test` 360, each class in the
  same proportion in both.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

NUM_TEST = 360
SPLIT_SEED = 0


class Digits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """scikit-learn's digits (1,797 8x8 grey images, 10 classes), split 1,437 train / 360 test."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # tfds looks for a download-checksums file next to a builder's code through the
    # `importlib_resources` package, which current installs of tfds do not pull in. Digits
    # downloads nothing, so it has no such file to look for.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Nothing to download: the data ships with scikit-learn.
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        labels = digits.target.astype(np.int64)
        train_idx, test_idx = train_test_split(
            np.arange(len(labels)), test_size=NUM_TEST, stratify=labels, random_state=SPLIT_SEED
        )
        return {
            "train": self._generate_examples(images, labels, train_idx),
            "test": self._generate_examples(images, labels, test_idx),
        }

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray):
        for i in indices:
            # The key (scikit-learn's row index) fixes the order tfds writes examples in.
            yield int(i), {"image": images[i], "label": int(labels[i])}
