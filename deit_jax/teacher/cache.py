"""Distill once, train many: the teacher's top-k outputs over the exact training stream.

A student run's batches are fixed by its config (seed, data, augmentation, mixup, batch size,
data shares: `deit_jax/data/pipeline.py`), so a teacher's outputs for them can be computed once
and read back by any number of student runs with the same stream: other model seeds
(`config.init_seed`; `config.seed` fixes the data and must match), other students, other
optimiser settings and schedules.

    # once: the teacher over every batch of the run (any registry model, or `framework=torch`)
    python -m deit_jax.main --config CONFIG --workdir CACHE --config.mode=teacher_cache
    # then, as often as needed: no teacher weights are loaded
    python -m deit_jax.main --config CONFIG --workdir RUN --config.teacher.cache=CACHE

Layout of CACHE (a local directory or a `gs://` path: everything goes through TensorStore):

- `manifest.json`: the stream's fingerprint (every config value that fixes the batches), the
  teacher's (name, framework, input size, a SHA-256 of its weights, top-k, dtype), the layout
  and the deit_jax version. A student whose stream differs is refused, naming every key.
- `values/`, `indices/`: two zarr v3 arrays of shape (epochs, steps per epoch, batch, k): the
  teacher's k largest log-probabilities (temperature 1, sorted, float16 or float32) and their
  class indices (int16, or int32 past 32,767 classes). Chunks are (1, `cache_chunk_steps`,
  rows of one data share, k), each with a crc32c checksum: one process writes each chunk (no
  locks), a kill -9 loses at most the chunks being written, and the writer's next run writes
  only the chunks that are missing. Any zarr v3 reader (TensorStore, zarr-python) opens them.

Soft targets from the top-k follow TinyViT: the leftover probability mass is spread evenly over
the other classes (exact when k is the class count); hard distillation needs only the top-1.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from deit_jax import data, sharding, validation
from deit_jax.errors import DependencyError, WeightsNotFoundError
from deit_jax.jit import jit
from deit_jax.teacher import build, cache_store, flax_teacher, zero_shot
from deit_jax.teacher.cache_store import CacheError, CacheStore, Layout

__all__ = [
    "CacheError",
    "CacheReader",
    "CacheStore",
    "cached_teacher_logits",
    "full_log_probs",
    "required_topk",
    "write_cache",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- writing


def _epoch_range(spec: str, layout: Layout) -> range:
    if not spec:
        return range(layout.num_epochs)
    try:
        start_text, end_text = spec.split(":")
        start = int(start_text) if start_text else 0
        end = int(end_text) if end_text else layout.num_epochs
    except ValueError:
        raise CacheError(
            f"config.teacher.cache_epochs={spec!r}: use 'START:END' (epochs, END exclusive), "
            "e.g. '0:100'."
        ) from None
    if not 0 <= start < end <= layout.num_epochs:
        raise CacheError(
            f"config.teacher.cache_epochs={spec!r}: need 0 <= START < END <= {layout.num_epochs} "
            "(the run's epochs)."
        )
    return range(start, end)


def _local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in row order."""
    shards = {s.index[0].start or 0: s for s in x.addressable_shards}
    return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)])


def _flax_teacher_fn(
    config: ml_collections.ConfigDict,
    num_classes: int,
    mesh: jax.sharding.Mesh,
    topk: int,
    workdir: str,
) -> Callable[[dict[str, jax.Array]], tuple[np.ndarray, np.ndarray]]:
    # A CLIP teacher's zero-shot head is kept with the cache (`workdir`).
    teacher, variables = build.build_jax_teacher(config, num_classes, workdir)
    variables = jax.device_put(variables, sharding.replicated(mesh))

    @jit
    def top(variables, images):
        logits = flax_teacher.teacher_logits(teacher, variables, images)
        return jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), topk)

    def run(batch):
        values, indices = top(variables, batch["image"])
        return _local_rows(values), _local_rows(indices)

    return run


def _check_teacher_source(config: ml_collections.ConfigDict) -> None:
    """Refuses a missing teacher before any data is prepared or model built."""
    t = config.teacher
    if t.framework not in ("flax", "torch", "clip"):
        raise CacheError(
            f"config.teacher.framework={t.framework!r}: use 'flax' (a registry model with "
            "deit_jax weights), 'torch' (a timm model with a local checkpoint file) or 'clip' "
            "(a CLIP model as a zero-shot classifier)."
        )
    if not t.checkpoint or not os.path.exists(t.checkpoint):
        raise WeightsNotFoundError(
            f"config.teacher.checkpoint={t.checkpoint!r} does not exist: the cache writer needs "
            "the teacher's weights (a deit_jax weights directory or a .pth/.safetensors file; "
            "with framework 'torch', a local state-dict file of the timm model)."
        )
    if t.framework == "torch":
        import importlib.util

        missing = [m for m in ("torch", "timm") if importlib.util.find_spec(m) is None]
        if missing:
            raise DependencyError(
                f"config.teacher.framework='torch' needs {' and '.join(missing)}: pip install "
                "'deit_jax[torch]'."
            )


def _teacher_fn(config, num_classes, mesh, topk, workdir):
    if config.teacher.framework in ("flax", "clip"):
        return _flax_teacher_fn(config, num_classes, mesh, topk, workdir)
    if config.teacher.framework == "torch":
        from deit_jax.teacher import torch_teacher

        teacher = torch_teacher.TorchTeacher(config, num_classes)
        return lambda batch: teacher.topk_log_probs(_local_rows(batch["image"]), topk)
    raise AssertionError(config.teacher.framework)  # _check_teacher_source refused it


def _runs(units: list[tuple[int, int]], layout: Layout) -> Iterator[list[tuple[int, int]]]:
    """Splits (epoch, chunk) units into runs of consecutive batches of the stream."""
    run: list[tuple[int, int]] = []
    for unit in units:
        if run:
            epoch, chunk = run[-1]
            follows = (
                (epoch, chunk + 1) if chunk + 1 < layout.chunks_in_epoch(epoch) else (epoch + 1, 0)
            )
            if unit != follows:
                yield run
                run = []
        run.append(unit)
    if run:
        yield run


def write_cache(
    config: ml_collections.ConfigDict, workdir: str, devices: list[jax.Device] | None = None
) -> dict[str, Any]:
    """Runs the teacher over the run's batches and stores its top-k; returns a summary.

    Chunks that are already written are skipped, so rerunning after a crash (or on several
    machines with `config.teacher.cache_epochs` ranges) completes the cache.
    """
    from jax.experimental import multihost_utils

    config = copy.deepcopy(config)
    config.mode = "teacher_cache"  # what is checked: this is the writer, whatever the file says
    validation.check_config(
        config,
        num_devices=len(devices) if devices else jax.device_count(),
        num_processes=jax.process_count(),
    )
    _check_teacher_source(config)
    mesh = sharding.create_mesh(config.mesh, devices)
    train_data = data.build_train(config, mesh, data_axes=sharding.DATA_AXES)
    layout = cache_store.layout_for(config, train_data)
    epochs = _epoch_range(config.teacher.cache_epochs, layout)
    teacher = _teacher_fn(config, train_data.num_classes, mesh, layout.topk, workdir)
    manifest = cache_store.manifest(config, train_data, layout)

    store = CacheStore(workdir)
    stored = store.read_manifest()
    if stored is not None:
        problems = cache_store.differences(
            {**stored["stream"], **stored["teacher"]}, {**manifest["stream"], **manifest["teacher"]}
        )
        problems += cache_store.differences(
            {f"layout.{k}": v for k, v in stored["layout"].items()},
            {f"layout.{k}": v for k, v in manifest["layout"].items()},
        )
        if problems:
            raise CacheError(
                f"The teacher cache in {workdir!r} was written with another config:\n  "
                + "\n  ".join(problems)
                + "\nUse the same config to complete it, or another --workdir for a new cache."
            )
    elif jax.process_index() == 0:
        store.write_manifest(manifest)
    if jax.process_index() == 0:
        store.open_arrays(layout)
    multihost_utils.sync_global_devices("deit_jax teacher cache: arrays created")
    arrays = store.open_arrays()

    shares = list(train_data.data_shares)
    done = store.written_chunks()
    units = [
        (e, c)
        for e in epochs
        for c in range(layout.chunks_in_epoch(e))
        if any((e, c, s) not in done for s in shares)
    ]
    todo_steps = sum(len(layout.chunk_steps_of(e, c)) for e, c in units)
    skipped = sum(layout.chunks_in_epoch(e) for e in epochs) - len(units)
    log.info(
        "Teacher cache %s: %s %s over epochs %d-%d, %d steps of %d images to write (%d chunks "
        "already written), top-%d %s, shares %s of %d.",
        workdir, config.teacher.framework, config.teacher.name, epochs.start, epochs.stop - 1,
        todo_steps, layout.batch_size, skipped, layout.topk, layout.values_dtype, shares,
        layout.num_shares,
    )  # fmt: skip
    progress = tqdm(
        total=todo_steps * layout.batch_size,
        unit="img",
        unit_scale=True,
        desc=f"teacher cache {config.teacher.name}",
        disable=not config.progress_bar or jax.process_index() != 0,
        dynamic_ncols=True,
    )
    start = time.perf_counter()
    pending: list[Any] = []
    try:
        for run in _runs(units, layout):
            epoch, chunk = run[0]
            train_data.set_state(
                {**train_data.get_state(), "epoch": epoch, "step": chunk * layout.chunk_steps}
            )
            for epoch, chunk in run:
                steps = layout.chunk_steps_of(epoch, chunk)
                outputs = [teacher(next(train_data)) for _ in steps]
                progress.update(len(steps) * layout.batch_size)
                for future in pending:
                    future.result()
                pending = _write_chunk(arrays, layout, epoch, steps, shares, outputs)
        for future in pending:
            future.result()
    finally:
        progress.close()
        train_data.close()
    multihost_utils.sync_global_devices("deit_jax teacher cache: written")
    seconds = time.perf_counter() - start
    summary = {
        "steps_written": todo_steps,
        "images_per_sec": todo_steps * layout.batch_size / seconds if todo_steps else 0.0,
        "seconds": seconds,
        "bytes_per_example": layout.topk
        * (np.dtype(layout.values_dtype).itemsize + np.dtype(layout.indices_dtype).itemsize),
    }
    log.info(
        "Teacher cache %s: wrote %d steps in %.1f s (%.0f images/s).",
        workdir, todo_steps, seconds, summary["images_per_sec"],
    )  # fmt: skip
    return summary


def _write_chunk(arrays, layout, epoch, steps, shares, outputs) -> list[Any]:
    """Starts the writes of one chunk per data share of this process; returns their futures."""
    values = np.stack([v for v, _ in outputs]).astype(layout.values_dtype)
    indices = np.stack([i for _, i in outputs]).astype(layout.indices_dtype)
    rows = layout.share_batch
    futures = []
    for position, share in enumerate(shares):
        local = slice(position * rows, (position + 1) * rows)
        target = (epoch, slice(steps.start, steps.stop), slice(share * rows, (share + 1) * rows))
        # Which process writes which chunk (tests check that each writes only its own shares').
        log.debug(
            "Teacher cache: process %d writes chunk %s",
            jax.process_index(),
            cache_store.chunk_key(epoch, steps.start // layout.chunk_steps, share),
        )
        futures.append(arrays["values"][target].write(values[:, local]).commit)
        futures.append(arrays["indices"][target].write(indices[:, local]).commit)
    return futures


# --------------------------------------------------------------------------- reading


_ZERO_SHOT_KEYS = (
    "teacher.class_names_sha256",
    "teacher.num_class_names",
    "teacher.templates_sha256",
)


def required_topk(config: ml_collections.ConfigDict) -> int:
    """The smallest k a run's loss can use: 1 for hard, `teacher.cache_topk` for soft."""
    return 1 if config.distillation.kind == "hard" else int(config.teacher.cache_topk)


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
                f"({cache_store.MANIFEST} is missing); "
                f"write it first: {cache_store.writer_command(path)}"
            )
        if manifest.get("format") != cache_store.FORMAT:
            raise CacheError(
                f"{path!r} is not a {cache_store.FORMAT} cache (format {manifest.get('format')})."
            )
        problems = cache_store.differences(
            manifest["stream"], cache_store.stream_fingerprint(config, train_data)
        )
        if problems:
            raise CacheError(
                f"The teacher cache {path!r} was written for another training stream:\n  "
                + "\n  ".join(problems)
                + "\nTrain with the config the cache was written with, or write a cache for this "
                f"one: {cache_store.writer_command('NEW_CACHE')}"
            )
        self.layout = Layout(**manifest["layout"])
        self.teacher = manifest["teacher"]
        if config.teacher.framework == "clip" and "teacher.templates_sha256" in self.teacher:
            problems = cache_store.differences(
                {k: v for k, v in self.teacher.items() if k in _ZERO_SHOT_KEYS},
                {
                    k: v
                    for k, v in zero_shot.zero_shot_fingerprint(config).items()
                    if k in _ZERO_SHOT_KEYS
                },
            )
            if problems:
                raise CacheError(
                    f"The teacher cache {path!r} holds a CLIP teacher's outputs for other class "
                    "names or prompts:\n  " + "\n  ".join(problems) + "\nTrain with the "
                    "teacher.class_names and teacher.prompts the cache was written with, or write "
                    f"a cache for these: {cache_store.writer_command('NEW_CACHE')}"
                )
        needed = required_topk(config)
        if self.layout.topk < needed:
            raise CacheError(
                f"The teacher cache {path!r} holds the top-{self.layout.topk} teacher outputs, "
                f"but distillation.kind={config.distillation.kind!r} with "
                f"config.teacher.cache_topk={needed} needs at least {needed}: lower "
                "config.teacher.cache_topk or write a cache with a larger one."
            )
        self.shares = list(train_data.data_shares)
        self.arrays = self.store.open_arrays()
        self._chunks: dict[int, tuple[tuple[int, int], np.ndarray, np.ndarray]] = {}

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
                f"{cache_store.writer_command(self.path)} and --config.num_epochs covering the run."
            )

    def __call__(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        chunk = step // self.layout.chunk_steps
        values, indices = [], []
        for share in self.shares:
            key, v, i = self._chunks.get(share, (None, None, None))
            if key != (epoch, chunk):
                v, i = self._read_chunk(epoch, chunk, share)
                self._chunks[share] = ((epoch, chunk), v, i)
            values.append(v[step - chunk * self.layout.chunk_steps])
            indices.append(i[step - chunk * self.layout.chunk_steps])
        return {
            "teacher_logp": np.concatenate(values).astype(np.float32),
            "teacher_index": np.concatenate(indices).astype(np.int32),
        }

    def _read_chunk(self, epoch: int, chunk: int, share: int) -> tuple[np.ndarray, np.ndarray]:
        steps = self.layout.chunk_steps_of(epoch, chunk)
        rows = self.layout.share_batch
        target = (epoch, slice(steps.start, steps.stop), slice(share * rows, (share + 1) * rows))
        try:
            return tuple(self.arrays[name][target].read().result() for name in cache_store.ARRAYS)
        except ValueError as e:
            files = " and ".join(self.store.chunk_files(epoch, chunk, share))
            raise CacheError(
                f"Teacher cache chunk (epoch {epoch}, steps {steps.start}-{steps.stop - 1}, data "
                f"share {share}) of {self.path!r} is corrupt or truncated: {e}. Delete {files} "
                f"and rewrite the missing chunk: {cache_store.writer_command(self.path)}"
            ) from None


def _ranges(steps: list[int]) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for s in steps:
        if ranges and ranges[-1][1] == s - 1:
            ranges[-1] = (ranges[-1][0], s)
        else:
            ranges.append((s, s))
    return ranges


# --------------------------------------------------------------------------- in the train step


def full_log_probs(logp: jax.Array, index: jax.Array, num_classes: int) -> jax.Array:
    """(B, C) teacher log-probabilities rebuilt from the top-k (TinyViT): the leftover mass
    1 - sum(top-k) spread evenly over the other C - k classes; exact when k == C."""
    logp = logp.astype(jnp.float32)
    batch, k = logp.shape
    fill = jnp.zeros((batch, 1), jnp.float32)
    if k < num_classes:
        rest = jnp.maximum(1.0 - jnp.exp(logp).sum(-1, keepdims=True), 1e-12)
        fill = jnp.log(rest / (num_classes - k))
    full = jnp.broadcast_to(fill, (batch, num_classes))
    return full.at[jnp.arange(batch)[:, None], index].set(logp)


def cached_teacher_logits(batch: dict[str, jax.Array], num_classes: int, kind: str) -> jax.Array:
    """What the loss takes as teacher logits, from a batch's cached top-k.

    Hard distillation gets a one-hot of the stored top-1 class (its argmax is exactly the live
    teacher's); soft, the rebuilt log-probabilities (softmax-invariant, so `tau` applies as to
    logits).
    """
    index = batch["teacher_index"]
    if kind == "hard":
        return jax.nn.one_hot(index[:, 0], num_classes, dtype=jnp.float32)
    return full_log_probs(batch["teacher_logp"], index, num_classes)
