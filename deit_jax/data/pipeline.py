"""The training input pipeline: tf.data on each host, global `jax.Array`s on the mesh
(`deit_jax.data.feeder`); the eval pipeline is `deit_jax.data.eval_pipeline`.

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
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from deit_jax._compat import import_tensorflow
from deit_jax.data import augment, hosts, mixup
from deit_jax.data.feeder import Feeder, Tokenizers, as_axes, tf_options
from deit_jax.errors import DataError

tf = import_tensorflow()

# Tags that keep the streams derived from one seed apart.
_SHUFFLE_FILES, _SHUFFLE_BUFFER, _AUGMENT, _MIXUP, _CAPTION = range(5)


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
    return TrainIterator(config, mesh, as_axes(data_axes), with_ids=with_ids, tokenizers=tokenizers)


class TrainIterator(Feeder):
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
        return ds.with_options(tf_options()).prefetch(tf.data.AUTOTUNE)

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
        return train_augment_fn(self.config)

    def _mix_fn(self):
        return train_mix_fn(self.config, self.share_batch, self.num_classes)


def train_augment_fn(config: ml_collections.ConfigDict) -> tf.types.experimental.GenericFunction:
    """The run's per-image train transform, (encoded image, int32 [2] seed) -> float32 image."""
    size = augment.height_width(config.data.img_size)
    return _train_preprocess_fn(size, _frozen(config.augment))


def train_mix_fn(
    config: ml_collections.ConfigDict, batch: int, num_classes: int
) -> tf.types.experimental.GenericFunction:
    """The run's Mixup/CutMix of `batch` images, (images, labels, seed) -> (images, targets)."""
    shape = (batch, *augment.height_width(config.data.img_size))
    return _mixup_fn(shape, num_classes, _frozen(config.mixup))


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
