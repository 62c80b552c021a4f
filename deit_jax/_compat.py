"""Import-order workarounds for the libraries deit_jax sits between.

TensorFlow (used only by the input pipeline) and torchvision (pulled in by timm, used only by the
PyTorch interop) crash the interpreter with a segmentation fault when TensorFlow is imported
first in the same process. Every TensorFlow import in deit_jax goes through `import_tensorflow`,
which imports torchvision first when it is installed, so any import order of deit_jax modules is
safe.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def import_tensorflow() -> ModuleType:
    """Returns the `tensorflow` module, imported safely and hidden from accelerators."""
    if "tensorflow" not in sys.modules and importlib.util.find_spec("torchvision") is not None:
        import torchvision  # noqa: F401  (must precede TensorFlow, see module docstring)
    import tensorflow as tf

    # JAX owns the accelerators; tf.data only needs the host.
    tf.config.set_visible_devices([], "GPU")
    return tf


def import_torch() -> ModuleType:
    """Returns `torch`, with a clear error when the interop extra is not installed."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "PyTorch is needed to read .pth checkpoints or to export to PyTorch. Install the "
            "interop extra: pip install 'deit_jax[torch]' (or use a .safetensors file)."
        ) from e
    return torch
