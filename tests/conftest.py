"""Shared test setup.

Eight CPU devices, so mesh and sharding tests run on real multi-device meshes in-process. torch,
torchvision and timm are imported before anything imports TensorFlow (the other order crashes the
interpreter, see deit_jax/_compat.py).

One JAX compilation cache for the test session, fresh each session and shared by the xdist
workers and the training processes the tests start (`tests/_processes.py`): many tests compile
the same small train and eval steps, and a hit skips the compile (~20% of a training test's
time). A size limit turns on the cache's file lock, so two workers never read a half-written
entry.
"""

import importlib.util
import os
import shutil
import tempfile

if importlib.util.find_spec("timm") is not None:
    import timm  # noqa: F401
    import torch  # noqa: F401

import jax

jax.config.update("jax_num_cpu_devices", 8)

JAX_CACHE_ENV = "DEIT_JAX_TEST_JAX_CACHE"
JAX_CACHE_MAX_BYTES = 8 << 30
# Set in the first process (the xdist controller, which starts the workers after importing this).
_CREATED_JAX_CACHE = JAX_CACHE_ENV not in os.environ
JAX_CACHE = os.environ.setdefault(JAX_CACHE_ENV, tempfile.mkdtemp(prefix="deit_jax_test_jax_"))
jax.config.update("jax_compilation_cache_dir", JAX_CACHE)
jax.config.update("jax_compilation_cache_max_size", JAX_CACHE_MAX_BYTES)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_unconfigure(config):
    if _CREATED_JAX_CACHE and not hasattr(config, "workerinput"):
        shutil.rmtree(JAX_CACHE, ignore_errors=True)


# The longest files first: `--dist loadfile` hands whole files to the workers in collection
# order, and a file of ten minutes started late leaves the other worker idle at the end.
LONGEST_FIRST = ("test_quickstart.py", "test_train_processes.py", "test_teacher_cache.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
