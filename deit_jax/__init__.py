"""deit_jax: DeiT (data-efficient image transformers) in JAX/Flax.

import deit_jax
model = deit_jax.create_model("deit_tiny_distilled_patch16_224")

The names below are imported on first use, so that `python -m deit_jax.main` starts (and
installs its SIGTERM handler) before JAX and Flax load.
"""

from deit_jax._compat import lazy_names, quiet_tensorflow
from deit_jax._platforms import skip_absent_accelerators

quiet_tensorflow()  # before any submodule imports TensorFlow
skip_absent_accelerators()  # before anything initialises JAX's backends (libtpu on a CPU host)

__version__ = "0.1.0"
__all__ = ["create_model", "forward_with_intermediates", "list_models"]
__getattr__ = lazy_names("deit_jax", dict.fromkeys(__all__, "models"))
