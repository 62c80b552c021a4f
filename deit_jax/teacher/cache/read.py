"""The student's side of a teacher cache: its batches' cached outputs, checked before training."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from deit_jax import data
from deit_jax.config import teacher_rules
from deit_jax.config.defaults import TEACHER_CLIP
from deit_jax.teacher.cache import store
from deit_jax.teacher.cache.store import CacheError, CacheStore, Layout
from deit_jax.teacher.cache.targets import required_topk
from deit_jax.teacher.clip import zero_shot


class CacheReader:
    """`reader(epoch, step)` -> this process's rows of that batch's cached teacher outputs.

    Built before training: it checks that the cache was written for this run's stream and holds
    a large enough top-k, and `check_coverage` that it covers every batch the run still needs, so
    a run never finds out halfway (and never falls back to a live teacher).
    """

    def __init__(self, config: ml_collections.ConfigDict, train_data: data.TrainIterator):
        path = config.teacher.cache
        self.path = path
        self.store = CacheStore(path)
        manifest = self.store.read_manifest()
        if manifest is None:
            raise CacheError(
                f"config.teacher.cache={path!r} holds no teacher cache "
                f"({store.MANIFEST} is missing); "
                f"write it first: {store.writer_command(path)}"
            )
        if manifest.get("format") != store.FORMAT:
            raise CacheError(
                f"{path!r} is not a {store.FORMAT} cache (format {manifest.get('format')})."
            )
        problems = store.differences(
            manifest["stream"], store.stream_fingerprint(config, train_data)
        )
        if problems:
            raise CacheError(
                f"The teacher cache {path!r} was written for another training stream:\n  "
                + "\n  ".join(problems)
                + "\nTrain with the config the cache was written with, or write a cache for this "
                f"one: {store.writer_command('NEW_CACHE')}"
            )
        self.layout = Layout(**manifest["layout"])
        self.teacher = manifest["teacher"]
        if config.teacher.framework == TEACHER_CLIP and "teacher.templates_sha256" in self.teacher:
            problems = store.differences(
                {k: v for k, v in self.teacher.items() if k in store.ZERO_SHOT_KEYS},
                {
                    k: v
                    for k, v in zero_shot.zero_shot_fingerprint(config).items()
                    if k in store.ZERO_SHOT_KEYS
                },
            )
            if problems:
                raise CacheError(
                    f"The teacher cache {path!r} holds a CLIP teacher's outputs for other class "
                    "names or prompts:\n  " + "\n  ".join(problems) + "\nTrain with the "
                    "teacher.class_names and teacher.prompts the cache was written with, or write "
                    f"a cache for these: {store.writer_command('NEW_CACHE')}"
                )
        if config.distillation.kind == "feature" and not self.layout.embedding_dim:
            raise store.no_embeddings(path)
        needed = required_topk(config)
        kind = config.distillation.kind
        if kind not in ("feature", "in_batch") and self.layout.topk < needed:
            raise CacheError(
                f"The teacher cache {path!r} holds the top-{self.layout.topk} teacher outputs, "
                f"but distillation.kind={config.distillation.kind!r} with "
                f"config.teacher.cache_topk={needed} needs at least {needed}: lower "
                "config.teacher.cache_topk or write a cache with a larger one."
            )
        self.shares = list(train_data.data_shares)
        self.arrays = self.store.open_arrays()
        # What a batch takes: the top-k, for feature distillation the embeddings, for pairs the
        # image and caption embeddings (and the scale that makes them the teacher's logits).
        self.names = {
            "feature": (store.EMBEDDINGS,),
            "in_batch": (store.EMBEDDINGS, store.TEXT_EMBEDDINGS),
        }.get(kind, store.ARRAYS)
        self.scale = manifest.get(store.TEACHER_SCALE)
        self._chunks: dict[int, tuple[tuple[int, int], tuple[np.ndarray, ...]]] = {}

    def __str__(self) -> str:
        return self.path

    def check_coverage(self, start_step: int, total_steps: int) -> None:
        """Refuses a cache that lacks any batch of this process from `start_step` on."""
        layout, done = self.layout, self.store.written_chunks()
        missing = []
        spe = layout.steps_per_epoch
        for step in range(start_step, total_steps):
            epoch, in_epoch = divmod(step, spe)
            chunk = in_epoch // layout.chunk_steps
            stored = epoch < layout.num_epochs and in_epoch < layout.steps_in_epoch(epoch)
            if not stored or any((epoch, chunk, s) not in done for s in self.shares):
                missing.append(step)
        if missing:
            ranges = _ranges(missing)
            spans = ", ".join(
                f"steps {a}-{b} (epoch {a // spe} step {a % spe} to epoch {b // spe} step "
                f"{b % spe})"
                for a, b in ranges[:5]
            )
            more = f" and {len(ranges) - 5} more ranges" if len(ranges) > 5 else ""
            raise CacheError(
                f"The teacher cache {self.path!r} lacks {len(missing)} of the {total_steps} steps "
                f"this run needs: {spans}{more} (steps per epoch {spe}). Complete it with "
                f"{store.writer_command(self.path)} and --config.num_epochs covering the run."
            )

    def __call__(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        chunk = step // self.layout.chunk_steps
        rows: list[tuple[np.ndarray, ...]] = []
        for share in self.shares:
            key, arrays = self._chunks.get(share, (None, ()))
            if key != (epoch, chunk):
                arrays = self._read_chunk(epoch, chunk, share)
                self._chunks[share] = ((epoch, chunk), arrays)
            rows.append(tuple(a[step - chunk * self.layout.chunk_steps] for a in arrays))
        columns = zip(*rows, strict=True)  # per array: its rows of every share
        batch = {n: np.concatenate(c) for n, c in zip(self.names, columns, strict=True)}
        if store.TEXT_EMBEDDINGS in batch:
            image = batch[store.EMBEDDINGS].astype(np.float32)
            return {
                "teacher_image_embedding": image,
                "teacher_text_embedding": batch[store.TEXT_EMBEDDINGS].astype(np.float32),
                "teacher_scale": np.full(len(image), self.scale, np.float32),
            }
        if store.EMBEDDINGS in batch:
            return {"teacher_embedding": batch[store.EMBEDDINGS].astype(np.float32)}
        return {
            "teacher_logp": batch["values"].astype(np.float32),
            "teacher_index": batch["indices"].astype(np.int32),
        }

    def _read_chunk(self, epoch: int, chunk: int, share: int) -> tuple[np.ndarray, ...]:
        steps = self.layout.chunk_steps_of(epoch, chunk)
        rows = self.layout.share_batch
        target = (epoch, slice(steps.start, steps.stop), slice(share * rows, (share + 1) * rows))
        try:
            return tuple(self.arrays[name][target].read().result() for name in self.names)
        except ValueError as e:
            files = " and ".join(self.store.chunk_files(epoch, chunk, share))
            raise CacheError(
                f"Teacher cache chunk (epoch {epoch}, steps {steps.start}-{steps.stop - 1}, data "
                f"share {share}) of {self.path!r} is corrupt or truncated: {e}. Delete {files} "
                f"and rewrite the missing chunk: {store.writer_command(self.path)}"
            ) from None


def member_readers(
    config: ml_collections.ConfigDict, train_data: data.TrainIterator
) -> tuple[list[str], list[CacheReader]]:
    """The caches of `teacher.cache="A,B"` (an ensemble's) and a reader of each, every one read
    and checked as a single cache; a member's problem names the member."""
    paths = teacher_rules.cache_paths(config.teacher.cache)
    readers = []
    for path in paths:
        member = copy.deepcopy(config)
        member.teacher.cache = path
        try:
            readers.append(CacheReader(member, train_data))
        except CacheError as e:
            raise CacheError(
                f"Member {path!r} of teacher.cache={config.teacher.cache!r}: {e}"
            ) from None
    return paths, readers


def cached_shapes(
    config: ml_collections.ConfigDict, batch: int, num_classes: int, embedding_dim: int
) -> dict[str, jax.ShapeDtypeStruct]:
    """What a batch of `batch` rows from the run's teacher cache carries, as shapes (a plan
    reads no cache): what `CacheReader` returns (`MixedCacheReader`: every class, in order)."""
    kind, f32 = config.distillation.kind, jnp.float32
    if kind == "in_batch":
        return {
            "teacher_image_embedding": jax.ShapeDtypeStruct((batch, embedding_dim), f32),
            "teacher_text_embedding": jax.ShapeDtypeStruct((batch, embedding_dim), f32),
            "teacher_scale": jax.ShapeDtypeStruct((batch,), f32),
        }
    if kind == "feature":
        return {"teacher_embedding": jax.ShapeDtypeStruct((batch, embedding_dim), f32)}
    mixed = len(teacher_rules.cache_paths(config.teacher.cache)) > 1
    k = num_classes if mixed else int(config.teacher.cache_topk)
    return {
        "teacher_logp": jax.ShapeDtypeStruct((batch, k), f32),
        "teacher_index": jax.ShapeDtypeStruct((batch, k), jnp.int32),
    }


def _ranges(steps: list[int]) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for s in steps:
        if ranges and ranges[-1][1] == s - 1:
            ranges[-1] = (ranges[-1][0], s)
        else:
            ranges.append((s, s))
    return ranges
