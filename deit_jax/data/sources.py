"""Where examples come from: tfds builders, a folder of images, and the offline digits set.

`deit_jax.data.catalog.get_source(config.data)` turns `config.data.name` into a `Source`:

- any tfds builder name (`cifar10`, `cifar100`, `imagenet2012`, ...), read from
  `config.data.data_dir`; it must have been prepared there (`tfds build`), except ImageNet, which
  is prepared on first use when `config.data.manual_dir` holds its archives;
- `digits`: scikit-learn's 8x8 digits (`deit_jax.data.digits`), prepared on first use;
- `folder:/root`: images read in place from `root/<split>/<class>/*.{jpg,jpeg,png}`. Class names
  are the sorted union of the class folders of all splits (as `tfds.ImageFolder` does). Images
  that do not decode are skipped, counted in the log; the check decodes every image once and is
  remembered in `<data_dir>/deit_jax_folder_checks/` until the folder changes.
- `images:/root`: label-free, every image anywhere under `root` (any layout, searched
  recursively, hidden folders skipped), as one split `train` in sorted path order; labels are
  -1. Checked like a folder. Such data trains by distillation only (`deit_jax.data.labels`).
- `captions:/root`: images with caption files, for CLIP students (`deit_jax.data.captions`).

A `Source` reads one process's contiguous share of a split (`read`) as cheap records (a
serialized tfds example, or a file path) with an `id`, and `load` turns a record into
`{"image": encoded tf.string, "label": int32}`. The pipeline shuffles and skips records before
loading them; images stay encoded so that JPEGs can be decoded only inside their random crop
(`deit_jax.data.augment`). Decoding gives RGB whatever the
source's channels (grey digits included). `id` is the example's position in its split (tfds
order, or sorted file order), the same whatever the number of processes or the shuffling.

Split names accept tfds slicing (`train[:99%]`, `validation[:1000]`) for every source.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os

import numpy as np

from deit_jax._compat import import_tensorflow

tf = import_tensorflow()
import tensorflow_datasets as tfds  # noqa: E402  (after TensorFlow, see deit_jax/_compat.py)

from deit_jax.data import labels  # noqa: E402
from deit_jax.errors import DataError, DataNotFoundError  # noqa: E402

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SeedArg = int | tf.Tensor | None


class Source:
    """A classification data set, read as records and loaded as encoded images with labels."""

    name: str
    num_classes: int
    # The label names in label order (None: the data set has none, e.g. label-free images);
    # exported with the model.
    class_names: list[str] | None = None
    labelled: bool = True  # False: every label is -1 (`images:` data)
    # True when `read(shuffle_seed=...)` already gives a uniform permutation (no buffer needed).
    exact_shuffle: bool = False
    # True when `load` also returns `real`: (num_classes,) bool, the image's set of reassessed
    # labels (ImageNet-ReaL; all False when it has none).
    real_labels: bool = False
    # True when the examples have captions (`captions:` data, deit_jax.data.captions).
    captioned: bool = False

    def split_sizes(self) -> dict[str, int]:
        """Number of examples of each named split."""
        raise NotImplementedError

    def num_examples(self, split: str) -> int:
        _, start, stop = self._resolve(split)
        return stop - start

    def split_name(self, split: str) -> str:
        """The named split a split spec reads (`train[:90%]` -> `train`), whose positions its
        examples' ids are."""
        return self._resolve(split)[0]

    def shard_range(self, split: str, index: int, count: int) -> tuple[int, int]:
        """Positions [start, stop) in `split`'s own numbering of shard `index` of `count`.

        Contiguous, even shares (sizes differ by at most one), like `tfds.even_splits`.
        """
        n = self.num_examples(split)
        return n * index // count, n * (index + 1) // count

    def read(
        self, split: str, index: int = 0, count: int = 1, *, shuffle_seed: SeedArg = None
    ) -> tf.data.Dataset:
        """Records of shard `index` of `count` of `split`: dicts with `id` (int32) and more.

        Without `shuffle_seed` every record comes once, in a fixed order; with it (an int or an
        int64 scalar tensor, so that it can vary per epoch inside a tf.data graph) the order is
        shuffled (over files for tfds, fully for folders), the same for the same seed.
        """
        name, start, _ = self._resolve(split)
        a, b = self.shard_range(split, index, count)
        return self._read(name, start + a, start + b, shuffle_seed)

    def load(self, record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """`{"image": encoded image (tf.string), "label": int32}` of a record from `read`."""
        raise NotImplementedError

    def labels(self, split: str) -> np.ndarray:
        """Every label of `split` (int32), by a pass over its records (images not decoded)."""

        @tf.autograph.experimental.do_not_convert
        def label(record):
            return self.load(record)["label"]

        ds = self.read(split).map(label, num_parallel_calls=tf.data.AUTOTUNE)
        return np.concatenate([np.zeros(0, np.int32), *ds.batch(8192).as_numpy_iterator()])

    def _read(self, split: str, start: int, stop: int, seed: SeedArg) -> tf.data.Dataset:
        raise NotImplementedError

    def split_names(self) -> list[str]:
        """The names of the splits, without counting their examples."""
        return list(self.split_sizes())

    def location(self) -> str:
        """Where the data set is read from (named in errors)."""
        raise NotImplementedError

    def _split_size(self, name: str) -> int:
        return self.split_sizes()[name]

    def _resolve(self, split: str) -> tuple[str, int, int]:
        """(split name, start, stop) of a split spec such as `train[:10%]`."""
        names = self.split_names()
        name = split.split("[", 1)[0].strip()
        where = f"data set {self.name!r} in {self.location()}"
        if "+" in split:
            raise DataError(f"Split {split!r}: unions of splits are not supported; use one split.")
        if name not in names:
            raise DataError(
                f"Split {split!r} does not exist in {where} (splits: {sorted(names)}). Set "
                "config.data.train_split / config.data.eval_split to one of its splits, "
                "optionally sliced like 'train[:90%]'."
            )
        size = self._split_size(name)
        info = {name: tfds.core.SplitInfo(name=name, shard_lengths=[size], num_bytes=0)}
        try:
            (part,) = tfds.core.ReadInstruction.from_spec(split).to_absolute(info)
        except (ValueError, AssertionError) as e:
            raise DataError(
                f"Bad split {split!r} for {where} (splits: {sorted(names)}): {e} Set "
                "config.data.train_split / config.data.eval_split to one of its splits, "
                "optionally sliced like 'train[:90%]'."
            ) from e
        # Open ends come back as None.
        start = 0 if part.from_ is None else part.from_
        stop = size if part.to is None else part.to
        if stop <= start:
            raise DataError(
                f"Split {split!r} of {where} selects no examples (split {name!r} has {size}); "
                "widen the slice in config.data.train_split / config.data.eval_split."
            )
        return name, start, stop


class TfdsSource(Source):
    """A prepared tfds builder with an image feature and a class label (`supervised_keys`)."""

    def __init__(self, builder: tfds.core.DatasetBuilder):
        self.builder = builder
        info = builder.info
        self.name = info.name
        self.image_key, self.label_key = info.supervised_keys or ("image", "label")
        features = info.features
        keys = features.keys()
        # ImageNet-ReaL's supervised label is its set of real labels; the class label is the
        # original one, and the set is returned beside it.
        self.real_labels = "real_label" in keys and "original_label" in keys
        if self.real_labels:
            self.image_key, self.label_key = "image", "original_label"
        if not (
            self.image_key in keys
            and self.label_key in keys
            and isinstance(features[self.image_key], tfds.features.Image)
            and isinstance(features[self.label_key], tfds.features.ClassLabel)
        ):
            raise DataError(
                f"Data set {self.name!r} is not an image classification data set: deit_jax needs "
                f"an Image feature and a ClassLabel feature, got {features}."
            )
        self.num_classes = features[self.label_key].num_classes
        self.class_names = list(features[self.label_key].names)
        if info.file_format not in (None, tfds.core.FileFormat.TFRECORD):
            raise DataError(
                f"Data set {self.name!r} is stored as {info.file_format.value}; deit_jax reads "
                "tfds data sets prepared as TFRecord files (tfds's default). Prepare it again "
                "with `tfds build ... --file_format=tfrecord`."
            )

    def split_sizes(self) -> dict[str, int]:
        return {k: v.num_examples for k, v in self.builder.info.splits.items()}

    def location(self) -> str:
        return os.fspath(self.builder.data_dir)

    def _read(self, split: str, start: int, stop: int, seed: SeedArg) -> tf.data.Dataset:
        # tfds's own reader takes its file-shuffling seed as a Python int; reading the files
        # named by its file instructions lets the seed be a tensor (one per epoch, in-graph).
        info = self.builder.info.splits[split]
        offsets = dict(
            zip(
                (os.path.basename(os.fspath(p)) for p in info.filepaths),
                np.cumsum([0, *info.shard_lengths[:-1]]).tolist(),
                strict=True,
            )
        )
        pieces = self.builder.info.splits[f"{split}[{start}:{stop}]"].file_instructions
        files = tf.data.Dataset.from_tensor_slices(
            {
                "path": [os.fspath(p.filename) for p in pieces],
                "skip": np.array([p.skip for p in pieces], np.int64),
                "take": np.array([p.take for p in pieces], np.int64),
                # id of a piece's first record: the examples in earlier files, plus its skip.
                "first": np.array(
                    [offsets[os.path.basename(os.fspath(p.filename))] + p.skip for p in pieces],
                    np.int64,
                ),
            }
        )
        if seed is not None:
            files = files.shuffle(len(pieces), seed=seed)

        def records(piece):
            ds = tf.data.TFRecordDataset(piece["path"], buffer_size=8 << 20)
            ds = ds.skip(piece["skip"]).take(piece["take"])
            ids = tf.data.Dataset.range(piece["first"], piece["first"] + piece["take"])
            return tf.data.Dataset.zip(ids, ds).map(
                lambda i, r: {"id": tf.cast(i, tf.int32), "record": r}
            )

        return files.interleave(
            records,
            cycle_length=1 if seed is None else min(16, len(pieces)),
            block_length=16,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )

    def load(self, record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        ex = self.builder.info.features.deserialize_example(
            record["record"], decoders={self.image_key: tfds.decode.SkipDecoding()}
        )
        out = {"image": ex[self.image_key], "label": tf.cast(ex[self.label_key], tf.int32)}
        if self.real_labels:
            hot = tf.one_hot(tf.cast(ex["real_label"], tf.int32), self.num_classes)
            out["real"] = tf.reduce_sum(hot, axis=0) > 0  # (num_classes,), none for no labels
        return out


class FolderSource(Source):
    """Images in `root/<split>/<class>/*.{jpg,jpeg,png}`, read in place."""

    exact_shuffle = True
    PREFIX = "folder:"
    MISSING = (
        "Image folder {root} does not exist. A folder data set is laid out as "
        "<root>/<split>/<class>/<image>.jpg|png (e.g. root/train/cat/1.jpg); set "
        "config.data.name = 'folder:<root>'."
    )

    def __init__(self, root: str, cache_dir: str):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.name = self.PREFIX + self.root
        if not os.path.isdir(self.root):
            raise DataNotFoundError(self.MISSING.format(root=self.root))
        splits, self.class_names = self._layout()
        self.num_classes = len(self.class_names or ())
        self._cache_dir = cache_dir
        self._splits = {s: None for s in splits}  # Listed and checked on first use.
        self.num_corrupt: dict[str, int] = {}

    def _layout(self) -> tuple[list[str], list[str] | None]:
        """The split names and the class names (the class folders of every split, sorted)."""
        splits = sorted(d for d in os.listdir(self.root) if _isdir(self.root, d))
        class_names = sorted(
            {
                c
                for s in splits
                for c in os.listdir(os.path.join(self.root, s))
                if _isdir(self.root, s, c)
            }
        )
        if not class_names:
            raise DataNotFoundError(
                f"Image folder {self.root} has no <split>/<class>/ subfolders; expected "
                "<root>/<split>/<class>/<image>.jpg|png."
            )
        return splits, class_names

    def split_sizes(self) -> dict[str, int]:
        return {s: len(self._examples(s)[0]) for s in self._splits}

    def split_names(self) -> list[str]:
        return list(self._splits)

    def location(self) -> str:
        return self.root

    def _split_size(self, name: str) -> int:
        return len(self._examples(name)[0])

    def _listing(self, split: str) -> tuple[list[str], list[int]]:
        """(paths, labels) of every image file of `split`, in sorted (class, file) order."""
        paths, labels, empty = [], [], []
        for label, c in enumerate(self.class_names):
            d = os.path.join(self.root, split, c)
            if os.path.isdir(d):
                files = sorted(f for f in os.listdir(d) if f.lower().endswith(IMAGE_EXTENSIONS))
                paths += [os.path.join(d, f) for f in files]
                labels += [label] * len(files)
                empty += [] if files else [d]
        if empty:
            raise DataError(
                f"Split {split!r} of {self.name!r}: class folder {empty[0]} has no "
                f"{'/'.join(IMAGE_EXTENSIONS)} images"
                + (f" (nor {len(empty) - 1} more)" if len(empty) > 1 else "")
                + "; add its images or remove the folder."
            )
        return paths, labels

    def _examples(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(paths, labels) of the decodable images of `split`, in sorted (class, file) order."""
        if self._splits[split] is None:
            paths, labels = self._listing(split)
            bad = self._corrupt(split, paths)
            if paths and len(bad) == len(paths):
                raise DataError(
                    f"Split {split!r} of {self.name!r}: none of its {len(paths)} images in "
                    f"{os.path.join(self.root, split)} decode (e.g. {paths[0]}); they are not "
                    "JPEG/PNG files or are corrupt. Replace them with readable images."
                )
            if not paths:
                raise DataError(
                    f"Split {split!r} of {self.name!r} has no images in "
                    f"{os.path.join(self.root, split)}; expected <root>/<split>/<class>/*.jpg|png."
                )
            self.num_corrupt[split] = len(bad)
            if bad:
                log.warning(
                    "%s: skipped %d of %d images of split %r that do not decode, e.g. %s",
                    self.name,
                    len(bad),
                    len(paths),
                    split,
                    paths[bad[0]],
                )
            keep = np.ones(len(paths), bool)
            keep[bad] = False
            self._splits[split] = (
                np.array(paths, dtype=object)[keep],
                np.array(labels, np.int32)[keep],
            )
        return self._splits[split]

    def _corrupt(self, split: str, paths: list[str]) -> list[int]:
        """Indices of `paths` that TensorFlow cannot decode; remembered until files change."""
        h = hashlib.sha256()
        for p in paths:
            st = os.stat(p)
            h.update(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        fingerprint = h.hexdigest()
        key = hashlib.sha256(f"{self.root}\n{split}".encode()).hexdigest()[:24]
        cache = os.path.join(self._cache_dir, "deit_jax_folder_checks", f"{key}.json")
        with contextlib.suppress(OSError, ValueError):
            with open(cache) as f:
                saved = json.load(f)
            if saved["fingerprint"] == fingerprint:
                return saved["corrupt"]
        log.info("%s: checking that the %d images of %r decode", self.name, len(paths), split)
        bad = _undecodable(paths)
        try:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            tmp = f"{cache}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(
                    {"root": self.root, "split": split, "fingerprint": fingerprint, "corrupt": bad},
                    f,
                )
            os.replace(tmp, cache)
        except OSError as e:  # A read-only data_dir only costs a re-check next time.
            log.warning("Could not remember the image check in %s: %s", cache, e)
        return bad

    def labels(self, split: str) -> np.ndarray:
        name, start, stop = self._resolve(split)
        return self._examples(name)[1][start:stop]

    def _read(self, split: str, start: int, stop: int, seed: SeedArg) -> tf.data.Dataset:
        paths, labels = self._examples(split)
        with tf.init_scope():  # Built eagerly: inside a tf.data function the list of paths
            ds = tf.data.Dataset.from_tensor_slices(  # would become a constant of its graph.
                {
                    "path": list(paths[start:stop]),
                    "label": labels[start:stop],
                    "id": np.arange(start, stop, dtype=np.int32),
                }
            )
        if seed is not None:
            ds = ds.shuffle(stop - start, seed=seed)
        return ds

    def load(self, record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {"image": tf.io.read_file(record["path"]), "label": record["label"]}


class ImagesSource(FolderSource):
    """Every image under `root` (any layout, recursive), without labels: one split, `train`."""

    SPLIT = "train"
    PREFIX = labels.LABEL_FREE_PREFIX
    MISSING = (
        "Image folder {root} does not exist; set config.data.name = "
        "'images:<root>' to a folder holding .jpg/.jpeg/.png images (any layout)."
    )
    labelled = False  # the class count is the teacher's (teacher.class_names)

    def _layout(self) -> tuple[list[str], list[str] | None]:
        return [self.SPLIT], None

    def _listing(self, split: str) -> tuple[list[str], list[int]]:
        paths = []
        for root, dirs, files in os.walk(self.root, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            paths += [
                os.path.join(root, f)
                for f in files
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
            ]
        if not paths:
            raise DataError(
                f"{self.name!r} holds no {'/'.join(IMAGE_EXTENSIONS)} images (searched every "
                "folder under it); point data.name at a folder of images."
            )
        paths.sort()
        return paths, [-1] * len(paths)


def _deterministic_options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    return options


def _decode_file(encoded: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _undecodable(paths: list[str]) -> list[int]:
    """Indices of the files TensorFlow cannot decode, found by decoding them all in parallel."""
    index = tf.data.Dataset.range(len(paths))
    files = tf.data.Dataset.from_tensor_slices(list(paths) or [""]).take(len(paths))
    ds = tf.data.Dataset.zip(index, files).map(
        lambda i, p: (i, tf.shape(_decode_file(tf.io.read_file(p)))[0]),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False,
    )
    ok = np.zeros(len(paths), bool)
    for i, _ in ds.ignore_errors().batch(1024).as_numpy_iterator():
        ok[i] = True
    return np.flatnonzero(~ok).tolist()


def _isdir(*parts: str) -> bool:
    return os.path.isdir(os.path.join(*parts))
