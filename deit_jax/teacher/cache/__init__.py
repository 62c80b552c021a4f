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
- `embeddings/` (with `teacher.cache_embeddings=True`): a third array, (epochs, steps per epoch,
  batch, D), each example's teacher embedding (pooled pre-logit features; a CLIP teacher's image
  embedding), float16 or float32, chunked as the others: `distillation.kind=feature` trains from
  it without the teacher.

Modules: `write` (the writer, `--config.mode=teacher_cache`; on an ensemble config, each
member's cache in `CACHE/<member>`), `read` (`CacheReader`, the student's side), `mix` (several
caches mixed at read time), `store` (what fixes a cache: layout, fingerprints, manifest, the
TensorStore arrays), `targets` (the teacher logits the loss takes, rebuilt from a batch's top-k).

Soft targets from the top-k follow TinyViT: the leftover probability mass is spread evenly over
the other classes (exact when k is the class count); hard distillation needs only the top-1.
"""

from deit_jax._compat import lazy_names

# Imported on first use: the train step needs only `targets` (pure jnp), not TensorStore.
_NAMES = {
    "CacheError": "store",
    "CacheStore": "store",
    "CacheReader": "read",
    "write_cache": "write",
    "cached_teacher_logits": "targets",
    "full_log_probs": "targets",
    "required_topk": "targets",
}
__all__ = sorted(_NAMES)

__getattr__ = lazy_names("deit_jax.teacher.cache", _NAMES)
