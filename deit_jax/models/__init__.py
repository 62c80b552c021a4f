"""Models: DeiT and DeiT III, convnet teachers and CLIP behind one registry (`create_model`).

Each family's module registers its names when it is imported (`register_model(name, cls,
**defaults)` at its end): `vit` (DeiT, DeiT III), `clip`, `resnet`, `regnet`, `small_cnn`.
Importing this package imports them all, so every name is registered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

from deit_jax.models.clip import CLIP
from deit_jax.models.registry import (
    create_model,
    input_size,
    list_models,
    model_options,
    register_model,
)
from deit_jax.models.regnet import RegNet
from deit_jax.models.resnet import ResNet
from deit_jax.models.small_cnn import SmallCNN
from deit_jax.models.vit import Attention, Block, DeiT, DropPath, LayerScale, Mlp, PatchEmbed

__all__ = [
    "Attention",
    "Block",
    "CLIP",
    "DeiT",
    "LayerScale",
    "DropPath",
    "Mlp",
    "PatchEmbed",
    "RegNet",
    "ResNet",
    "SmallCNN",
    "create_model",
    "feature_width",
    "forward_with_intermediates",
    "input_size",
    "list_models",
    "model_options",
    "pooled_features",
    "register_model",
]


def forward_with_intermediates(
    model: nn.Module, variables: Any, images: jax.Array, *, train: bool = False, **apply_kwargs: Any
) -> tuple[Any, dict[str, Any]]:
    """Runs `model` and returns `(outputs, intermediates)`.

    For DeiT, `intermediates["attention"]` is a list with one (B, heads, N, N) attention map per
    block, `intermediates["block_tokens"]` a list of each block's output tokens (B, N, D), and
    `intermediates["tokens"]` the final normalised tokens (B, N, D); tokens are ordered class
    token, then the distillation token when the model has one, then the patches.
    """
    out, state = model.apply(
        variables, images, train=train, mutable=["intermediates"], **apply_kwargs
    )
    flat: dict[str, Any] = {}
    inter = state["intermediates"]
    blocks = sorted(
        (k for k in inter if k.startswith("blocks_")), key=lambda k: int(k.split("_")[1])
    )
    if blocks:
        flat["attention"] = [inter[k]["attn"]["attention"][0] for k in blocks]
        flat["block_tokens"] = [inter[k]["tokens"][0] for k in blocks]
    if "tokens" in inter:
        flat["tokens"] = inter["tokens"][0]
    return out, flat


def pooled_features(
    model: nn.Module,
    variables: Any,
    images: jax.Array,
    *,
    train: bool = False,
    mutable: Sequence[str] = (),
    **apply_kwargs: Any,
) -> tuple[Any, jax.Array, dict[str, Any]]:
    """Runs `model`; returns `(outputs, features, updated_collections)`.

    `features` (B, D) are the pooled pre-logit features every registry model sows as
    `intermediates/pre_logits` right before its head, what timm's `forward_head(x,
    pre_logits=True)` returns: the class token after the final norm for DeiT (the average of
    the class and distillation tokens for a distilled DeiT, as timm), the global-average-pooled
    last feature map for ResNet, RegNet and `cnn_small`. `updated_collections` holds the
    `mutable` collections (e.g. "batch_stats" in training).
    """
    out, state = model.apply(
        variables, images, train=train, mutable=[*mutable, "intermediates"], **apply_kwargs
    )
    state = dict(state)
    sown = state.pop("intermediates", {})
    if "pre_logits" not in sown:
        raise ValueError(
            f"{type(model).__name__} exposes no pooled features: feature distillation needs "
            "models that call self.sow('intermediates', 'pre_logits', pooled) right before "
            "their head (every deit_jax registry model does); use such a model or "
            "config.distillation.kind='soft'/'hard'."
        )
    return out, sown["pre_logits"][0], state


def feature_width(model: nn.Module) -> int:
    """The width D of `pooled_features` (shape inference only, no compute)."""
    h, w = input_size(model)
    images = jax.ShapeDtypeStruct((1, h, w, getattr(model, "in_chans", 3)), jax.numpy.float32)

    def features(x: jax.Array) -> jax.Array:
        variables = model.init({"params": jax.random.PRNGKey(0)}, x, train=False)
        variables = {k: v for k, v in variables.items() if k != "intermediates"}
        return pooled_features(model, variables, x)[1]

    return int(jax.eval_shape(features, images).shape[-1])
