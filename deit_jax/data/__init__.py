"""Input pipelines for deit_jax: tfds / image-folder / digits sources, DeiT augmentation, mixup.

The training loop needs only `dataset_info`, `build_train` and `build_eval` (see pipeline.py).
"""

from deit_jax.data.pipeline import (
    DatasetInfo,
    EvalIterable,
    TrainIterator,
    build_eval,
    build_extra_evals,
    build_train,
    dataset_info,
)

__all__ = [
    "DatasetInfo",
    "EvalIterable",
    "TrainIterator",
    "build_eval",
    "build_extra_evals",
    "build_train",
    "dataset_info",
]
