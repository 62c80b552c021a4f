"""The tensors of a TorchScript archive (OpenAI's CLIP `.pt` files), read without running it.

`torch.jit.load` would run the archive's TorchScript code and `torch.load(weights_only=True)`
refuses TorchScript archives. This reads the archive as data: its `data.pkl` pickles the module
tree (`__torch__.*` objects whose state holds parameters, buffers and submodules) and the tensors'
bytes lie in `data/<key>` records. The unpickler below resolves no global but a fixed list of
data builders of its own (tensors become numpy arrays; `__torch__` classes become empty records
of their state), so no code from the file can run: anything else the pickle asks for is refused,
by name.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any

import numpy as np

from deit_jax.errors import CheckpointError

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "DoubleStorage": np.float64,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "BFloat16Storage": "bfloat16",
}


def is_torchscript(path: str | os.PathLike) -> bool:
    """True for a zip archive with TorchScript code (`constants.pkl`, `code/`)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


class _Record:
    """A `__torch__` object: its pickled state, nothing else (its class is never imported)."""

    qualified_name = ""
    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _record_class(qualified_name: str) -> type:
    # NEWOBJ calls cls.__new__ only: the name lives on the class.
    return type("Record", (_Record,), {"qualified_name": qualified_name})


def _rebuild_tensor(storage, offset, size, stride, *_unused) -> np.ndarray:
    """`torch._utils._rebuild_tensor_v2` on a numpy storage: a strided view, copied."""
    if not size:
        return storage[offset : offset + 1].reshape(()).copy()
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride)
    )
    return np.ascontiguousarray(view)


def _identity(value, *_unused):
    return value


# (module, name) -> what the unpickler returns for it. Only data builders, none from the file.
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
    ("torch.jit._pickle", "build_intlist"): _identity,
    ("torch.jit._pickle", "build_doublelist"): _identity,
    ("torch.jit._pickle", "build_boollist"): _identity,
    ("torch.jit._pickle", "build_tensorlist"): _identity,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._path = archive, prefix, path
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            return _record_class(f"{module}.{name}")
        if module == "torch" and name in _STORAGE_DTYPES:
            return name  # a storage type tag, consumed by persistent_load
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise CheckpointError(
            f"Refused to load {self._path!r}: its pickle asks for {module}.{name}, which is not "
            "part of a TorchScript module's weights; deit_jax never runs code from a weights file."
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointError(f"{self._path!r}: unknown persistent record {pid!r}.")
        _, kind, key, _location, _numel = pid
        if key not in self._storages:
            dtype = _STORAGE_DTYPES[kind]
            if dtype == "bfloat16":
                import ml_dtypes

                dtype = ml_dtypes.bfloat16
            raw = self._archive.read(f"{self._prefix}data/{key}")
            self._storages[key] = np.frombuffer(raw, dtype=dtype)
        return self._storages[key]


def _tensors(state: Any, prefix: str, out: dict[str, np.ndarray]) -> None:
    """Module state -> `state_dict`-style dotted keys of every tensor below it."""
    if isinstance(state, _Record):
        _tensors(state.state, prefix, out)
    elif isinstance(state, dict):
        for key, value in state.items():
            if isinstance(value, np.ndarray):
                out[prefix + key] = value
            elif isinstance(value, _Record):
                _tensors(value, f"{prefix}{key}.", out)


def read_torchscript(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors (parameters and tensor attributes) of a TorchScript archive, by dotted key."""
    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as archive:
            data_pkl = [
                n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")
            ]
            if len(data_pkl) != 1:
                raise CheckpointError(f"{path!r} is a zip archive without one data.pkl record.")
            prefix = data_pkl[0][: -len("data.pkl")]
            root = _Unpickler(archive.read(data_pkl[0]), archive, prefix, path).load()
    except (zipfile.BadZipFile, EOFError, KeyError, pickle.UnpicklingError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(
            f"Could not read {path!r} as a TorchScript archive ({type(e).__name__}: {e}); the "
            "file is truncated or corrupt: download it again."
        ) from e
    out: dict[str, np.ndarray] = {}
    _tensors(root, "", out)
    if not out:
        raise CheckpointError(f"{path!r} is a TorchScript archive without tensors.")
    return out
