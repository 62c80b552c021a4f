"""deit_jax: DeiT (data-efficient image transformers) in JAX/Flax.

import deit_jax
model = deit_jax.create_model("deit_tiny_distilled_patch16_224")

The names below are imported on first use, so that `python -m deit_jax.main` starts (and
installs its SIGTERM handler) before JAX and Flax load.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["create_model", "forward_with_intermediates", "list_models"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("deit_jax.models"), name)
    raise AttributeError(f"module 'deit_jax' has no attribute {name!r}")
