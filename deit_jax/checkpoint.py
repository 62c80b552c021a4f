"""Orbax checkpoints: model variables (converted weights, exported models).

`save_variables` / `load_variables` store a Flax variables dict as an Orbax checkpoint directory
with a `deit_jax.json` beside it naming the model and its overrides, so that training
(`config.init_from`) and evaluation can rebuild the right model.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

METADATA_FILE = "deit_jax.json"
_ITEM = "variables"


def save_variables(
    directory: str | os.PathLike,
    variables: Any,
    *,
    model_name: str,
    model_overrides: dict[str, Any] | None = None,
) -> None:
    """Writes `variables` to `directory` (which must not exist yet)."""
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory):
        raise FileExistsError(f"{directory!r} already exists; choose a new output directory.")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, _ITEM), variables)
        checkpointer.wait_until_finished()
    metadata = {"model_name": model_name, "model_overrides": model_overrides or {}}
    with open(os.path.join(directory, METADATA_FILE), "w") as f:
        json.dump(metadata, f, indent=2)


def load_variables(directory: str | os.PathLike, target: Any = None) -> tuple[Any, dict[str, Any]]:
    """Reads variables saved by `save_variables`; returns `(variables, metadata)`.

    `target`, a pytree of arrays or `jax.ShapeDtypeStruct`s (with shardings), restores straight
    into those shapes and placements; without it, arrays land on the default device.
    """
    directory = os.path.abspath(os.fspath(directory))
    meta_path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(
            f"{directory!r} is not a deit_jax weights directory (no {METADATA_FILE}). Create one "
            "with `python -m deit_jax.convert --checkpoint FILE --model NAME --output DIR`."
        )
    with open(meta_path) as f:
        metadata = json.load(f)
    with ocp.StandardCheckpointer() as checkpointer:
        if target is None:
            variables = checkpointer.restore(os.path.join(directory, _ITEM))
        else:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
            variables = checkpointer.restore(os.path.join(directory, _ITEM), abstract)
    return variables, metadata
