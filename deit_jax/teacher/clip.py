"""CLIP as a zero-shot teacher: the real tokenizers and the zero-shot head.

- `load_tokenizer(path)`: the tokenizer that belongs to the weights at `path`, as a function from
  strings to (N, context_length) int32 ids. A transformers CLIP directory, or a deit_jax weights
  directory converted from one (`python -m deit_jax.convert` copies the tokenizer files into its
  `tokenizer/`), gets that directory's own `CLIPTokenizer`; an open_clip / OpenAI file, or a
  weights directory converted from one, gets open_clip's tokenizer, whose BPE vocabulary ships in
  its wheel. Nothing is re-implemented: the ids are the reference tokenizers' ids.
- `zero_shot_head(...)`: open_clip's `build_zero_shot_classifier` in JAX: per class, the mean
  over the prompt templates of the L2-normalised text embeddings, normalised again; W is (D, C).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deit_jax import checkpoint, convert_clip
from deit_jax.errors import DependencyError, WeightsNotFoundError
from deit_jax.jit import jit

Tokenizer = Callable[[Sequence[str]], np.ndarray]
Template = str | Callable[[str], str]


def _context_length(weights_dir: str) -> int:
    with open(os.path.join(weights_dir, checkpoint.METADATA_FILE)) as f:
        return int(json.load(f).get("model_overrides", {}).get("context_length", 77))


def _hf_tokenizer(directory: str, context_length: int) -> Tokenizer:
    try:
        from transformers import CLIPTokenizer
    except ImportError as e:
        raise DependencyError(
            "The tokenizer of a transformers CLIP needs transformers: pip install -e '.[torch]'."
        ) from e
    tokenizer = CLIPTokenizer.from_pretrained(directory)

    def tokenize(texts: Sequence[str]) -> np.ndarray:
        ids = tokenizer(
            list(texts),
            padding="max_length",
            max_length=context_length,
            truncation=True,
            return_tensors="np",
        )["input_ids"]
        return np.asarray(ids, np.int32)

    return tokenize


def _open_clip_tokenizer(context_length: int) -> Tokenizer:
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError as e:
        raise DependencyError(
            "The tokenizer of open_clip / OpenAI CLIP weights is open_clip's: pip install -e "
            "'.[torch]' (open_clip_torch, with ftfy and regex)."
        ) from e
    tokenizer = SimpleTokenizer(context_length=context_length)

    def tokenize(texts: Sequence[str]) -> np.ndarray:
        return tokenizer(list(texts)).numpy().astype(np.int32)

    return tokenize


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of the CLIP weights at `path` (see the module docstring), `padding to
    max_length (77)` with truncation, as the reference pipelines call them."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightsNotFoundError(f"CLIP weights {path!r} do not exist; no tokenizer to load.")
    if not os.path.isdir(path):
        return _open_clip_tokenizer(77)
    if os.path.isfile(os.path.join(path, checkpoint.METADATA_FILE)):  # a deit_jax weights dir
        context_length = _context_length(path)
        own = os.path.join(path, "tokenizer")
        if os.path.isfile(os.path.join(own, "vocab.json")):
            return _hf_tokenizer(own, context_length)
        return _open_clip_tokenizer(context_length)
    if convert_clip.is_hf_dir(path):
        context_length = convert_clip.hf_config(path)["text_config"]["max_position_embeddings"]
        return _hf_tokenizer(path, context_length)
    raise WeightsNotFoundError(
        f"{path!r} is neither a deit_jax weights directory nor a transformers CLIP directory: "
        "no tokenizer found for it."
    )


def _l2_normalize(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


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
        return _l2_normalize(text)

    chunks = [embed(variables, padded[i : i + batch]) for i in range(0, len(padded), batch)]
    embeddings = np.concatenate([np.asarray(c) for c in chunks])[: len(texts)]
    per_class = embeddings.reshape(len(class_names), len(templates), -1).mean(axis=1)
    per_class /= np.linalg.norm(per_class, axis=-1, keepdims=True)
    return np.ascontiguousarray(per_class.T, np.float32)
