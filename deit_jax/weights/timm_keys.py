"""timm's state-dict keys <-> Flax variables, for DeiT, DeiT III and the convnets.

Flax modules in `deit_jax.models` are named after their timm counterparts, so one rule maps every
parameter, for DeiT and the convnet teachers alike:

  flax path                      torch key
  blocks_3/attn/qkv/kernel   ->  blocks.3.attn.qkv.weight   (Dense: transposed)
  patch_embed/proj/kernel    ->  patch_embed.proj.weight    (conv: HWIO -> OIHW)
  norm/scale                 ->  norm.weight
  s1/b1/conv1/bn/mean        ->  s1.b1.conv1.bn.running_mean (collection 'batch_stats')

The official DeiT checkpoints use the same keys as timm (wrapped as `{"model": ...}`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from deit_jax import _compat
from deit_jax.errors import CheckpointMismatchError
from deit_jax.models import create_model
from deit_jax.weights import state_dict as state_dicts
from deit_jax.weights import surgery

log = logging.getLogger(__name__)

_IGNORED_SUFFIXES = ("num_batches_tracked",)
_LEAF_TO_TORCH = {
    "scale": "weight",
    "kernel": "weight",
    "mean": "running_mean",
    "var": "running_var",
}


def torch_key(path: tuple[str, ...]) -> str:
    """('blocks_3', 'attn', 'qkv', 'kernel') -> 'blocks.3.attn.qkv.weight'."""
    *modules, leaf = path
    modules = [re.sub(r"^(.*)_(\d+)$", r"\1.\2", m) for m in modules]
    return ".".join([*modules, _LEAF_TO_TORCH.get(leaf, leaf)])


def _to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:  # OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    if leaf == "kernel" and value.ndim == 2:  # (out, in) -> (in, out)
        return value.T
    return value


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def torch_to_flax(
    state_dict: Mapping[str, Any],
    model_name: str,
    *,
    rng: jax.Array | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Converts a PyTorch state dict (timm or official DeiT) into Flax variables for `model_name`.

    `overrides` are passed to `create_model`. With another `img_size`, position embeddings are
    resized as in the reference; with another `num_classes`, classifier heads are dropped and
    freshly initialised (from `rng`), with a warning (`deit_jax.weights.surgery`). Any other
    missing, unexpected or mis-shaped key raises `CheckpointMismatchError` listing all of them.
    """
    model = create_model(model_name, **overrides)
    source = {
        k: v
        for k, v in state_dicts.unwrap_state_dict(state_dict).items()
        if not k.endswith(_IGNORED_SUFFIXES)
    }
    converted, fresh = state_dicts.match(
        source,
        state_dicts.template(model),
        key=lambda path: torch_key(path[1:]),
        layout=lambda path, value: _to_flax_layout(path[-1], value),
        fit=lambda path, value, shape: surgery.fit(model, path[1:], value, shape),
        model_name=model_name,
        overrides=overrides,
        hint="Check that --model names the architecture the checkpoint was trained with.",
    )
    if fresh:
        log.warning(
            "Class count changed to %s: re-initialising %s from scratch.",
            overrides.get("num_classes"),
            ", ".join(sorted({torch_key(p[1:]).rsplit(".", 1)[0] for p in fresh})),
        )
        init = state_dicts.init_variables(model, jax.random.key(0) if rng is None else rng)
        init = traverse_util.flatten_dict(init)
        for path in fresh:
            converted[path] = np.asarray(init[path])
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in converted.items()})


def flax_to_torch(variables: Mapping[str, Any], model_name: str | None = None) -> dict[str, Any]:
    """Converts Flax variables to a PyTorch state dict (torch tensors) that timm's model loads.

    `model_name`, when given, checks first that the variables fit that registered model.
    """
    torch = _compat.import_torch()
    flat = traverse_util.flatten_dict(nn.meta.unbox(dict(variables)))
    flat = {k: v for k, v in flat.items() if k[0] in ("params", "batch_stats")}
    if model_name is not None:
        template = state_dicts.template(create_model(model_name))
        bad = sorted(
            "/".join(k) for k in set(template) ^ set(flat) if k[0] in ("params", "batch_stats")
        )
        bad += ["/".join(k) for k in flat if k in template and flat[k].shape != template[k].shape]
        if bad:
            raise CheckpointMismatchError(f"Variables do not fit {model_name!r}: {', '.join(bad)}")
    state_dict: dict[str, Any] = {}
    for path, value in flat.items():
        key = torch_key(path[1:])
        array = np.array(_to_torch_layout(path[-1], np.asarray(value)), order="C", copy=True)
        state_dict[key] = torch.from_numpy(array)
        if path[0] == "batch_stats" and path[-1] == "var":
            prefix = key.rsplit(".", 1)[0]
            state_dict[f"{prefix}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return state_dict
