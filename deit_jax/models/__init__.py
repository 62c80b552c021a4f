"""Models: DeiT and DeiT III variants and convnet teachers behind one registry (`create_model`)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from deit_jax.models.cnn import SmallCNN
from deit_jax.models.registry import (
    create_model,
    input_size,
    list_models,
    model_options,
    register_model,
)
from deit_jax.models.regnet import RegNet
from deit_jax.models.resnet import ResNet
from deit_jax.models.vit import Attention, Block, DeiT, DropPath, LayerScale, Mlp, PatchEmbed

__all__ = [
    "Attention",
    "Block",
    "DeiT",
    "LayerScale",
    "DropPath",
    "Mlp",
    "PatchEmbed",
    "RegNet",
    "ResNet",
    "SmallCNN",
    "create_model",
    "forward_with_intermediates",
    "input_size",
    "list_models",
    "model_options",
    "register_model",
]


def _register_deit() -> None:
    widths = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
    for size, (dim, heads) in widths.items():
        for distilled in (False, True):
            for img in (224, 384) if size == "base" else (224,):
                name = f"deit_{size}{'_distilled' if distilled else ''}_patch16_{img}"
                register_model(
                    name, DeiT, embed_dim=dim, num_heads=heads, distilled=distilled, img_size=img
                )


def _register_deit3() -> None:
    # DeiT III (timm's deit3_*): LayerScale (init 1e-6) and position embeddings for the patches.
    shapes = {
        "small": (16, 384, 12, 6, (224, 384)),
        "medium": (16, 512, 12, 8, (224,)),
        "base": (16, 768, 12, 12, (224, 384)),
        "large": (16, 1024, 24, 16, (224, 384)),
        "huge": (14, 1280, 32, 16, (224,)),
    }
    for size, (patch, dim, depth, heads, img_sizes) in shapes.items():
        for img in img_sizes:
            register_model(
                f"deit3_{size}_patch{patch}_{img}",
                DeiT,
                patch_size=patch,
                embed_dim=dim,
                depth=depth,
                num_heads=heads,
                img_size=img,
                init_values=1e-6,
                no_embed_class=True,
            )


_register_deit()
_register_deit3()


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
