"""Input pipelines for deit_jax: tfds / image-folder / digits sources, DeiT augmentation, mixup.

The training loop needs only `dataset_info` (feeder.py), `build_train` (pipeline.py) and
`build_eval` (eval_pipeline.py).
They are imported on first use, so that TensorFlow-free modules of this package (e.g.
`randaugment_policy`, which the config check parses policies with) import without TensorFlow.
"""

from deit_jax._compat import lazy_names

__all__ = [
    "DatasetInfo",
    "EvalIterable",
    "TrainIterator",
    "build_eval",
    "build_extra_evals",
    "build_train",
    "dataset_info",
    "planned_info",
]
__getattr__ = lazy_names(
    "deit_jax.data",
    {
        "DatasetInfo": "feeder",
        "dataset_info": "feeder",
        "planned_info": "feeder",
        "TrainIterator": "pipeline",
        "build_train": "pipeline",
        "EvalIterable": "eval_pipeline",
        "build_eval": "eval_pipeline",
        "build_extra_evals": "eval_pipeline",
    },
)
