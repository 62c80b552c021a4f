"""The tokenizer that belongs to a CLIP's weights, as a function from strings to token ids.

`load_tokenizer(path)`: a transformers CLIP directory, or a deit_jax weights directory converted
from one (`python -m deit_jax.convert` copies the tokenizer files into its `tokenizer/`), gets
that directory's own `CLIPTokenizer`; an open_clip / OpenAI file, or a weights directory
converted from one, gets open_clip's tokenizer, whose BPE vocabulary ships in its wheel. Nothing
is re-implemented: the ids are the reference tokenizers' ids.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import numpy as np

from deit_jax.errors import DependencyError, WeightsNotFoundError
from deit_jax.weights.directory import METADATA_FILE
from deit_jax.weights.hf_clip import hf_config, is_hf_dir

Tokenizer = Callable[[Sequence[str]], np.ndarray]


def _context_length(weights_dir: str) -> int:
    with open(os.path.join(weights_dir, METADATA_FILE)) as f:
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


def tokenizer_spec(path: str) -> tuple[str, ...]:
    """Which tokenizer the CLIP weights at `path` take: `("open_clip", context_length)` or
    `("transformers", directory, context_length)`. Equal specs tokenize alike."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightsNotFoundError(f"CLIP weights {path!r} do not exist; no tokenizer to load.")
    if not os.path.isdir(path):
        return ("open_clip", "77")
    if os.path.isfile(os.path.join(path, METADATA_FILE)):  # a deit_jax weights dir
        context_length = str(_context_length(path))
        own = os.path.join(path, "tokenizer")
        if os.path.isfile(os.path.join(own, "vocab.json")):
            return ("transformers", own, context_length)
        return ("open_clip", context_length)
    if is_hf_dir(path):
        context_length = hf_config(path)["text_config"]["max_position_embeddings"]
        return ("transformers", path, str(context_length))
    raise WeightsNotFoundError(
        f"{path!r} is neither a deit_jax weights directory nor a transformers CLIP directory: "
        "no tokenizer found for it."
    )


def tokenizer_of(spec: tuple[str, ...]) -> Tokenizer:
    """The tokenizer a `tokenizer_spec` names."""
    if spec[0] == "open_clip":
        return _open_clip_tokenizer(int(spec[1]))
    return _hf_tokenizer(spec[1], int(spec[2]))


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of the CLIP weights at `path` (see the module docstring), `padding to
    max_length (77)` with truncation, as the reference pipelines call them."""
    return tokenizer_of(tokenizer_spec(path))
