"""The eval input pipeline: passes over an eval split, padded and masked, as global arrays
(`deit_jax.data.feeder`), and the extra eval sets of `config.data.extra_eval`.

Each pass reads the eval split once. Every process runs the same number of steps;
the batches past the end of a process's share are padded with `mask == False`, so summing
`metric * mask` counts every example exactly once.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence

import jax
import ml_collections
from jax.sharding import Mesh

from deit_jax._compat import import_tensorflow
from deit_jax.data import augment, catalog, class_subsets, eval_sets, hosts
from deit_jax.data.feeder import Feeder, Tokenizers, as_axes, source_of, tf_options
from deit_jax.errors import DataError

tf = import_tensorflow()


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
    return EvalIterable(config, mesh, as_axes(data_axes), with_ids=with_ids, tokenizers=tokenizers)


class EvalIterable(Feeder):
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
            self.source, split, self.num_classes, catalog.data_dir_of(config.data)
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
        return ds.with_options(tf_options()).prefetch(tf.data.AUTOTUNE)


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
        # Only evaluated: nothing looks at a train split, which the set need not have (a
        # folder with only test/, ImageNet-A's one split) (`dataset_info`).
        cfg.mode = "eval"
        cfg.data.name = eval_set.name
        source = source_of(cfg.data)
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
