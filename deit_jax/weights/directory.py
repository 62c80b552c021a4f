"""deit_jax weights directories: a model's variables as an Orbax checkpoint, with the model's
name and overrides (and, for a finished run, its data and recipe) in `deit_jax.json` beside it.

Written by `python -m deit_jax.convert` and at the end of every training run
(`WORKDIR/weights`); read wherever weights are loaded (`deit_jax.weights.load`), as a teacher
(`config.teacher.checkpoint`), to fine-tune from (`config.init_from`) and by the export to timm.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from deit_jax.errors import CheckpointError, WeightsNotFoundError

METADATA_FILE = "deit_jax.json"
_ITEM = "variables"
_CONVERT = "`python -m deit_jax.convert --checkpoint FILE --model NAME --output DIR`"


def save_variables(
    directory: str | os.PathLike,
    variables: Any,
    *,
    model_name: str,
    model_overrides: dict[str, Any] | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> None:
    """Writes `variables` to `directory` (which must not exist yet).

    `extra_metadata` (JSON values) joins the model name and overrides in deit_jax.json: a
    finished run records its data, preprocessing and recipe there (read by deit_jax.export).
    """
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory):
        raise FileExistsError(f"{directory!r} already exists; choose a new output directory.")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, _ITEM), variables)
        checkpointer.wait_until_finished()
    metadata = {
        **(extra_metadata or {}),
        "model_name": model_name,
        "model_overrides": model_overrides or {},
    }
    with open(os.path.join(directory, METADATA_FILE), "w") as f:
        json.dump(metadata, f, indent=2)


def load_variables(directory: str | os.PathLike, target: Any = None) -> tuple[Any, dict[str, Any]]:
    """Reads variables saved by `save_variables`; returns `(variables, metadata)`.

    `target`, a pytree of arrays or `jax.ShapeDtypeStruct`s (with shardings), restores straight
    into those shapes and placements; without it, the arrays are numpy arrays in host memory,
    whatever devices and processes wrote them (weights exported by a multi-host run name devices
    that another run does not have; `jax.device_put` them where they are needed).

    A directory that does not exist, lacks its metadata (written last: the run or conversion that
    wrote it was interrupted) or whose arrays cannot be read is refused with a message that says
    how to get a complete one.
    """
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise WeightsNotFoundError(
            f"Weights directory {directory!r} does not exist: give the `weights` directory of a "
            f"finished run (WORKDIR/weights) or one written by {_CONVERT}."
        )
    meta_path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(meta_path):
        raise WeightsNotFoundError(
            f"{directory!r} is not a complete deit_jax weights directory: it has no "
            f"{METADATA_FILE} (written last, so the run or conversion that wrote it was "
            "interrupted, or this is another directory). Rerun the training command to write "
            f"the weights again, or give WORKDIR/weights of a finished run or the output of "
            f"{_CONVERT}."
        )
    with open(meta_path) as f:
        metadata = json.load(f)
    path = os.path.join(directory, _ITEM)
    try:
        return _restore(path, target), metadata
    except Exception as e:  # Orbax raises many kinds for missing or truncated files.
        raise CheckpointError(
            f"Could not read the weights in {directory!r} ({type(e).__name__}: {str(e)[:200]}); "
            "the directory is partial or corrupt. Delete it and rerun the command that wrote it "
            "(the training run exports its weights again)."
        ) from e


def _restore(path: str, target: Any) -> Any:
    if target is None:
        with ocp.PyTreeCheckpointer() as checkpointer:
            stored = checkpointer.metadata(path).item_metadata.tree
            as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored)
            return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    with ocp.StandardCheckpointer() as checkpointer:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        return checkpointer.restore(path, abstract)


def weights_hash(path: str) -> str:
    """SHA-256 over a weights file, or over every file of a weights directory (sorted)."""
    digest = hashlib.sha256()
    files = [path]
    if os.path.isdir(path):
        files = sorted(
            os.path.join(root, name) for root, _, names in os.walk(path) for name in names
        )
    for name in files:
        if os.path.isdir(path):
            digest.update(os.path.relpath(name, path).encode())
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()
