"""PyTorch state dicts as data: reading them safely, and matching them to a model's variables.

- `read_state_dict(path)`: a `.pth`/`.pt`/`.bin` file (read with `weights_only=True`, never
  running pickled code) or a `.safetensors` file, unwrapped from an official DeiT checkpoint's
  `{"model": ...}`.
- `template(model)`: the shapes of a model's variables, by Flax path.
- `match(...)`: a state dict's arrays placed onto a template by a family's key rule and layout
  (`deit_jax.weights.timm_keys`, `deit_jax.weights.clip`), with every missing, unexpected and
  mis-shaped key reported at once in one error.
"""

from __future__ import annotations

import argparse
import os
import re
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from deit_jax import _compat
from deit_jax.errors import CheckpointError, CheckpointMismatchError, WeightsNotFoundError
from deit_jax.models import input_size

Path = tuple[str, ...]


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a `.pth`/`.pt`/`.bin` (never executing pickled code) or `.safetensors` file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsNotFoundError(
            f"Checkpoint {path!r} does not exist. Download the official DeiT or timm weights "
            "(a .pth or .safetensors file) and pass its local path."
        )
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"Could not read {path!r} as safetensors ({e}); the file is truncated or corrupt: "
                "download it again."
            ) from e
    torch = _compat.import_torch()
    try:
        # Checkpoints written by the official training script also pickle its argparse.Namespace,
        # which holds plain values only; everything else outside tensors is refused.
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"Could not read {path!r} as a PyTorch checkpoint ({type(e).__name__}: {e}). The file "
            "is truncated or corrupt, or holds pickled objects other than tensors (refused: "
            "loading is done with weights_only=True)."
        ) from e
    except Exception as e:  # pickle.UnpicklingError from the weights_only unpickler
        raise CheckpointError(_refusal(path, e)) from None
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path!r} holds a {type(checkpoint).__name__}, not a state dict.")
    return unwrap_state_dict(checkpoint)


def _refusal(path: str, error: Exception) -> str:
    """One line for a pickle the weights-only unpickler refused, without torch's advice to load
    it with weights_only=False (which would run the file's code)."""
    text = str(error)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        what = f"asks for {found[1]}"
    else:  # torch's message: its advice, the reason, a link to its docs; keep the reason
        parts = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
        reasons = [p for p in parts if "weights_only" not in p and "documentation" not in p]
        what = "holds objects other than tensors" + (f" ({reasons[0]})" if reasons else "")
    return (
        f"Refused to load {path!r}: its pickle {what}, which is not part of a state dict. deit_jax "
        "never runs code from a weights file (it reads them with torch.load(weights_only=True)); "
        "use a .safetensors or plain state-dict copy of these weights."
    )


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The model state dict inside an official DeiT checkpoint (`{"model": ...}`) or a plain one."""
    for wrapper in ("model", "state_dict"):
        inner = checkpoint.get(wrapper)
        if isinstance(inner, Mapping):
            return dict(inner)
    return dict(checkpoint)


def as_numpy(value: Any) -> np.ndarray:
    """A torch tensor (bfloat16 as float32) or an array, as numpy; torch is not imported."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def init_variables(model: nn.Module, rng: jax.Array) -> dict[str, Any]:
    """A model's freshly initialised variables (unboxed), at its own input size."""
    h, w = input_size(model)
    images = jnp.zeros((1, h, w, getattr(model, "in_chans", 3)), jnp.float32)
    return nn.meta.unbox(model.init(rng, images))


def abstract_variables(model: nn.Module) -> dict[str, Any]:
    """`model`'s variables as shapes only (`jax.ShapeDtypeStruct`s): what a plan compiles a
    step with, without a weight read or allocated."""
    shapes = dict(jax.eval_shape(lambda: init_variables(model, jax.random.key(0))))
    shapes.pop("intermediates", None)
    return shapes


def template(model: nn.Module) -> dict[Path, jax.ShapeDtypeStruct]:
    """Every variable of `model` by flat Flax path (collection first), as shapes only."""
    return traverse_util.flatten_dict(abstract_variables(model))


def mismatch_error(
    model_name: str,
    overrides: Any,
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
    hint: str,
) -> CheckpointMismatchError | None:
    """The error listing every way a PyTorch state dict misses `model_name`, or None if it fits."""
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(
            f"unexpected in the checkpoint ({len(unexpected)}): {', '.join(sorted(unexpected))}"
        )
    if mismatched:
        problems.append(f"wrong shapes ({len(mismatched)}): {'; '.join(mismatched)}")
    if not problems:
        return None
    return CheckpointMismatchError(
        f"The checkpoint does not fit model {model_name!r} (overrides {dict(overrides)}):\n  "
        + "\n  ".join(problems)
        + f"\n{hint}"
    )


def match(
    source: Mapping[str, Any],
    shapes: Mapping[Path, jax.ShapeDtypeStruct],
    *,
    key: Callable[[Path], str],
    layout: Callable[[Path, np.ndarray], np.ndarray],
    fit: Callable[[Path, np.ndarray, tuple[int, ...]], np.ndarray | None] | None = None,
    model_name: str,
    overrides: Mapping[str, Any],
    hint: str,
) -> tuple[dict[Path, np.ndarray], list[Path]]:
    """Places the arrays of state dict `source` onto the Flax paths of `shapes`.

    `key(path)` is the state-dict key of a Flax path, `layout(path, value)` turns a PyTorch
    array into the Flax layout, and `fit(path, value, shape)`, when the shapes differ, adapts the
    value to the model (`deit_jax.weights.surgery`) or returns None for a parameter the model
    initialises afresh. Returns `(arrays by path, fresh paths)`; raises one
    `CheckpointMismatchError` naming every missing, unexpected and mis-shaped key (`hint` says
    what to check).
    """
    source = dict(source)
    converted: dict[Path, np.ndarray] = {}
    missing, mismatched, fresh = [], [], []
    for path, spec in shapes.items():
        name = key(path)
        if name not in source:
            missing.append(name)
            continue
        value = layout(path, as_numpy(source.pop(name)))
        if value.shape != spec.shape and fit is not None:
            value = fit(path, value, spec.shape)
            if value is None:
                fresh.append(path)
                continue
        if value.shape != spec.shape:
            mismatched.append(f"{name}: checkpoint {value.shape} vs model {spec.shape}")
            continue
        converted[path] = value.astype(spec.dtype)
    error = mismatch_error(model_name, overrides, missing, list(source), mismatched, hint)
    if error is not None:
        raise error
    return converted, fresh
