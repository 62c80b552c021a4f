"""CLIP weights: open_clip / OpenAI state dicts and transformers CLIP directories <-> Flax.

`deit_jax.convert` dispatches here for the `clip_*` models. The Flax CLIP (deit_jax.models.clip)
is named after open_clip, so open_clip keys map by rule:

  flax path (params/...)                 open_clip key
  visual/conv1                       ->  visual.conv1.weight                   (HWIO -> OIHW)
  visual/transformer/resblocks_3/attn/in_proj/kernel
                                     ->  visual.transformer.resblocks.3.attn.in_proj_weight (.T)
  text/transformer/resblocks_0/mlp/c_fc/kernel
                                     ->  transformer.resblocks.0.mlp.c_fc.weight  (transposed)
  text/token_embedding               ->  token_embedding.weight
  text/ln_final/scale                ->  ln_final.weight
  visual/proj, text/text_projection  ->  visual.proj, text_projection          (as is: x @ proj)

A transformers `CLIPModel` state dict is first rewritten into open_clip keys (`hf_to_open_clip`:
q, k, v concatenated into `in_proj`, `visual_projection.weight` transposed into `visual.proj`, ...)
and back (`open_clip_to_hf`). Both are exact (copies and transposes only).

What a file says about the model (sizes, the activation) comes back from `inferred_overrides` as
`create_model` overrides: shapes give the sizes; the activation comes from a transformers
`config.json` (`hidden_act`), from an `open_clip_config.json` beside an open_clip file (as the
hub's open_clip repositories ship), or from the format itself (OpenAI's TorchScript archives are
QuickGELU models). A bare state dict does not say: exact GELU (open_clip's default) is assumed,
with a warning naming the override for OpenAI weights.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from deit_jax.errors import CheckpointError

log = logging.getLogger(__name__)

# transformers' CLIPConfig defaults (5.x), for keys a `save_pretrained` config.json leaves out
# (it writes only the values that differ from them). tests/test_clip_convert.py checks them.
HF_DEFAULTS = {
    "projection_dim": 512,
    "text_config": dict(
        hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
        max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    ),
    "vision_config": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    ),
}  # fmt: skip
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = (
    "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json",
)  # fmt: skip
# Tensors an open_clip / OpenAI file holds that are not weights: the causal mask, and the ints
# OpenAI's TorchScript models keep as tensors (openai/CLIP's build_model drops the same).
_NOT_WEIGHTS = re.compile(r"(^|\.)(attn_mask|input_resolution|context_length|vocab_size)$")


# --------------------------------------------------------------------------- transformers


def is_hf_dir(path: str | os.PathLike) -> bool:
    """A transformers CLIP model directory: config.json of model_type 'clip' and weights."""
    config = os.path.join(path, "config.json")
    if not (os.path.isdir(path) and os.path.isfile(config)):
        return False
    with open(config) as f:
        return json.load(f).get("model_type") == "clip"


def hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json with transformers' defaults filled in for the keys it leaves out."""
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    config = {"projection_dim": raw.get("projection_dim", HF_DEFAULTS["projection_dim"])}
    for tower in ("text_config", "vision_config"):
        config[tower] = {**HF_DEFAULTS[tower], **(raw.get(tower) or {})}
    config["text_config"].setdefault("eos_token_id", 49407)
    return config


def read_hf_dir(path: str | os.PathLike) -> dict[str, Any]:
    """The state dict of a transformers CLIP directory (safetensors preferred, one file)."""
    from deit_jax import convert

    for name in HF_WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return convert.read_state_dict(os.path.join(path, name))
    raise CheckpointError(
        f"{os.fspath(path)!r} has a CLIP config.json but no {' or '.join(HF_WEIGHT_FILES)} "
        "(sharded checkpoints: save the model again with save_pretrained(max_shard_size='10GB'))."
    )


def hf_overrides(config: Mapping[str, Any]) -> dict[str, Any]:
    """`create_model` overrides for a transformers CLIPConfig (as `hf_config` returns it)."""
    text, vision = config["text_config"], config["vision_config"]
    ratios = {vision["intermediate_size"] / vision["hidden_size"]}
    ratios.add(text["intermediate_size"] / text["hidden_size"])
    acts = {text["hidden_act"], vision["hidden_act"]}
    problems = []
    if len(ratios) > 1:
        problems.append(f"MLP ratios differ between the towers ({sorted(ratios)})")
    if len(acts) > 1 or not acts <= {"quick_gelu", "gelu"}:
        problems.append(f"activations {sorted(acts)} (supported: one of quick_gelu, gelu)")
    for tower in (text, vision):
        if tower["layer_norm_eps"] != 1e-5:
            problems.append(f"layer_norm_eps={tower['layer_norm_eps']} (supported: 1e-5)")
    if text.get("eos_token_id", 49407) not in (2, text["vocab_size"] - 1):
        # deit_jax pools at argmax(ids), transformers at the first eos_token_id: the same token
        # only when the end-of-text id is the largest (OpenAI's vocabulary, 49407).
        problems.append(f"eos_token_id={text['eos_token_id']} (supported: vocab_size - 1)")
    if problems:
        raise CheckpointError("This transformers CLIP is not supported: " + "; ".join(problems))
    return dict(
        embed_dim=config["projection_dim"],
        img_size=vision["image_size"],
        patch_size=vision["patch_size"],
        vision_width=vision["hidden_size"],
        vision_layers=vision["num_hidden_layers"],
        vision_heads=vision["num_attention_heads"],
        text_width=text["hidden_size"],
        text_layers=text["num_hidden_layers"],
        text_heads=text["num_attention_heads"],
        context_length=text["max_position_embeddings"],
        vocab_size=text["vocab_size"],
        mlp_ratio=ratios.pop(),
        quick_gelu=acts.pop() == "quick_gelu",
    )


_HF_BLOCK = {  # open_clip block suffix -> transformers encoder layer suffix
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}  # fmt: skip
_HF_PLAIN = {  # open_clip key -> (transformers key, transposed)
    "visual.conv1.weight": ("vision_model.embeddings.patch_embedding.weight", False),
    "visual.class_embedding": ("vision_model.embeddings.class_embedding", False),
    "visual.positional_embedding": ("vision_model.embeddings.position_embedding.weight", False),
    "visual.ln_pre.weight": ("vision_model.pre_layrnorm.weight", False),
    "visual.ln_pre.bias": ("vision_model.pre_layrnorm.bias", False),
    "visual.ln_post.weight": ("vision_model.post_layernorm.weight", False),
    "visual.ln_post.bias": ("vision_model.post_layernorm.bias", False),
    "visual.proj": ("visual_projection.weight", True),
    "token_embedding.weight": ("text_model.embeddings.token_embedding.weight", False),
    "positional_embedding": ("text_model.embeddings.position_embedding.weight", False),
    "ln_final.weight": ("text_model.final_layer_norm.weight", False),
    "ln_final.bias": ("text_model.final_layer_norm.bias", False),
    "text_projection": ("text_projection.weight", True),
    "logit_scale": ("logit_scale", False),
}
_OC_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)$")


def open_clip_to_hf(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """open_clip keys -> transformers `CLIPModel` keys (numpy arrays; exact)."""
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        value = np.asarray(value)
        if key in _HF_PLAIN:
            hf_key, transposed = _HF_PLAIN[key]
            out[hf_key] = np.ascontiguousarray(value.T) if transposed else value
            continue
        match = _OC_BLOCK.match(key)
        if not match:
            raise CheckpointError(f"No transformers key for open_clip key {key!r}.")
        tower = "vision_model" if match[1] else "text_model"
        layer, rest = f"{tower}.encoder.layers.{match[2]}.", match[3]
        if rest.startswith("attn.in_proj_"):
            kind = rest.removeprefix("attn.in_proj_")
            for name, part in zip("qkv", np.split(value, 3, axis=0), strict=True):
                out[f"{layer}self_attn.{name}_proj.{kind}"] = np.ascontiguousarray(part)
            continue
        module, leaf = rest.rsplit(".", 1)
        out[f"{layer}{_HF_BLOCK[module]}.{leaf}"] = value
    return out


def hf_to_open_clip(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """transformers `CLIPModel` keys -> open_clip keys (exact); unknown keys are kept as they
    are, for the caller's mismatch report. `position_ids` buffers are dropped."""
    plain = {hf: (oc, t) for oc, (hf, t) in _HF_PLAIN.items()}
    block = {hf: oc for oc, hf in _HF_BLOCK.items()}
    out: dict[str, Any] = {}
    qkv: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            continue
        if key in plain:
            oc_key, transposed = plain[key]
            out[oc_key] = np.ascontiguousarray(np.asarray(value).T) if transposed else value
            continue
        match = _HF_LAYER.match(key)
        module, _, leaf = (match[3] if match else "").rpartition(".")
        if match and module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            prefix = "visual." if match[1] == "vision" else ""
            in_proj = f"{prefix}transformer.resblocks.{match[2]}.attn.in_proj_{leaf}"
            qkv.setdefault(in_proj, {})[module[10]] = value
        elif match and module in block:
            prefix = "visual." if match[1] == "vision" else ""
            out[f"{prefix}transformer.resblocks.{match[2]}.{block[module]}.{leaf}"] = value
        else:
            out[key] = value
    for key, parts in qkv.items():
        if set(parts) != set("qkv"):
            out.update({f"{key}[{p}]": v for p, v in parts.items()})  # reported as unexpected
            continue
        out[key] = np.concatenate([np.asarray(parts[p]) for p in "qkv"], axis=0)
    return out


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


def _open_clip_config_quick_gelu(path: str) -> bool | None:
    """`quick_gelu` from an open_clip_config.json beside the file (hub layout), if any."""
    config = os.path.join(os.path.dirname(os.path.abspath(path)), "open_clip_config.json")
    if not os.path.isfile(config):
        return None
    with open(config) as f:
        return bool(json.load(f).get("model_cfg", {}).get("quick_gelu", False))


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


def _template(model_name: str, overrides: Mapping[str, Any]) -> tuple[Any, dict]:
    from deit_jax import convert
    from deit_jax.models import create_model

    model = create_model(model_name, **overrides)
    return model, {k: v for k, v in convert._template(model).items() if k[0] == "params"}


def torch_to_flax(
    state_dict: Mapping[str, Any], model_name: str, **overrides: Any
) -> dict[str, Any]:
    """An open_clip / OpenAI or transformers state dict -> Flax variables of `model_name`.

    The sizes come from `overrides` (see `inferred_overrides`); every missing, unexpected or
    mis-shaped key is reported at once, as for the DeiT models.
    """
    import jax.numpy as jnp
    from flax import traverse_util

    from deit_jax import checkpoint
    from deit_jax.convert import _as_numpy, unwrap_state_dict

    source = unwrap_state_dict(state_dict)
    if any(k.startswith(("vision_model.", "text_model.")) for k in source):
        source = hf_to_open_clip(source)
    source = normalize_open_clip(source)
    _, template = _template(model_name, overrides)
    converted, missing, mismatched = {}, [], []
    for path, spec in template.items():
        key = open_clip_key(path[1:])
        if key not in source:
            missing.append(key)
            continue
        value = to_flax_layout(path, _as_numpy(source.pop(key)))
        if value.shape != spec.shape:
            mismatched.append(f"{key}: checkpoint {value.shape} vs model {spec.shape}")
            continue
        converted[path] = jnp.asarray(value.astype(spec.dtype))
    error = checkpoint.state_dict_mismatch(
        model_name,
        overrides,
        missing,
        list(source),
        mismatched,
        "Check that --model names a CLIP of the checkpoint's family (clip_vit_*).",
    )
    if error is not None:
        raise error
    return traverse_util.unflatten_dict(converted)


def flax_to_open_clip(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Flax CLIP variables -> an open_clip `CLIP` state dict (torch tensors) that
    `open_clip.create_model(...).load_state_dict(..., strict=True)` accepts."""
    import flax.linen as nn
    from flax import traverse_util

    from deit_jax import _compat

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
    from deit_jax import _compat

    torch = _compat.import_torch()
    state = {k: v.numpy() for k, v in flax_to_open_clip(variables).items()}
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in open_clip_to_hf(state).items()}


# --------------------------------------------------------------------------- files


def read_weights(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(open_clip-keyed state dict, inferred overrides)` of a CLIP file or transformers dir."""
    from deit_jax import convert
    from deit_jax.torchscript_weights import is_torchscript, read_torchscript

    path = os.fspath(path)
    if os.path.isdir(path):
        if not is_hf_dir(path):
            raise CheckpointError(
                f"{path!r} is neither a deit_jax weights directory nor a transformers CLIP "
                "directory (config.json of model_type 'clip')."
            )
        state = normalize_open_clip(hf_to_open_clip(read_hf_dir(path)))
        return state, hf_overrides(hf_config(path))
    quick_gelu = _open_clip_config_quick_gelu(path)
    if os.path.isfile(path) and is_torchscript(path):
        state, quick_gelu = read_torchscript(path), True  # OpenAI's TorchScript models
    else:
        state = convert.read_state_dict(path)
        if any(k.startswith(("vision_model.", "text_model.")) for k in state):
            state = hf_to_open_clip(state)
    if quick_gelu is None and any(_NOT_WEIGHTS.search(k) for k in state if "attn_mask" not in k):
        quick_gelu = True  # OpenAI's own state dicts keep input_resolution / context_length
    state = normalize_open_clip(state)
    overrides = open_clip_overrides(state)
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
