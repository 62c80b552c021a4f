"""`jit`: `jax.jit` with the XLA options deit_jax compiles every step with.

On the CPU, XLA hands dots and convolutions to YNNPACK by default
(`xla_cpu_experimental_ynn_fusion_type`). On this project's 2-core machines XLA's own (Eigen)
kernels run them faster: the RegNetY-16GF teacher forward 15-30% (its convolutions, grouped ones
4-5x), a DeiT-Ti train step 8-11% (measured per operation and per whole step, each setting in a
process of its own: benchmarks/NOTES.md, "The convnet teacher on CPU"). `jit` therefore compiles
with YNNPACK fusions off on the CPU, per compilation, so nothing outside deit_jax's own
functions changes. GPU and TPU compile with XLA's defaults.

A YNNPACK choice of your own in `XLA_FLAGS` (`--xla_cpu_experimental_ynn_fusion_type=...`) wins:
`jit` then adds nothing. Every deit_jax function that compiles a model goes through `jit`, so
the teacher cache's writer and the train step's live teacher compile alike (the cache's
exactness needs the same kernels on both sides).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax

YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
CPU_OPTIONS: dict[str, str] = {YNN_FLAG: ""}  # no YNNPACK fusion of any kind


# The platform steps are jitted for when it is not this host's (a plan compiles for a TPU or GPU
# it does not have: `compiling_for`).
_TARGET: list[str] = []


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
    """Within it, `jit` compiles with `platform`'s options, not the host backend's."""
    _TARGET.append(platform)
    try:
        yield
    finally:
        _TARGET.pop()


def compiler_options(platform: str | None = None) -> dict[str, str] | None:
    """The options `jit` compiles with on `platform` (default: the platform of `compiling_for`,
    else JAX's default backend)."""
    platform = platform or (_TARGET[-1] if _TARGET else jax.default_backend())
    if platform != "cpu" or YNN_FLAG in os.environ.get("XLA_FLAGS", ""):
        return None
    return dict(CPU_OPTIONS)


def jit(fun: Callable[..., Any], **kwargs: Any) -> Any:
    """`jax.jit(fun, **kwargs)`, with `compiler_options()` unless `kwargs` brings its own."""
    kwargs.setdefault("compiler_options", compiler_options())
    return jax.jit(fun, **kwargs)
