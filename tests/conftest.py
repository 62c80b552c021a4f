"""Shared test setup.

Eight CPU devices, so mesh and sharding tests run on real multi-device meshes in-process. torch,
torchvision and timm are imported before anything imports TensorFlow (the other order crashes the
interpreter, see deit_jax/_compat.py).
"""

import importlib.util

if importlib.util.find_spec("timm") is not None:
    import timm  # noqa: F401
    import torch  # noqa: F401

import jax

jax.config.update("jax_num_cpu_devices", 8)
