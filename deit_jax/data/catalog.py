"""Which source a data set's name gives: `get_source(config.data)`, preparing it if that can be
done here and now (the offline digits, ImageNet from its archives). The sources themselves are
`deit_jax.data.sources` (tfds builders, image folders, label-free images) and
`deit_jax.data.captions` (image-caption folders).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
from collections.abc import Iterator

import ml_collections

from deit_jax._compat import import_tensorflow

import_tensorflow()
import tensorflow_datasets as tfds  # noqa: E402  (after TensorFlow, see deit_jax/_compat.py)

from deit_jax.data import labels  # noqa: E402
from deit_jax.data.captions import CaptionsSource  # noqa: E402
from deit_jax.data.digits import NUM_TEST, Digits  # noqa: E402
from deit_jax.data.sources import FolderSource, ImagesSource, Source, TfdsSource  # noqa: E402
from deit_jax.errors import DataError, DataNotFoundError  # noqa: E402

log = logging.getLogger(__name__)

IMAGENET_ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


def data_dir_of(data: ml_collections.ConfigDict) -> str:
    """Where tfds data sets (and deit_jax's notes on any data set) live: `config.data.data_dir`,
    else tfds's default."""
    return data.data_dir or tfds.core.constants.DATA_DIR


def get_source(data: ml_collections.ConfigDict) -> Source:
    """The `Source` named by `config.data`, prepared if that can be done here and now."""
    data_dir = data.data_dir or None
    name = data.name
    if name.startswith("folder:"):
        return FolderSource(name[len("folder:") :], data_dir or tfds.core.constants.DATA_DIR)
    if labels.is_caption_data(name):
        root = os.path.expanduser(name.removeprefix(labels.CAPTIONS_PREFIX))
        return CaptionsSource(root, data_dir or tfds.core.constants.DATA_DIR)
    if labels.is_label_free(name):
        return ImagesSource(labels.label_free_root(name), data_dir or tfds.core.constants.DATA_DIR)
    if name == "digits":
        with _quiet_tfds():  # A second's work: no banner, progress bars or folder warnings.
            return TfdsSource(_prepared(Digits(data_dir=data_dir)))
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(
            f"Unknown data set {name!r}. config.data.name must be a tensorflow-datasets name "
            "(e.g. 'imagenet2012', 'cifar10'), 'digits' (offline), 'folder:/path/to/root' or "
            "'images:/path/to/root' (label-free)."
        ) from e
    if builder.is_prepared():
        return TfdsSource(builder)
    where = data_dir or tfds.core.constants.DATA_DIR
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        manual_dir = data.manual_dir
        expected = IMAGENET_ARCHIVES if builder.name == "imagenet2012" else ()
        if (
            manual_dir
            and os.path.isdir(manual_dir)
            and os.listdir(manual_dir)
            and all(os.path.exists(os.path.join(manual_dir, f)) for f in expected)
        ):
            log.info("Preparing %s from %s into %s (runs once).", name, manual_dir, where)
            config = tfds.download.DownloadConfig(manual_dir=manual_dir)
            return TfdsSource(_prepared(builder, download_config=config))
        what = (
            f"{' and '.join(expected)} (from https://image-net.org/download-images)"
            if expected
            else f"its files ({builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()})"
        )
        raise DataNotFoundError(
            f"Data set {name!r} is not prepared in {where} and cannot be downloaded "
            f"automatically. Download {what} into a directory and set config.data.manual_dir to "
            "it: the data set is then prepared on first use (once; for ImageNet this takes "
            f"hours). Or prepare it yourself: `tfds build {name} --data_dir={where} "
            "--manual_dir=<that directory>`."
        )
    raise DataNotFoundError(
        f"Data set {name!r} is not prepared in {where}. Prepare it once (this downloads it) with "
        f"`tfds build {name} --data_dir={where}` and set config.data.data_dir to that directory."
    )


def known_without_files(data: ml_collections.ConfigDict) -> tuple[int | None, int | None]:
    """`(classes, train examples)` of `config.data` as far as they are known without reading a
    file of the data (a plan): the offline digits' own, a tfds data set's from its builder's
    code and whatever metadata tfds ships (ImageNet's class count; its split sizes only once
    prepared); None where they are not (folders; a tfds split of unknown size)."""
    name = data.name
    if name.startswith("folder:") or labels.is_label_free(name) or labels.is_caption_data(name):
        return None, None
    builder = Digits if name == "digits" else None
    try:
        builder = (builder or tfds.builder_cls(name))(data_dir=data.data_dir or None)
    except (tfds.core.registered.DatasetNotFoundError, OSError, ValueError):
        return None, None
    features = builder.info.features
    label = features["label"] if features and "label" in features else None
    classes = getattr(label, "num_classes", None)
    split = data.train_split.split("[", 1)[0]
    splits = builder.info.splits
    if split in splits:
        return classes, splits[data.train_split].num_examples or None
    whole = SPLIT_SIZES.get((builder.name, split))
    return classes, whole if whole and split == data.train_split else None


# Split sizes tfds knows only once a data set is prepared (its catalog page gives them; the
# offline digits: scikit-learn's 1,797 less the test split).
SPLIT_SIZES = {
    ("imagenet2012", "train"): 1_281_167,
    ("imagenet2012", "validation"): 50_000,
    ("digits", "train"): 1_797 - NUM_TEST,
    ("digits", "test"): NUM_TEST,
}


def _prepared(builder: tfds.core.DatasetBuilder, **kwargs) -> tfds.core.DatasetBuilder:
    """`builder`, prepared first if needed; safe when several processes call it at once."""
    if builder.is_prepared():
        return builder
    root = os.fspath(builder.data_dir_root)
    os.makedirs(root, exist_ok=True)
    with _file_lock(os.path.join(root, f".{builder.name}.prepare.lock")):
        builder = type(builder)(data_dir=root, config=builder.builder_config)
        if not builder.is_prepared():  # Another process may have done it while we waited.
            log.info("Preparing %s in %s (once).", builder.name, root)
            builder.download_and_prepare(**kwargs)
    return type(builder)(data_dir=root, config=builder.builder_config)


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """Silences what tfds prints while it prepares a data set (stdout, tqdm bars, absl logs)."""
    bars = tfds.core.utils.tqdm_utils
    shown, absl_logger = getattr(bars, "_active", True), logging.getLogger("absl")
    level = absl_logger.level
    bars.display_progress_bar(False)
    absl_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        bars.display_progress_bar(shown)
        absl_logger.setLevel(level)


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
