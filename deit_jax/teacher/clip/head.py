"""CLIP's zero-shot head: the text tower's embedding of every class prompt, computed once.

`zero_shot_head(...)` is open_clip's `build_zero_shot_classifier` in JAX: per class, the mean
over the prompt templates of the L2-normalised text embeddings, normalised again; W is (D, C).
A run keeps its head in its workdir (`zero_shot_head/head.npy`, with `fingerprint.json`: class
names, templates, teacher name, SHA-256 of the weights); `zero_shot_head_for` reuses a saved
head after checking its fingerprint against the run's, and refuses one built from other names,
templates or weights, naming what changed.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorstore as ts

from deit_jax.data import labels
from deit_jax.errors import CheckpointError, ConfigError
from deit_jax.jit import jit
from deit_jax.models.layers import l2_normalize
from deit_jax.weights.directory import weights_hash
from deit_jax.weights.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

HEAD_DIR = "zero_shot_head"
Template = str | Callable[[str], str]


def zero_shot_head(
    model: nn.Module,
    variables: Any,
    class_names: Sequence[str],
    templates: Sequence[Template],
    tokenize: Tokenizer,
    *,
    batch_size: int = 256,
) -> np.ndarray:
    """(D, C) float32 zero-shot classifier weights, as open_clip's `build_zero_shot_classifier`.

    `templates` are format strings with `{}` (or callables of the class name, as open_clip's).
    The text tower runs jitted on fixed-size batches of `batch_size` prompts (the last padded),
    so one compilation serves any number of classes.
    """
    if not class_names or not templates:
        raise ValueError("zero_shot_head needs at least one class name and one template.")
    texts = [
        t.format(name) if isinstance(t, str) else t(name) for name in class_names for t in templates
    ]
    ids = np.asarray(tokenize(texts), np.int32)
    batch = min(batch_size, len(texts))
    padded = np.concatenate([ids, np.repeat(ids[:1], -len(ids) % batch, axis=0)])

    @jit
    def embed(v, chunk):
        text = model.apply(v, chunk, method="encode_text").astype(jnp.float32)
        return l2_normalize(text)

    chunks = [embed(variables, padded[i : i + batch]) for i in range(0, len(padded), batch)]
    embeddings = np.concatenate([np.asarray(c) for c in chunks])[: len(texts)]
    per_class = embeddings.reshape(len(class_names), len(templates), -1).mean(axis=1)
    per_class /= np.linalg.norm(per_class, axis=-1, keepdims=True)
    return np.ascontiguousarray(per_class.T, np.float32)


# --------------------------------------------------------------------------- saved heads


def _first_difference(kind: str, saved: list[str], now: list[str]) -> str:
    for i, (a, b) in enumerate(zip(saved, now, strict=False)):
        if a != b:
            return f"{kind} {i + 1}: saved {a!r}, now {b!r}"
    longer, extra = (saved, "saved") if len(saved) > len(now) else (now, "now")
    return f"{kind} {min(len(saved), len(now)) + 1}: only {extra} {longer[len(longer) - 1]!r}"


def fingerprint(
    config: ml_collections.ConfigDict, names: list[str], templates: list[str]
) -> dict[str, Any]:
    """What fixes the head: teacher name, SHA-256 of its weights, class names and templates."""
    return {
        "teacher.name": config.teacher.name,
        "teacher.checkpoint": config.teacher.checkpoint,  # informative: moved weights are fine
        "weights_sha256": weights_hash(config.teacher.checkpoint),
        "class_names": list(names),
        "templates": list(templates),
    }


def check_fingerprint(
    saved: dict[str, Any], current: dict[str, Any], config: ml_collections.ConfigDict, where: str
) -> None:
    """Refuses a saved head that another teacher, other weights, names or templates built."""
    t = config.teacher
    reuse = (
        "A resumed run, a teacher cache and the runs that read it keep the teacher they started "
        "with: use the saved value, or another --workdir for a new head."
    )
    problems = []
    if saved["class_names"] != current["class_names"]:
        problems.append(
            f"config.teacher.class_names={t.class_names!r}: the zero-shot head saved in {where} "
            f"was built for other class names ({len(saved['class_names'])} saved, "
            f"{len(current['class_names'])} now; "
            f"{_first_difference('class', saved['class_names'], current['class_names'])}). {reuse}"
        )
    if saved["templates"] != current["templates"]:
        problems.append(
            f"config.teacher.prompts={t.prompts!r}: the zero-shot head saved in {where} was built "
            f"with other prompt templates ({len(saved['templates'])} saved, "
            f"{len(current['templates'])} now; "
            f"{_first_difference('template', saved['templates'], current['templates'])}). {reuse}"
        )
    for key, config_key in (("teacher.name", "name"), ("weights_sha256", "checkpoint")):
        if saved[key] != current[key]:
            problems.append(
                f"config.teacher.{config_key}={t[config_key]!r}: the zero-shot head saved in "
                f"{where} was built from another teacher ({key} {saved[key]!r}, now "
                f"{current[key]!r}). {reuse}"
            )
    if problems:
        raise ConfigError(problems)


# --------------------------------------------------------------------------- storage


def _kvstore(directory: str) -> ts.KvStore:
    path = directory.rstrip("/") + "/" + HEAD_DIR + "/"
    spec = path if "://" in directory else {"driver": "file", "path": os.path.abspath(path) + "/"}
    return ts.KvStore.open(spec).result()


def read_head(directory: str) -> tuple[np.ndarray, dict[str, Any]] | None:
    """(W, fingerprint) saved in `directory`, or None."""
    store = _kvstore(directory)
    meta, values = store.read("fingerprint.json").result(), store.read("head.npy").result()
    if meta.state != "value" or values.state != "value":
        return None
    head = np.load(io.BytesIO(bytes(values.value)), allow_pickle=False)
    return head, json.loads(bytes(meta.value))


def write_head(directory: str, head: np.ndarray, meta: dict[str, Any]) -> None:
    """Saves W and its fingerprint (the fingerprint last: a head without one is not read)."""
    store = _kvstore(directory)
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(head, np.float32), allow_pickle=False)
    store.write("head.npy", buffer.getvalue()).result()
    store.write("fingerprint.json", json.dumps(meta, indent=1)).result()


# --------------------------------------------------------------------------- a run's head


def zero_shot_head_for(
    config: ml_collections.ConfigDict,
    clip: nn.Module,
    variables: Any,
    names: list[str],
    templates: list[str],
    directories: list[str],
) -> np.ndarray:
    """W for this run: the one saved in the first of `directories` that has one (checked
    against this run's fingerprint), else computed by the text tower; saved into
    `directories[0]` (the run's workdir) when it has none."""
    current = fingerprint(config, names, templates)
    head, found_in = None, None
    for directory in directories:
        saved = read_head(directory)
        if saved is not None:
            check_fingerprint(saved[1], current, config, os.path.join(directory, HEAD_DIR))
            head, found_in = saved[0], directory
            log.info("Zero-shot head: reused %s", os.path.join(directory, HEAD_DIR))
            break
    if head is None:
        start = time.perf_counter()
        tokenize = load_tokenizer(config.teacher.checkpoint)
        fill = [functools.partial(labels.fill, t) for t in templates]
        # Once, in float32 whatever the run's dtype.
        head = zero_shot_head(clip.clone(dtype=jnp.float32), variables, names, fill, tokenize)
        log.info(
            "Zero-shot head: %d classes x %d templates through the text tower in %.1f s.",
            len(names), len(templates), time.perf_counter() - start,
        )  # fmt: skip
    head = np.asarray(head, np.float32)
    if head.shape != (clip.embed_dim, len(names)):
        raise CheckpointError(
            f"The zero-shot head has shape {head.shape}, expected ({clip.embed_dim}, {len(names)})."
        )
    if directories and found_in != directories[0] and jax.process_index() == 0:
        write_head(directories[0], head, current)
        log.info("Zero-shot head saved in %s", os.path.join(directories[0], HEAD_DIR))
    return head
