"""What the train and eval pipelines share: the data set's facts (`dataset_info`), where its
examples come from (one `Source` per data set and process) and `Feeder`, which turns this
process's share of a batch into global arrays.

Each process reads its own contiguous share of a split (`Source.read`) and builds its part of
every global batch; `jax.make_array_from_process_local_data` assembles the parts into one array
sharded over the mesh's data axes, and a background thread keeps `config.data.prefetch` batches
already on the devices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deit_jax._compat import import_tensorflow
from deit_jax.data import augment, captions, catalog, hosts, labels, sources
from deit_jax.errors import DataError

tf = import_tensorflow()

# A caption data set's tokenizers, by the batch key their ids go to ("text", "teacher_text").
Tokenizers = dict[str, Callable[[list[str]], np.ndarray]]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model and the schedule need to know of the data (split sizes over all hosts)."""

    num_classes: int
    num_train: int | None  # None in `mode=eval`: nothing trains, the split need not exist
    num_eval: int
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...] | None = None  # the data set's own label names, if any
    labelled: bool = True  # False for label-free `images:` data (labels -1)


def dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
    """Classes, split sizes and model input shape of `config.data`; in `mode=eval` the training
    split is not looked at (a data set may hold only the splits it is evaluated on)."""
    source = source_of(config.data)
    size = augment.height_width(config.data.img_size)
    training = config.get("mode", "train") != "eval"
    return DatasetInfo(
        num_classes=num_classes(config, source),
        num_train=source.num_examples(config.data.train_split) if training else None,
        num_eval=source.num_examples(config.data.eval_split),
        image_shape=(*size, 3),
        class_names=None if source.class_names is None else tuple(source.class_names),
        labelled=source.labelled,
    )


def planned_info(config: ml_collections.ConfigDict, num_train: int = 0) -> DatasetInfo:
    """What a plan knows of `config.data` without reading a file of it (`mode=plan`): the class
    count (`model.num_classes`, else the data set's own where its name tells it,
    `catalog.known_without_files`; the teacher's class names for label-free data; none for
    image-caption pairs) and the train split's size (`num_train`, else the data set's where
    known, else None). Raises a DataError naming the key to set when the classes are unknown."""
    name = config.data.name
    size = augment.height_width(config.data.img_size)
    known_classes, known_train = catalog.known_without_files(config.data)
    classes = config.model.get("num_classes")
    if labels.is_caption_data(name):
        classes = 0
    elif labels.is_label_free(name):
        classes = len(labels.parse_class_names(config.teacher.class_names))
    classes = known_classes if classes is None else classes
    if classes is None:
        raise DataError(
            f"A plan of {name!r} does not read the data: give its class count with "
            "--config.model.num_classes=N."
        )
    return DatasetInfo(
        num_classes=classes,
        num_train=num_train or known_train,
        num_eval=0,
        image_shape=(*size, 3),
        labelled=not (labels.is_label_free(name) or labels.is_caption_data(name)),
    )


def num_classes(config: ml_collections.ConfigDict, source: sources.Source) -> int:
    """The data's class count; for label-free data, that of `config.teacher.class_names`; none
    for image-caption pairs (a CLIP student has no classes)."""
    if source.captioned:
        return 0
    if source.labelled:
        return source.num_classes
    names = labels.parse_class_names(config.teacher.class_names)
    if not names:
        raise DataError(
            f"{source.name!r} has no labels, so no classes: give the teacher's class names with "
            "--config.teacher.class_names='a,b,...' (or a file, one name per line)."
        )
    return len(names)


class Feeder:
    """What the train and eval pipelines share: source, sharding, this process's share."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        mesh: Mesh,
        data_axes: tuple[str, ...],
        batch: int,
        split: str,
        tokenizers: Tokenizers | None,
    ):
        self.config = config
        self.source = source_of(config.data)
        self.num_classes = num_classes(config, self.source)
        self.size = augment.height_width(config.data.img_size)
        self.global_batch = batch
        unknown = [a for a in data_axes if a not in mesh.axis_names]
        if unknown:
            raise ValueError(f"data_axes {unknown} are not axes of the mesh {mesh.axis_names}.")
        self.sharding = NamedSharding(mesh, PartitionSpec(data_axes))
        self.share, self.num_shares = hosts.process_share(self.sharding, batch, data_axes)
        self.local_batch = batch // self.num_shares
        self._texts = self._caption_tables(split, tokenizers)

    def _caption_tables(self, split: str, tokenizers: Tokenizers | None) -> dict[str, tuple]:
        """Per tokenizer key, `(tokens, first, count)` of every caption of `split` (tf
        constants, built eagerly: deit_jax.data.captions.token_table)."""
        if not self.source.captioned:
            return {}
        if not tokenizers:
            raise ValueError(f"{self.source.name!r} holds captions: pass their tokenizers.")
        texts = self.source.captions(self.source.split_name(split))
        with tf.init_scope():
            return {
                key: tuple(tf.constant(a) for a in captions.token_table(texts, tokenize))
                for key, tokenize in tokenizers.items()
            }

    def _caption_ids(self, example: tf.Tensor, seed: tf.Tensor | None) -> dict[str, tf.Tensor]:
        """The ids of one of `example`'s captions under each tokenizer: drawn from `seed`
        (uniformly among its captions), or its first without a seed (evaluation)."""
        out = {}
        for key, (tokens, first, count) in self._texts.items():
            row = tf.gather(first, example)
            if seed is not None:
                n = tf.gather(count, example)
                row += tf.random.stateless_uniform([], seed, 0, n, dtype=tf.int32)
            out[key] = tf.gather(tokens, row)
        return out

    def _to_global(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {
            k: jax.make_array_from_process_local_data(
                self.sharding, v, (self.global_batch, *v.shape[1:])
            )
            for k, v in local.items()
        }


def source_of(data: ml_collections.ConfigDict) -> sources.Source:
    """The source of `config.data` (`deit_jax.data.catalog.get_source`), one per process."""
    return _cached_source(data.name, data.data_dir, data.manual_dir)


_SOURCES: dict[tuple[str, str, str], sources.Source] = {}


def _cached_source(name: str, data_dir: str, manual_dir: str) -> sources.Source:
    # One listing (and corrupt-image check) of a folder per process, not one per pipeline.
    key = (name, data_dir, manual_dir)
    if key not in _SOURCES:
        cfg = ml_collections.ConfigDict(
            {"name": name, "data_dir": data_dir, "manual_dir": manual_dir}
        )
        _SOURCES[key] = catalog.get_source(cfg)
    return _SOURCES[key]


def as_axes(data_axes: str | Sequence[str]) -> tuple[str, ...]:
    return (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)


def tf_options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    # No autotuning model thread: deleting an iterator waits for that thread's sleep, which grows
    # to a minute in long runs (25-34 s idle at the end of each quickstart stage, measured).
    # AUTOTUNE arguments then take tf.data's static defaults instead of tuned values.
    options.autotune.enabled = False
    return options
