"""Input pipelines: tf.data on each host, global `jax.Array`s on the mesh.

Each process reads its own contiguous share of a split (`Source.read`) and builds its part of
every global batch; `jax.make_array_from_process_local_data` assembles the parts into one array
sharded over the mesh's data axes, and a background thread keeps `config.data.prefetch` batches
already on the devices.

Training. An epoch is `num_train // batch_size` steps, so every epoch has the length of the data
set. With repeated augmentation (`config.data.repeated_aug` = R > 1, timm/DeiT's `RASampler`)
each epoch takes the first ~1/R of a fresh shuffle of the data and yields every one of those
images R times in a row, each time under a different augmentation. (The reference deals the R
copies to R different GPUs of the same step; here they sit in the same process's part of the same
step's batch: the global batch holds the same images either way.) A tfds source is shuffled over
its files, then through a `config.data.shuffle_buffer` of records; a folder, fully; with
`config.data.cache`, each process's records stay in memory and are fully shuffled. Every random
choice is seeded
from `config.seed`: the shuffles from (seed, epoch, share), each example's augmentation
from (seed, epoch, share, position in the epoch) and each batch's mixup/cutmix from (seed,
epoch, share, step), with stateless ops. A run's stream is therefore fixed by the seed (and the
number of shares), and `TrainIterator.get_state()` (epoch, step) is all it takes to resume it: the
restarted pipeline skips the epoch's first examples before decoding them.

Shares. By default each process is one share of the training data, so the stream depends on the
number of processes. `config.data.num_shares = S` (a multiple of the process count) fixes it:
the data is read as S shares, each process feeds S / P of them (their batch parts side by side,
mixup within each part), and the global batches are the same whether 1 or S processes feed them.
A run then gives the same results on any number of hosts, and resumes on another one unchanged.

Captions. With image-caption data (`captions:`, deit_jax/data/captions.py) every caption is
tokenized once, on the host, by the tokenizers the run passes; each example's caption at an
epoch is drawn from (seed, epoch, example id), the same whatever the shares; the pairs are not
mixed.

Evaluation. Each pass reads the eval split once. Every process runs the same number of steps;
the batches past the end of a process's share are padded with `mask == False`, so summing
`metric * mask` counts every example exactly once.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deit_jax._compat import import_tensorflow
from deit_jax.data import (
    augment,
    captions,
    class_subsets,
    eval_sets,
    hosts,
    labels,
    mixup,
    sources,
)
from deit_jax.errors import DataError

tf = import_tensorflow()

# Tags that keep the streams derived from one seed apart.
_SHUFFLE_FILES, _SHUFFLE_BUFFER, _AUGMENT, _MIXUP, _CAPTION = range(5)
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
    source = _source(config.data)
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


def build_train(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    data_axes: Sequence[str] = ("data",),
    *,
    with_ids: bool = False,
    tokenizers: Tokenizers | None = None,
) -> TrainIterator:
    """Endless training batches of `config.batch_size`, sharded over `data_axes` of `mesh`.

    `with_ids` adds `id`, each example's position in the train split (for tests and debugging).
    Caption data (`captions:`) needs `tokenizers`: each key gets the drawn caption's ids.
    """
    return TrainIterator(config, mesh, _axes(data_axes), with_ids=with_ids, tokenizers=tokenizers)


def build_eval(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    data_axes: Sequence[str] = ("data",),
    *,
    with_ids: bool = False,
    tokenizers: Tokenizers | None = None,
) -> EvalIterable:
    """Passes over the eval split in batches of `config.eval_batch_size`, padded and masked.

    `with_ids` adds `id`, each example's position in the eval split (-1 on padding). Caption
    data needs `tokenizers`: each key gets the ids of each image's first caption.
    """
    return EvalIterable(config, mesh, _axes(data_axes), with_ids=with_ids, tokenizers=tokenizers)


class _Feeder:
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
        self.source = _source(config.data)
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


class TrainIterator(_Feeder):
    """Endless `{"image", "target", "label"}` batches; resumable with get_state / set_state.

    image: float32 (B, H, W, 3), augmented and normalised; target: float32 (B, num_classes),
    mixup/cutmix and label smoothing folded in; label: int32 (B,), the unmixed class. Caption
    data instead: no target, and per tokenizer key (`text`, ...) the (B, context) int32 ids of
    the caption drawn for each image at this epoch.
    """

    def __init__(self, config, mesh, data_axes, *, with_ids: bool = False, tokenizers=None):
        data = config.data
        super().__init__(config, mesh, data_axes, config.batch_size, data.train_split, tokenizers)
        self.num_examples = self.source.num_examples(data.train_split)
        self.steps_per_epoch = self.num_examples // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(
                f"batch_size {self.global_batch} is larger than the {self.num_examples} examples "
                f"of {self.source.name} {data.train_split!r}; lower config.batch_size."
            )
        if data.repeated_aug < 1:
            raise ValueError(f"config.data.repeated_aug must be >= 1, got {data.repeated_aug}.")
        self.data_shares, self.num_data_shares = hosts.data_shares(
            data.num_shares, self.share, self.num_shares, self.global_batch
        )
        self.share_batch = self.global_batch // self.num_data_shares
        self.with_ids = with_ids
        # `extras(epoch, step)` -> more arrays of this process's rows of that batch (the teacher
        # cache's outputs); set before iterating.
        self.extras: Callable[[int, int], dict[str, np.ndarray]] | None = None
        self._epoch, self._step = 0, 0
        self._prefetcher: hosts.Prefetcher | None = None
        self._cached: dict[int, tf.data.Dataset] = {}
        logging.info(
            "Train: %s %r, %d examples, %d steps/epoch, data shares %s of %d (%d per batch).",
            self.source.name, data.train_split, self.num_examples, self.steps_per_epoch,
            list(self.data_shares), self.num_data_shares, self.local_batch,
        )  # fmt: skip

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        if self._prefetcher is None:
            self._prefetcher = hosts.Prefetcher(self._global_batches(), self.config.data.prefetch)
        batch = self._prefetcher.get()
        self._step += 1
        if self._step == self.steps_per_epoch:
            self._epoch, self._step = self._epoch + 1, 0
        return batch

    def _global_batches(self) -> Iterator[dict[str, jax.Array]]:
        """The batches from the current position on, with `extras` joined (in the prefetch
        thread, so that what they read is ready with the batch)."""
        epoch, step = self._epoch, self._step
        for local in self.dataset(epoch, step).as_numpy_iterator():
            if self.extras is not None:
                local.update(self.extras(epoch, step))
            yield self._to_global(local)
            step += 1
            if step == self.steps_per_epoch:
                epoch, step = epoch + 1, 0

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self._epoch

    def get_state(self) -> dict[str, int]:
        """Position of the next batch, as a JSON-able dict."""
        return {
            "epoch": self._epoch,
            "step": self._step,
            "seed": self.config.seed,
            "batch_size": self.global_batch,
            "num_shares": self.num_data_shares,
        }

    def set_state(self, state: dict[str, int]) -> None:
        """Continues from `state` (from `get_state`): the next batch is the one it points at."""
        epoch, step = int(state["epoch"]), int(state["step"])
        layout = (self.config.seed, self.global_batch, self.num_data_shares)
        saved = (state.get("seed"), state.get("batch_size"), state.get("num_shares"))
        if saved != layout:
            logging.warning(
                "The data state was saved with (seed, batch size, process shares) %s, this run "
                "has %s: training goes on from the same epoch and example count, but not with "
                "the batches the saved run would have seen.", saved, layout,
            )  # fmt: skip
            if state.get("batch_size"):
                step = step * int(state["batch_size"]) // self.global_batch
                step = min(step, self.steps_per_epoch - 1)
        if not 0 <= step < self.steps_per_epoch or epoch < 0:
            raise ValueError(
                f"Data state {state} is out of range: an epoch has {self.steps_per_epoch} steps."
            )
        self.close()
        self._epoch, self._step = epoch, step

    def close(self) -> None:
        """Stops the background thread (iterating again restarts it where it stopped)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def __enter__(self) -> TrainIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def dataset(self, start_epoch: int = 0, start_step: int = 0) -> tf.data.Dataset:
        """This process's endless batches (numpy-ready), from `start_step` of `start_epoch` on.

        One tf.data graph for the whole run, the epoch a tensor inside it: no per-epoch
        rebuilding (and re-tracing of RandAugment).
        """
        parts = [self._share_batches(s, start_epoch, start_step) for s in self.data_shares]
        ds = parts[0]
        if len(parts) > 1:  # The process's shares side by side, in share order.
            ds = tf.data.Dataset.zip(tuple(parts)).map(
                lambda *bs: {k: tf.concat([b[k] for b in bs], 0) for k in bs[0]}
            )
        return ds.with_options(_options()).prefetch(tf.data.AUTOTUNE)

    def _share_batches(self, share: int, start_epoch: int, start_step: int) -> tf.data.Dataset:
        """Share `share`'s endless parts of the batches (`share_batch` rows each)."""
        data, local_batch = self.config.data, self.share_batch
        per_epoch = self.steps_per_epoch * local_batch
        repeats, start = data.repeated_aug, start_step * local_batch
        seeds = {tag: _tf_seed(self.config.seed, tag, share) for tag in range(4)}
        # Not per share: an example's caption is the same however the data is shared out.
        caption_seed = _tf_seed(self.config.seed, _CAPTION)

        def epoch_records(epoch):
            ds = self._shuffled(
                share, _fold(seeds[_SHUFFLE_FILES], epoch), _fold(seeds[_SHUFFLE_BUFFER], epoch)
            )
            if repeats > 1:
                # RASampler: the first ~1/R of the epoch's shuffle, each record R times in a row.
                ds = ds.take(math.ceil(per_epoch / repeats))
                ds = ds.flat_map(lambda r: tf.data.Dataset.from_tensors(r).repeat(repeats))
            # Resuming drops what was already seen before loading or decoding it. Positions
            # count from the epoch's start, so a resumed run augments as the full run did.
            ds = ds.take(per_epoch).enumerate()
            ds = ds.skip(tf.where(epoch == start_epoch, tf.constant(start, tf.int64), 0))
            return ds.map(lambda position, record: (epoch, position, record))

        augment_fn, mix_fn = self._augment_fn(), self._mix_fn()

        def preprocess(epoch, position, record):
            ex = self.source.load(record)
            seed = _fold(_fold(seeds[_AUGMENT], epoch), position)
            out = {"image": augment_fn(ex["image"], seed), "label": ex["label"]}
            out["epoch"], out["step"] = epoch, position // local_batch
            if self._texts:
                example = record["id"]
                out |= self._caption_ids(example, _fold(_fold(caption_seed, epoch), example))
            if self.with_ids:
                out["id"] = record["id"]
            return out

        def mix(batch):
            seed = _fold(_fold(seeds[_MIXUP], batch.pop("epoch")[0]), batch.pop("step")[0])
            if not self._texts:  # image-caption pairs are not mixed (and have no classes)
                batch["image"], batch["target"] = mix_fn(batch["image"], batch["label"], seed)
            return batch

        ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_records)
        ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(local_batch, drop_remainder=True)  # Never across epochs: per_epoch fits.
        return ds.map(mix, num_parallel_calls=tf.data.AUTOTUNE)

    def _shuffled(
        self, share: int, files_seed: tf.Tensor, buffer_seed: tf.Tensor
    ) -> tf.data.Dataset:
        """Share `share` of the train split as records, in an order fixed by the seeds."""
        data, split, count = self.config.data, self.config.data.train_split, self.num_data_shares
        if data.cache:
            # Read once, keep the share's records in memory, shuffle all of them every epoch.
            with tf.init_scope():
                if share not in self._cached:
                    self._cached[share] = self.source.read(split, share, count).cache()
            start, stop = self.source.shard_range(split, share, count)
            return self._cached[share].shuffle(stop - start, seed=_int64(buffer_seed))
        ds = self.source.read(split, share, count, shuffle_seed=_int64(files_seed))
        if not self.source.exact_shuffle:
            ds = ds.shuffle(data.shuffle_buffer, seed=_int64(buffer_seed))
        return ds

    def _augment_fn(self):
        return _train_preprocess_fn(self.size, _frozen(self.config.augment))

    def _mix_fn(self):
        shape = (self.share_batch, *self.size)
        return _mixup_fn(shape, self.num_classes, _frozen(self.config.mixup))


@functools.cache
def _train_preprocess_fn(
    size: tuple[int, int], config: tuple
) -> tf.types.experimental.GenericFunction:
    # One trace per process and configuration: tracing RandAugment takes seconds.
    cfg = ml_collections.ConfigDict(dict(config))
    return tf.function(
        lambda image, seed: augment.train_preprocess(image, seed, size=size, config=cfg),
        input_signature=[tf.TensorSpec([], tf.string), tf.TensorSpec([2], tf.int32)],
    )


@functools.cache
def _mixup_fn(shape: tuple[int, int, int], num_classes: int, config: tuple):
    cfg = ml_collections.ConfigDict(dict(config))
    return tf.function(
        lambda images, labels, seed: mixup.mixup_cutmix(
            images, labels, seed, num_classes=num_classes, config=cfg
        ),
        input_signature=[
            tf.TensorSpec([*shape, 3], tf.float32),
            tf.TensorSpec(shape[:1], tf.int32),
            tf.TensorSpec([2], tf.int32),
        ],
    )


class EvalIterable(_Feeder):
    """Each iteration is one pass over the eval split: `{"image", "label", "mask"}` batches.

    image: float32 (B, H, W, 3) (resize, centre crop, normalise); label: int32 (B,);
    mask: bool (B,), False on padding. `steps` batches per pass on every process.
    `scored_classes`: the classes to score when the split's labels use only some of the
    model's (deit_jax/data/class_subsets.py), else None.
    """

    def __init__(self, config, mesh, data_axes, *, with_ids: bool = False, tokenizers=None):
        split = config.data.eval_split
        super().__init__(config, mesh, data_axes, config.eval_batch_size, split, tokenizers)
        self.num_examples = self.source.num_examples(split)
        largest_share = math.ceil(self.num_examples / self.num_shares)
        self.steps = max(1, math.ceil(largest_share / self.local_batch))
        self.with_ids = with_ids
        # A split that holds only some of the classes is scored on those (ImageNet-A, -R).
        self.scored_classes = class_subsets.scored_classes(
            self.source, split, self.num_classes, sources.data_dir_of(config.data)
        )
        self._dataset = self._build()

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        batches = (self._to_global(b) for b in self._dataset.as_numpy_iterator())
        prefetcher = hosts.Prefetcher(batches, self.config.data.prefetch)
        try:
            while True:
                try:
                    yield prefetcher.get()
                except StopIteration:
                    return
        finally:
            prefetcher.close()

    def _build(self) -> tf.data.Dataset:
        data, aug = self.config.data, self.config.augment
        split = data.eval_split
        ds = self.source.read(split, self.share, self.num_shares)
        if data.cache:
            ds = ds.cache()
        size = self.size

        def preprocess(record):
            ex = self.source.load(record)
            image = augment.eval_preprocess(
                ex["image"],
                size=size,
                crop_pct=data.crop_pct,
                mean=aug.mean,
                std=aug.std,
                interpolation=data.eval_interpolation,
            )
            out = {"image": image, "label": ex["label"], "id": record["id"], "mask": True}
            out |= self._caption_ids(record["id"], None)
            if self.source.real_labels:
                out["real"] = ex["real"]
            return out

        ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
        start, stop = self.source.shard_range(split, self.share, self.num_shares)
        padding = {
            "image": tf.zeros((*size, 3), tf.float32),
            "label": tf.constant(0, tf.int32),
            "id": tf.constant(-1, tf.int32),
            "mask": False,
        }
        if self.source.real_labels:
            padding["real"] = tf.zeros((self.num_classes,), tf.bool)
        for key, (tokens, _, _) in self._texts.items():
            padding[key] = tf.zeros(tokens.shape[1:], tf.int32)
        pad = self.steps * self.local_batch - (stop - start)
        ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(pad))
        if not self.with_ids:
            ds = ds.map(lambda ex: {k: v for k, v in ex.items() if k != "id"})
        ds = ds.batch(self.local_batch, drop_remainder=True)
        return ds.with_options(_options()).prefetch(tf.data.AUTOTUNE)


def build_extra_evals(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    data_axes: Sequence[str] = ("data",),
    *,
    num_classes: int | None,
) -> list[tuple[str, EvalIterable]]:
    """`(prefix, passes)` of each set in `config.data.extra_eval` (see deit_jax/data/eval_sets.py).

    A set is read like the main eval split (same size, crop, normalisation) and must predict the
    same `num_classes` classes as the model (None: any, a CLIP student's zero-shot sets).
    """
    out = []
    for eval_set in eval_sets.parse(config.data.extra_eval):
        cfg = copy.deepcopy(config)
        cfg.data.name = eval_set.name
        source = _source(cfg.data)
        cfg.data.eval_split = eval_sets.resolve_split(
            eval_set, source.split_names(), config.data.eval_split
        )
        if num_classes is not None and source.num_classes != num_classes:
            raise DataError(
                f"Extra eval set {str(eval_set)!r} has {source.num_classes} classes, the model "
                f"predicts {num_classes}; remove it from config.data.extra_eval."
            )
        out.append((eval_set.prefix, build_eval(cfg, mesh, data_axes)))
    return out


def _source(data: ml_collections.ConfigDict) -> sources.Source:
    return _cached_source(data.name, data.data_dir, data.manual_dir)


_SOURCES: dict[tuple[str, str, str], sources.Source] = {}


def _cached_source(name: str, data_dir: str, manual_dir: str) -> sources.Source:
    # One listing (and corrupt-image check) of a folder per process, not one per pipeline.
    key = (name, data_dir, manual_dir)
    if key not in _SOURCES:
        cfg = ml_collections.ConfigDict(
            {"name": name, "data_dir": data_dir, "manual_dir": manual_dir}
        )
        _SOURCES[key] = sources.get_source(cfg)
    return _SOURCES[key]


def _axes(data_axes: str | Sequence[str]) -> tuple[str, ...]:
    return (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)


def _seed_words(seed: int, *keys: int) -> np.ndarray:
    return np.random.SeedSequence([seed, *keys]).generate_state(2)


def _tf_seed(seed: int, *keys: int) -> tf.Tensor:
    """An int32 [2] stateless-op seed derived from `seed` and `keys`."""
    return tf.constant(_seed_words(seed, *keys).view(np.int32))


def _fold(seed: tf.Tensor, data: tf.Tensor) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(seed, tf.cast(data, tf.int32))


def _int64(seed: tf.Tensor) -> tf.Tensor:
    """A scalar int64 (what tf.data shuffles take) from an int32 [2] stateless seed."""
    return tf.random.stateless_uniform([], seed, minval=None, maxval=None, dtype=tf.int64)


def _frozen(config: ml_collections.ConfigDict) -> tuple:
    """A hashable copy of a flat ConfigDict (tuples for lists), for function caches."""
    return tuple(
        (k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(config.to_dict().items())
    )


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    # No autotuning model thread: deleting an iterator waits for that thread's sleep, which grows
    # to a minute in long runs (25-34 s idle at the end of each quickstart stage, measured).
    # AUTOTUNE arguments then take tf.data's static defaults instead of tuned values.
    options.autotune.enabled = False
    return options
