"""deit_jax: DeiT (data-efficient image transformers) in JAX/Flax.

import deit_jax
model = deit_jax.create_model("deit_tiny_distilled_patch16_224")
"""

from deit_jax.models import create_model, forward_with_intermediates, list_models

__version__ = "0.1.0"
__all__ = ["create_model", "forward_with_intermediates", "list_models"]
