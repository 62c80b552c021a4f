"""One way in for weights, whatever their format, for the student and the teacher alike.

- `load_weights(path, model_name)`: a deit_jax weights directory, a PyTorch / safetensors file
  (timm's or the official DeiT keys; for CLIP, open_clip's or OpenAI's, also OpenAI's
  TorchScript `.pt`) or a transformers CLIP directory, as `(variables, overrides)`: what
  `config.teacher.checkpoint` and `config.init_from` name.
- `torch_to_flax` / `flax_to_torch`: a state dict of the model family that `model_name` belongs
  to (`deit_jax.weights.timm_keys` for DeiT and the convnets, `deit_jax.weights.clip` for CLIP).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from deit_jax.errors import CheckpointError
from deit_jax.models import model_options
from deit_jax.weights import clip, directory, timm_keys
from deit_jax.weights.hf_clip import hf_config, hf_overrides, is_hf_dir
from deit_jax.weights.state_dict import read_state_dict


def is_clip(model_name: str) -> bool:
    """Whether `model_name` is a CLIP (its weights convert through `deit_jax.weights.clip`)."""
    return "text_width" in model_options(model_name)


def torch_to_flax(state_dict: Mapping[str, Any], model_name: str, **overrides: Any) -> Any:
    """A PyTorch state dict -> Flax variables of `model_name` (`create_model` `overrides`).

    DeiT and the convnets take timm's or the official DeiT's keys: another `img_size` resizes
    the position embeddings, another `num_classes` re-initialises the heads, with a warning.
    A CLIP takes open_clip's, OpenAI's or transformers' keys; its sizes are read from the shapes
    (`overrides` win). Any missing, unexpected or mis-shaped key raises
    `CheckpointMismatchError` listing all of them.
    """
    family = clip if is_clip(model_name) else timm_keys
    return family.torch_to_flax(state_dict, model_name, **overrides)


def flax_to_torch(variables: Mapping[str, Any], model_name: str | None = None) -> dict[str, Any]:
    """Flax variables -> a PyTorch state dict: timm's for DeiT and the convnets (`model_name`,
    when given, is checked first), open_clip's for CLIP (`deit_jax.weights.clip.flax_to_hf`
    gives transformers')."""
    if "visual" in variables.get("params", {}):
        return clip.flax_to_open_clip(variables)
    return timm_keys.flax_to_torch(variables, model_name)


def inferred_overrides(path: str | os.PathLike, model_name: str) -> dict[str, Any]:
    """What a PyTorch file or transformers directory says about the model, as `create_model`
    overrides: a CLIP's sizes and activation; nothing for the DeiT models and convnets."""
    if not is_clip(model_name):
        return {}
    if is_hf_dir(path):
        return hf_overrides(hf_config(path))
    return clip.read_weights(path)[1]


def load_with_overrides(
    path: str | os.PathLike, model_name: str, **overrides: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A PyTorch file (or a transformers CLIP directory) converted for `model_name`, and the
    overrides the model was built with: the file's `inferred_overrides` updated by `overrides`
    (the file is read once)."""
    if is_clip(model_name):
        state, inferred = clip.read_weights(path)
        overrides = {**inferred, **overrides}
        return clip.open_clip_to_flax(state, model_name, **overrides), overrides
    return timm_keys.torch_to_flax(read_state_dict(path), model_name, **overrides), overrides


def load_torch_checkpoint(
    path: str | os.PathLike, model_name: str, **overrides: Any
) -> dict[str, Any]:
    """The variables of `load_with_overrides`: a PyTorch checkpoint converted with
    `torch_to_flax` (for CLIP also a transformers directory or an OpenAI TorchScript archive)."""
    return load_with_overrides(path, model_name, **overrides)[0]


def load_weights(path: str, model_name: str) -> tuple[Any, dict[str, Any]]:
    """`(variables, model_overrides)` from a deit_jax weights directory, a PyTorch / safetensors
    checkpoint file or, for CLIP, a transformers CLIP directory; the overrides are those the
    weights were saved with, or what the file says about the model (`inferred_overrides`: a
    CLIP's sizes and activation; empty for the others, the registered defaults)."""
    if os.path.isfile(path) or is_hf_dir(path):
        return load_with_overrides(path, model_name)
    variables, metadata = directory.load_variables(path)
    if metadata["model_name"] != model_name:
        raise CheckpointError(
            f"{path!r} holds weights of {metadata['model_name']!r}, not {model_name!r}; set "
            "the model name to match the weights."
        )
    return variables, metadata["model_overrides"]
