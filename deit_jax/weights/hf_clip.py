"""transformers' CLIP format: `CLIPModel` directories and state dicts <-> open_clip's keys.

A transformers `CLIPModel` state dict is rewritten into open_clip keys (`hf_to_open_clip`: q, k, v
concatenated into `in_proj`, `visual_projection.weight` transposed into `visual.proj`, ...) and
back (`open_clip_to_hf`); both are exact (copies and transposes only). A model directory's
`config.json` gives the sizes and the activation (`hf_overrides`). `deit_jax.weights.clip` takes
it from there.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from deit_jax.errors import CheckpointError
from deit_jax.weights.state_dict import read_state_dict

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
    for name in HF_WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return read_state_dict(os.path.join(path, name))
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
