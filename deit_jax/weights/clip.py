"""CLIP weights: open_clip / OpenAI state dicts and files <-> Flax variables.

The Flax CLIP (`deit_jax.models.clip`) is named after open_clip, so open_clip keys map by rule:

  flax path (params/...)                 open_clip key
  visual/conv1                       ->  visual.conv1.weight                   (HWIO -> OIHW)
  visual/transformer/resblocks_3/attn/in_proj/kernel
                                     ->  visual.transformer.resblocks.3.attn.in_proj_weight (.T)
  text/transformer/resblocks_0/mlp/c_fc/kernel
                                     ->  transformer.resblocks.0.mlp.c_fc.weight  (transposed)
  text/token_embedding               ->  token_embedding.weight
  text/ln_final/scale                ->  ln_final.weight
  visual/proj, text/text_projection  ->  visual.proj, text_projection          (as is: x @ proj)

transformers' `CLIPModel` keys go through open_clip's (`deit_jax.weights.hf_clip`), OpenAI's
TorchScript archives are read as data (`deit_jax.weights.torchscript`). What a file says about
the model (sizes, the activation) comes back from `read_weights` as `create_model` overrides:
shapes give the sizes; the activation comes from a transformers `config.json` (`hidden_act`),
from an `open_clip_config.json` beside an open_clip file (as the hub's open_clip repositories
ship) or its `<stem>.json` model config (as deit_jax's export writes it; both also give the
heads, which the shapes do not), or from the format itself (OpenAI's TorchScript archives are
QuickGELU models). A bare state dict does not say: exact GELU (open_clip's default) is
assumed, with a warning naming the override for OpenAI weights.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from deit_jax import _compat
from deit_jax.errors import CheckpointError
from deit_jax.models import create_model
from deit_jax.weights import state_dict as state_dicts
from deit_jax.weights.hf_clip import (
    hf_config,
    hf_overrides,
    hf_to_open_clip,
    is_hf_dir,
    open_clip_to_hf,
    read_hf_dir,
)
from deit_jax.weights.state_dict import read_state_dict, unwrap_state_dict
from deit_jax.weights.torchscript import is_torchscript, read_torchscript

log = logging.getLogger(__name__)

# Tensors an open_clip / OpenAI file holds that are not weights: the causal mask, and the ints
# OpenAI's TorchScript models keep as tensors (openai/CLIP's build_model drops the same).
_NOT_WEIGHTS = re.compile(r"(^|\.)(attn_mask|input_resolution|context_length|vocab_size)$")


# --------------------------------------------------------------------------- open_clip / OpenAI


def normalize_open_clip(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drops a DDP `module.` prefix and the tensors that are not weights (`_NOT_WEIGHTS`)."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if not _NOT_WEIGHTS.search(key):
            out[key] = value
    return out


def _count_blocks(state_dict: Mapping[str, Any], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
    found = {int(m[1]) for k in state_dict if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def open_clip_overrides(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Sizes from the shapes of an open_clip state dict (heads: width / 64, as open_clip)."""
    try:
        conv = np.shape(state_dict["visual.conv1.weight"])
        grid = np.shape(state_dict["visual.positional_embedding"])[0] - 1
        text_width = np.shape(state_dict["ln_final.weight"])[0]
        fc = np.shape(state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"])
        text_fc = np.shape(state_dict["transformer.resblocks.0.mlp.c_fc.weight"])
        overrides = dict(
            embed_dim=np.shape(state_dict["visual.proj"])[1],
            img_size=round(grid**0.5) * conv[-1],
            patch_size=conv[-1],
            vision_width=conv[0],
            vision_layers=_count_blocks(state_dict, "visual."),
            vision_heads=max(conv[0] // 64, 1),
            text_width=text_width,
            text_layers=_count_blocks(state_dict, ""),
            text_heads=max(text_width // 64, 1),
            context_length=np.shape(state_dict["positional_embedding"])[0],
            vocab_size=np.shape(state_dict["token_embedding.weight"])[0],
            mlp_ratio=fc[0] / conv[0],
        )
    except KeyError as e:
        raise CheckpointError(
            f"Not an open_clip / OpenAI ViT CLIP state dict: no {e.args[0]!r} (ResNet towers and "
            "custom text towers are not supported)."
        ) from None
    if text_fc[0] / text_width != overrides["mlp_ratio"]:
        raise CheckpointError("The towers' MLP ratios differ: not supported by deit_jax's CLIP.")
    return {k: v if isinstance(v, float) else int(v) for k, v in overrides.items()}


def _open_clip_model_cfg(path: str) -> dict[str, Any] | None:
    """open_clip's model config beside an open_clip file, if any: the `model_cfg` of an
    open_clip_config.json (the hub's layout), or the `<stem>.json` beside `<stem>.safetensors`
    (open_clip's `model_configs` format, as `python -m deit_jax.export --format open_clip`
    writes it)."""
    hub = os.path.join(os.path.dirname(os.path.abspath(path)), "open_clip_config.json")
    if os.path.isfile(hub):
        with open(hub) as f:
            return json.load(f).get("model_cfg", {})
    config = f"{os.path.splitext(os.path.abspath(path))[0]}.json"
    if not os.path.isfile(config):
        return None
    with open(config) as f:
        model_cfg = json.load(f)
    needed = {"embed_dim", "vision_cfg", "text_cfg"}
    if not isinstance(model_cfg, dict) or not needed <= set(model_cfg):
        return None  # another JSON file: open_clip registers only these (its _rescan)
    return model_cfg


def _config_heads(model_cfg: Mapping[str, Any], vision_width: int) -> dict[str, int]:
    """The heads open_clip builds from its config, which the shapes do not give: vision width /
    `head_width` and text `heads` (open_clip's defaults: 64 and 8)."""
    heads = {}
    if "vision_cfg" in model_cfg:
        heads["vision_heads"] = vision_width // int(model_cfg["vision_cfg"].get("head_width", 64))
    if "text_cfg" in model_cfg:
        heads["text_heads"] = int(model_cfg["text_cfg"].get("heads", 8))
    return heads


# --------------------------------------------------------------------------- flax <-> open_clip

_LEAF = {"scale": "weight", "kernel": "weight"}


def open_clip_key(path: tuple[str, ...]) -> str:
    """A Flax params path (without 'params') -> its open_clip key."""
    *modules, leaf = path
    if modules[:1] == ["text"]:  # open_clip keeps the text tower at the top level
        modules = modules[1:]
    modules = [re.sub(r"^resblocks_(\d+)$", r"resblocks.\1", m) for m in modules]
    if modules[-1:] == ["in_proj"]:  # nn.MultiheadAttention's fused in_proj_weight / _bias
        modules, leaf = modules[:-1], f"in_proj_{_LEAF.get(leaf, leaf)}"
    elif leaf in ("conv1", "token_embedding"):  # raw parameters standing for whole modules
        modules, leaf = [*modules, leaf], "weight"
    else:
        leaf = _LEAF.get(leaf, leaf)
    return ".".join([*modules, leaf])


def to_flax_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] == "conv1":  # OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    if path[-1] == "kernel":  # Linear (out, in) -> (in, out)
        return value.T
    return value


def to_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] == "conv1":
        return value.transpose(3, 2, 0, 1)
    if path[-1] == "kernel":
        return value.T
    return value


def open_clip_state(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Any CLIP state dict (open_clip's, OpenAI's, transformers', wrapped or not) in open_clip's
    keys, without the tensors that are not weights."""
    state = normalize_open_clip(unwrap_state_dict(state_dict))
    if any(k.startswith(("vision_model.", "text_model.")) for k in state):
        state = hf_to_open_clip(state)
    return state


def torch_to_flax(
    state_dict: Mapping[str, Any], model_name: str, **overrides: Any
) -> dict[str, Any]:
    """An open_clip / OpenAI or transformers state dict -> Flax variables of `model_name`.

    The sizes are read from the shapes (`open_clip_overrides`; `overrides` win); every missing,
    unexpected or mis-shaped key is reported at once, as for the DeiT models.
    """
    state = open_clip_state(state_dict)
    return open_clip_to_flax(state, model_name, **{**open_clip_overrides(state), **overrides})


def open_clip_to_flax(
    state: Mapping[str, Any], model_name: str, **overrides: Any
) -> dict[str, Any]:
    """`torch_to_flax` of a state dict already in open_clip's keys (`open_clip_state`), for the
    model `create_model(model_name, **overrides)`."""
    model = create_model(model_name, **overrides)
    shapes = {k: v for k, v in state_dicts.template(model).items() if k[0] == "params"}
    converted, _ = state_dicts.match(
        state,
        shapes,
        key=lambda path: open_clip_key(path[1:]),
        layout=to_flax_layout,
        model_name=model_name,
        overrides=overrides,
        hint="Check that --model names a CLIP of the checkpoint's family (clip_vit_*).",
    )
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in converted.items()})


def flax_to_open_clip(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Flax CLIP variables -> an open_clip `CLIP` state dict (torch tensors) that
    `open_clip.create_model(...).load_state_dict(..., strict=True)` accepts."""
    torch = _compat.import_torch()
    flat = traverse_util.flatten_dict(nn.meta.unbox(dict(variables)["params"]))
    return {
        open_clip_key(path): torch.from_numpy(
            np.array(to_torch_layout(path, np.asarray(value)), order="C", copy=True)
        )
        for path, value in flat.items()
    }


def flax_to_hf(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Flax CLIP variables -> a transformers `CLIPModel` state dict (torch tensors)."""
    torch = _compat.import_torch()
    state = {k: v.numpy() for k, v in flax_to_open_clip(variables).items()}
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in open_clip_to_hf(state).items()}


# --------------------------------------------------------------------------- files


def read_weights(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(open_clip-keyed state dict, inferred overrides)` of a CLIP file or transformers dir."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if not is_hf_dir(path):
            raise CheckpointError(
                f"{path!r} is neither a deit_jax weights directory nor a transformers CLIP "
                "directory (config.json of model_type 'clip')."
            )
        state = normalize_open_clip(hf_to_open_clip(read_hf_dir(path)))
        return state, hf_overrides(hf_config(path))
    model_cfg = _open_clip_model_cfg(path)
    quick_gelu = None if model_cfg is None else bool(model_cfg.get("quick_gelu", False))
    if os.path.isfile(path) and is_torchscript(path):
        state, quick_gelu = read_torchscript(path), True  # OpenAI's TorchScript models
    else:
        state = read_state_dict(path)
        if any(k.startswith(("vision_model.", "text_model.")) for k in state):
            state = hf_to_open_clip(state)
    if quick_gelu is None and any(_NOT_WEIGHTS.search(k) for k in state if "attn_mask" not in k):
        quick_gelu = True  # OpenAI's own state dicts keep input_resolution / context_length
    state = normalize_open_clip(state)
    overrides = open_clip_overrides(state)
    overrides.update(_config_heads(model_cfg or {}, overrides["vision_width"]))
    if quick_gelu is None:
        log.warning(
            "%s does not say which activation its CLIP uses: assuming exact GELU (open_clip's "
            "default). OpenAI's weights need QuickGELU: convert them with --quick-gelu "
            "(quick_gelu=True).",
            path,
        )
        quick_gelu = False
    overrides["quick_gelu"] = quick_gelu
    return state, overrides
