"""What fixes a teacher cache, and where it lives: its layout, the fingerprints of the stream and
the teacher in its manifest, and the TensorStore arrays (`write` and `read` use them; the
package's docstring gives the directory's layout).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import ml_collections
import numpy as np
import tensorstore as ts

import deit_jax
from deit_jax import data
from deit_jax.config import tasks
from deit_jax.config.defaults import TEACHER_CLIP
from deit_jax.errors import UserError
from deit_jax.teacher.clip import zero_shot
from deit_jax.weights.directory import weights_hash

MANIFEST = "manifest.json"
FORMAT = "deit_jax.teacher_cache/1"
ARRAYS = ("values", "indices")
EMBEDDINGS = "embeddings"  # the optional third array (`teacher.cache_embeddings`)
# A CLIP teacher's caption embeddings: with `embeddings` (its image embeddings), what a cache
# of image-caption pairs stores instead of the top-k (deit_jax.train.clip_student).
TEXT_EMBEDDINGS = "text_embeddings"
TEACHER_SCALE = "teacher_scale"  # a pair cache's manifest: the teacher's logit multiplier


class CacheError(UserError, ValueError):
    """A teacher cache that does not fit the run or cannot be read; the message says the fix."""


# --------------------------------------------------------------------------- what fixes a cache


@dataclasses.dataclass(frozen=True)
class Layout:
    """Shape of a cache: which (epoch, step, row) every stored example belongs to."""

    num_epochs: int  # epochs stored (the last one may be partial)
    steps_per_epoch: int
    total_steps: int
    batch_size: int
    num_shares: int  # data shares of a batch (`config.data.num_shares`, or one per process)
    topk: int
    chunk_steps: int
    values_dtype: str
    indices_dtype: str
    # Per-example teacher embeddings (0: none). A cache without them keeps the manifest it had
    # before they existed (`as_manifest` leaves both keys out).
    embedding_dim: int = 0
    embedding_dtype: str = ""
    # A pair cache's caption embeddings (0: none; then also left out of the manifest). Such a
    # cache stores no top-k (`topk` 0).
    text_embedding_dim: int = 0

    @property
    def share_batch(self) -> int:
        return self.batch_size // self.num_shares

    @property
    def arrays(self) -> tuple[str, ...]:
        return (
            (ARRAYS if self.topk else ())
            + ((EMBEDDINGS,) if self.embedding_dim else ())
            + ((TEXT_EMBEDDINGS,) if self.text_embedding_dim else ())
        )

    def as_manifest(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        if not self.embedding_dim:
            del fields["embedding_dim"], fields["embedding_dtype"]
        if not self.text_embedding_dim:
            del fields["text_embedding_dim"]
        return fields

    def bytes_per_example(self) -> int:
        """Stored bytes per example and epoch: top-k values and indices, and the embeddings."""
        itemsize = lambda dtype: np.dtype(dtype).itemsize  # noqa: E731
        logits = self.topk * (itemsize(self.values_dtype) + itemsize(self.indices_dtype))
        width = self.embedding_dim + self.text_embedding_dim
        return logits + width * itemsize(self.embedding_dtype or "float16")

    def steps_in_epoch(self, epoch: int) -> int:
        return max(0, min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch))

    def chunks_in_epoch(self, epoch: int) -> int:
        return math.ceil(self.steps_in_epoch(epoch) / self.chunk_steps)

    def chunk_steps_of(self, epoch: int, chunk: int) -> range:
        start = chunk * self.chunk_steps
        return range(start, min(start + self.chunk_steps, self.steps_in_epoch(epoch)))


def layout_for(
    config: ml_collections.ConfigDict, train_data: data.TrainIterator, embedding_dim: int = 0
) -> Layout:
    """The cache layout of a run; `embedding_dim` the teacher's embedding width, stored when
    `teacher.cache_embeddings` is on, and always for image-caption pairs (`captions:` data),
    whose cache holds the teacher's image and caption embeddings and no top-k."""
    spe = train_data.steps_per_epoch
    total = max(1, int(round(config.num_epochs * spe)))
    pairs = tasks.task_of(config).cache == tasks.PAIR_EMBEDDINGS
    topk = 0 if pairs else int(config.teacher.cache_topk)
    embeddings = pairs or bool(config.teacher.cache_embeddings)
    num_classes = train_data.num_classes
    if topk > num_classes:  # the class count is the data's: not a rule of the config alone
        raise CacheError(
            f"config.teacher.cache_topk={topk}: must be between 1 and the {num_classes} classes "
            "(1 is enough for hard distillation; the class count stores the exact distribution)."
        )
    return Layout(
        num_epochs=math.ceil(total / spe),
        steps_per_epoch=spe,
        total_steps=total,
        batch_size=train_data.global_batch,
        num_shares=train_data.num_data_shares,
        topk=topk,
        chunk_steps=min(int(config.teacher.cache_chunk_steps), spe),
        values_dtype=config.teacher.cache_dtype,
        indices_dtype="int16" if num_classes <= 32767 else "int32",
        embedding_dim=embedding_dim if embeddings else 0,
        embedding_dtype=config.teacher.cache_embedding_dtype if embeddings else "",
        text_embedding_dim=embedding_dim if pairs else 0,
    )


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))


def stream_fingerprint(
    config: ml_collections.ConfigDict, train_data: data.TrainIterator
) -> dict[str, Any]:
    """Every value that fixes the training batches (images, augmentation, mixing, order)."""
    d = config.data
    fingerprint = {
        "data.name": d.name,
        "data.train_split": d.train_split,
        "data.num_train": train_data.num_examples,
        "data.num_classes": train_data.num_classes,
        "data.img_size": d.img_size,
        "data.repeated_aug": d.repeated_aug,
        "data.num_shares": train_data.num_data_shares,
        "data.shuffle_buffer": d.shuffle_buffer,
        "data.cache": d.cache,
        "batch_size": config.batch_size,
        "seed": config.seed,
    }
    for group in ("augment", "mixup"):
        for key, value in sorted(config[group].to_dict().items()):
            if (group, key) != ("mixup", "label_smoothing"):  # changes targets, not images
                fingerprint[f"{group}.{key}"] = value
    return _jsonable(fingerprint)


# The teacher fingerprint's record of a CLIP teacher's zero-shot head.
ZERO_SHOT_KEYS = (
    "teacher.class_names_sha256",
    "teacher.num_class_names",
    "teacher.templates_sha256",
)


def teacher_fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
    t = config.teacher
    head = {}
    pairs = tasks.task_of(config).cache == tasks.PAIR_EMBEDDINGS  # both towers: no head
    if t.framework == TEACHER_CLIP and not pairs:  # the head: class names and templates
        head = zero_shot.zero_shot_fingerprint(config)
    if t.cache_embeddings or pairs:  # absent otherwise: older caches stay valid
        head["teacher.cache_embedding_dtype"] = t.cache_embedding_dtype
    return _jsonable(
        {
            **head,
            "teacher.name": t.name,
            "teacher.framework": t.framework,
            "teacher.img_size": t.img_size,
            "teacher.checkpoint": t.checkpoint,
            "teacher.weights_sha256": weights_hash(t.checkpoint) if t.checkpoint else "",
            "teacher.cache_topk": int(t.cache_topk),
            "teacher.cache_dtype": t.cache_dtype,
            "dtype": config.dtype,
        }
    )


# --------------------------------------------------------------------------- storage


def _kvstore(path: str, sub: str = "") -> Any:
    """A TensorStore kvstore spec for `path/sub`: URLs (gs://, file://) as they are."""
    if "://" in path:
        return path.rstrip("/") + "/" + (sub + "/" if sub else "")
    return {"driver": "file", "path": os.path.abspath(os.path.join(path, sub)) + "/"}


def _array_spec(path: str, name: str, layout: Layout | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"driver": "zarr3", "kvstore": _kvstore(path, name)}
    if layout is not None:
        dtype, width = {
            "values": (layout.values_dtype, layout.topk),
            "indices": (layout.indices_dtype, layout.topk),
            EMBEDDINGS: (layout.embedding_dtype, layout.embedding_dim),
            TEXT_EMBEDDINGS: (layout.embedding_dtype, layout.text_embedding_dim),
        }[name]
        spec["metadata"] = {
            "shape": [layout.num_epochs, layout.steps_per_epoch, layout.batch_size, width],
            "data_type": dtype,
            "chunk_grid": {
                "name": "regular",
                "configuration": {
                    "chunk_shape": [1, layout.chunk_steps, layout.share_batch, width]
                },
            },
            "codecs": [
                {"name": "bytes", "configuration": {"endian": "little"}},
                {"name": "crc32c"},
            ],
            "attributes": {"format": FORMAT},
        }
    return spec


def chunk_key(epoch: int, chunk: int, share: int) -> str:
    return f"c/{epoch}/{chunk}/{share}/0"  # zarr v3's default chunk key encoding


class CacheStore:
    """The manifest and the arrays of one cache directory (`values`, `indices`, and
    `embeddings` when it stores them)."""

    def __init__(self, path: str):
        self.path = path
        self._root = ts.KvStore.open(_kvstore(path)).result()

    def _names(self, layout: Layout | None) -> tuple[str, ...]:
        if layout is not None:
            return layout.arrays
        stored = self.read_manifest()
        return Layout(**stored["layout"]).arrays if stored else ARRAYS

    def read_manifest(self) -> dict[str, Any] | None:
        result = self._root.read(MANIFEST).result()
        if result.state != "value":
            return None
        return json.loads(bytes(result.value))

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self._root.write(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True)).result()

    def open_arrays(self, layout: Layout | None = None) -> dict[str, ts.TensorStore]:
        """Both arrays; `layout` creates them (or opens them if they exist with that layout)."""
        kwargs = {"create": True, "open": True} if layout is not None else {"open": True}
        return {
            name: ts.open(_array_spec(self.path, name, layout), **kwargs).result()
            for name in self._names(layout)
        }

    def written_chunks(self) -> set[tuple[int, int, int]]:
        """(epoch, chunk, share) of every chunk present in every array."""
        present = []
        for name in self._names(None):
            store = ts.KvStore.open(_kvstore(self.path, name)).result()
            keys = set()
            for key in store.list().result():
                parts = key.decode().split("/")
                if len(parts) == 5 and parts[0] == "c" and parts[4] == "0":  # not temp files
                    keys.add((int(parts[1]), int(parts[2]), int(parts[3])))
            present.append(keys)
        return set.intersection(*present)

    def read_all(self) -> dict[str, np.ndarray]:
        """The whole arrays in memory (`values`, `indices`, `embeddings`), for inspection and
        small caches; never-written rows read as zeros (zarr's fill value)."""
        return {name: array.read().result() for name, array in self.open_arrays().items()}

    def chunk_files(self, epoch: int, chunk: int, share: int) -> list[str]:
        return [
            os.path.join(self.path, name, chunk_key(epoch, chunk, share))
            for name in self._names(None)
        ]


def manifest(
    config: ml_collections.ConfigDict, train_data: data.TrainIterator, layout: Layout
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "deit_jax_version": deit_jax.__version__,
        "stream": stream_fingerprint(config, train_data),
        "teacher": teacher_fingerprint(config),
        "layout": layout.as_manifest(),
        "num_epochs": config.num_epochs,
    }


def embedding_dim(path: str) -> int:
    """The width of the embeddings the cache `path` stores (one cache: feature distillation takes
    one teacher); a CacheError when it stores none or is no cache."""
    stored = CacheStore(path).read_manifest()
    width = Layout(**stored["layout"]).embedding_dim if stored else 0
    if not width:
        raise no_embeddings(path)
    return width


def no_embeddings(path: str) -> CacheError:
    return CacheError(
        f"The teacher cache {path!r} holds no teacher embeddings, which distillation.kind="
        "'feature' trains from: write a cache with --config.teacher.cache_embeddings=True "
        f"({writer_command('NEW_CACHE')}), or distil its logits with "
        "--config.distillation.kind=soft or hard."
    )


def differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(stored) | set(current))
    missing = "(absent)"
    return [
        f"config.{k}: cache {stored.get(k, missing)!r}, this run {current.get(k, missing)!r}"
        for k in keys
        if stored.get(k, missing) != current.get(k, missing)
    ]


def writer_command(path: str) -> str:
    return (
        "python -m deit_jax.main --config <this run's config and overrides> "
        f"--workdir {path} --config.mode=teacher_cache"
    )
