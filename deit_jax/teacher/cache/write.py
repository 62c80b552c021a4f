"""The cache writer (`--config.mode=teacher_cache`): the teacher over every batch of the run's
stream, its top-k stored chunk by chunk (the layout: `deit_jax.teacher.cache`).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from deit_jax import data, sharding
from deit_jax.config import members, rules, tasks, teacher_rules
from deit_jax.config.defaults import TEACHER_TORCH
from deit_jax.jit import jit
from deit_jax.models import feature_width
from deit_jax.models.clip import clip_scale
from deit_jax.teacher import build, forward, torch_teacher
from deit_jax.teacher.cache import store
from deit_jax.teacher.cache.store import CacheError, CacheStore, Layout
from deit_jax.teacher.clip import two_towers
from deit_jax.weights.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

# Known only once the teacher is built: left out of the first comparison with a stored manifest.
EMBEDDING_LAYOUT_KEYS = (
    "layout.embedding_dim",
    "layout.embedding_dtype",
    "layout.text_embedding_dim",
)


def _epoch_range(spec: str, layout: Layout) -> range:
    """The epochs `config.teacher.cache_epochs` names (its syntax checked by the config rules),
    within the run's."""
    start, end = teacher_rules.epoch_range(spec)
    start, end = start or 0, layout.num_epochs if end is None else end
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


TeacherFn = Callable[[dict[str, jax.Array]], tuple[np.ndarray, ...]]


def _flax_teacher_fn(
    config: ml_collections.ConfigDict,
    num_classes: int,
    mesh: jax.sharding.Mesh,
    topk: int,
    workdir: str,
) -> tuple[TeacherFn, int]:
    # A CLIP teacher's zero-shot head is kept with the cache (`workdir`).
    teacher, variables = build.build_jax_teacher(config, num_classes, workdir)
    variables = jax.device_put(variables, sharding.replicated(mesh))
    embeddings = bool(config.teacher.cache_embeddings)

    @jit
    def top(variables, images):
        if not embeddings:
            logits = forward.teacher_logits(teacher, variables, images)
            return jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), topk)
        # One forward pass gives both: a CLIP teacher's zero-shot logits and image embedding.
        logits, features = forward.teacher_outputs(teacher, variables, images)
        return (*jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), topk), features)

    def run(batch):
        return tuple(_local_rows(x) for x in top(variables, batch["image"]))

    return run, feature_width(teacher) if embeddings else 0


def _topk_teacher_fn(config, num_classes, mesh, topk, workdir) -> tuple[TeacherFn, int, dict]:
    """A classifier's teacher as `fn(batch) -> (values, indices[, embeddings])` of this
    process's rows, its embedding width (0 when the cache stores none), no manifest entry."""
    if config.teacher.framework == TEACHER_TORCH:
        teacher = torch_teacher.TorchTeacher(config, num_classes)
        embeddings = bool(config.teacher.cache_embeddings)
        fn = lambda batch: teacher.topk_outputs(_local_rows(batch["image"]), topk, embeddings)  # noqa: E731
        return fn, teacher.embedding_dim if embeddings else 0, {}
    return (*_flax_teacher_fn(config, num_classes, mesh, topk, workdir), {})


def _pair_teacher_fn(config, num_classes, mesh, topk, workdir) -> tuple[TeacherFn, int, dict]:
    """A CLIP student's CLIP teacher as `fn(batch) -> (image, caption embeddings)` of this
    process's rows, its embedding width, and its logit scale (clamped, float32) for the
    manifest: what rebuilds its in-batch logits from the embeddings."""
    del num_classes, topk, workdir  # no classes: nothing of the teacher's is kept besides
    teacher, variables = two_towers.build_pair_teacher(config)
    variables = jax.device_put(variables, sharding.replicated(mesh))
    embed = jit(lambda v, images, ids: teacher.apply(v, images, ids))
    scale = float(jax.device_get(clip_scale(variables["params"]["clip"]["logit_scale"])))

    def run(batch):
        image, text, _ = embed(variables, batch["image"], batch["text"])
        return _local_rows(image), _local_rows(text)

    return run, teacher.clip.embed_dim, {store.TEACHER_SCALE: scale}


# The teacher that fills a task's cache, by what the cache holds (deit_jax.config.tasks).
_TEACHER_FNS = {tasks.TOPK: _topk_teacher_fn, tasks.PAIR_EMBEDDINGS: _pair_teacher_fn}


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
    config = copy.deepcopy(config)
    config.mode = "teacher_cache"  # what is checked: this is the writer, whatever the file says
    rules.check_config(
        config,
        num_devices=len(devices) if devices else jax.device_count(),
        num_processes=jax.process_count(),
    )
    ensemble = members.members_of(config)
    if ensemble:
        return _write_member_caches(config, workdir, devices, ensemble)
    mesh = sharding.create_mesh(config.mesh, devices)
    task = tasks.task_of(config)
    # Captions in the teacher's own tokens (its only tokenizer here).
    tokenizers = {"text": load_tokenizer(config.teacher.checkpoint)} if task.captions else None
    train_data = data.build_train(config, mesh, sharding.DATA_AXES, tokenizers=tokenizers)
    layout = store.layout_for(config, train_data)
    epochs = _epoch_range(config.teacher.cache_epochs, layout)
    manifest = store.manifest(config, train_data, layout)
    cache = CacheStore(workdir)
    stored = cache.read_manifest()
    # Before the teacher is built: another config is refused at once. A CLIP teacher's class
    # names and prompts are compared by its head, saved in the cache, which names what changed;
    # the embedding width is the teacher's.
    _refuse_another_config(
        workdir, stored, manifest, skip=(*store.ZERO_SHOT_KEYS, *EMBEDDING_LAYOUT_KEYS)
    )
    teacher, embedding_dim, entries = _TEACHER_FNS[task.cache](
        config, train_data.num_classes, mesh, layout.topk, workdir
    )
    layout = store.layout_for(config, train_data, embedding_dim)
    manifest = store.manifest(config, train_data, layout) | entries
    _refuse_another_config(workdir, stored, manifest)
    if stored is None and jax.process_index() == 0:
        cache.write_manifest(manifest)
    if jax.process_index() == 0:
        cache.open_arrays(layout)
    multihost_utils.sync_global_devices("deit_jax teacher cache: arrays created")
    arrays = cache.open_arrays()

    shares = list(train_data.data_shares)
    done = cache.written_chunks()
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
        "bytes_per_example": layout.bytes_per_example(),
    }
    log.info(
        "Teacher cache %s: wrote %d steps in %.1f s (%.0f images/s).",
        workdir, todo_steps, seconds, summary["images_per_sec"],
    )  # fmt: skip
    return summary


def _refuse_another_config(
    workdir: str,
    stored: dict[str, Any] | None,
    manifest: dict[str, Any],
    skip: tuple[str, ...] = (),
) -> None:
    """Completing a cache with a config other than the one it was started with is refused,
    naming every differing stream, teacher and layout key with both values."""
    if stored is None:
        return
    flat = lambda m: {  # noqa: E731
        **m["stream"],
        **m["teacher"],
        **{f"layout.{k}": v for k, v in m["layout"].items()},
    }
    old, new = flat(stored), flat(manifest)
    problems = store.differences(
        {k: v for k, v in old.items() if k not in skip},
        {k: v for k, v in new.items() if k not in skip},
    )
    if problems:
        raise CacheError(
            f"The teacher cache in {workdir!r} was written with another config:\n  "
            + "\n  ".join(problems)
            + "\nUse the same config to complete it, or another --workdir for a new cache."
        )


def _write_member_caches(config, workdir, devices, ensemble) -> dict[str, Any]:
    """An ensemble's cache: each member's, written by this writer as that member's alone, in
    `workdir/<member>`; the summaries by member."""
    summaries = {}
    for member in ensemble:
        path = os.path.join(workdir, member.name)
        log.info("Teacher ensemble: member %r into %s", member.name, path)
        summaries[member.name] = write_cache(member.config, path, devices)
    weights = ",".join(f"{m.weight:.6g}" for m in ensemble)
    log.info(
        "Teacher ensemble cached; train from it with --config.teacher.cache=%s "
        "--config.teacher.cache_weights=%s",
        ",".join(os.path.join(workdir, m.name) for m in ensemble), weights,
    )  # fmt: skip
    return summaries


def _write_chunk(arrays, layout, epoch, steps, shares, outputs) -> list[Any]:
    """Starts the writes of one chunk per data share of this process; returns their futures."""
    dtypes = {
        "values": layout.values_dtype,
        "indices": layout.indices_dtype,
        store.EMBEDDINGS: layout.embedding_dtype,
        store.TEXT_EMBEDDINGS: layout.embedding_dtype,
    }
    stacked = {
        name: np.stack([o[i] for o in outputs]).astype(dtypes[name])
        for i, name in enumerate(layout.arrays)
    }
    rows = layout.share_batch
    futures = []
    for position, share in enumerate(shares):
        local = slice(position * rows, (position + 1) * rows)
        target = (epoch, slice(steps.start, steps.stop), slice(share * rows, (share + 1) * rows))
        # Which process writes which chunk (tests check that each writes only its own shares').
        log.debug(
            "Teacher cache: process %d writes chunk %s",
            jax.process_index(),
            store.chunk_key(epoch, steps.start // layout.chunk_steps, share),
        )
        for name, array in stacked.items():
            futures.append(arrays[name][target].write(array[:, local]).commit)
    return futures
