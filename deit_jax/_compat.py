"""Import-order workarounds for the libraries deit_jax sits between, and lazy package names.

TensorFlow (used only by the input pipeline) and torchvision (pulled in by timm, used only by the
PyTorch interop) crash the interpreter with a segmentation fault when TensorFlow is imported
first in the same process. Every TensorFlow import in deit_jax goes through `import_tensorflow`,
which imports torchvision first when it is installed, so any import order of deit_jax modules is
safe.

A package that offers its submodules' main names (`deit_jax.create_model`,
`deit_jax.train.train_and_evaluate`, ...) imports them on first use (`lazy_names`), so that
importing one light submodule does not load JAX, TensorFlow or TensorStore with the others.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any


def quiet_tensorflow() -> None:
    """Turns TensorFlow's C++ start-up messages off for every deit_jax process, before anything
    imports it (called by `deit_jax/__init__.py`); a value the user set is kept.

    On CPUs with AVX-512 TensorFlow turns its oneDNN custom operations on by itself and says so
    on stderr past `TF_CPP_MIN_LOG_LEVEL` ("oneDNN custom operations are on", after "WARNING: All
    log messages before absl::InitializeLog() ..."). The input pipeline's image ops give the same
    numbers without them (the quickstart's table is bit for bit the same), and TensorFlow's
    informational lines are not for deit_jax's users.
    """
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


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


def lazy_names(package: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `package` that imports `names` (name -> the submodule
    that defines it, relative to `package`) on first use."""

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
