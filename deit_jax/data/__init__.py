"""Input pipelines for deit_jax: tfds / image-folder / digits sources, DeiT augmentation, mixup.

The training loop needs only `dataset_info`, `build_train` and `build_eval` (see pipeline.py).
They are imported on first use, so that TensorFlow-free modules of this package (e.g.
`randaugment_policy`, which the config check parses policies with) import without TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "DatasetInfo",
    "EvalIterable",
    "TrainIterator",
    "build_eval",
    "build_extra_evals",
    "build_train",
    "dataset_info",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("deit_jax.data.pipeline"), name)
    raise AttributeError(f"module 'deit_jax.data' has no attribute {name!r}")
