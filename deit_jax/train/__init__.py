"""Training: the student's side of distillation, from the train state to finished weights.

- `loop`: `train_and_evaluate`, the training job (resumable);
- `evaluation`: the eval step's passes over the eval sets and `evaluate`, the eval job;
- `steps`: the pure train and eval steps (student, frozen teacher, loss);
- `state`: the student, its weights and its train state on the mesh;
- `optim`: AdamW / LAMB, the learning-rate schedule, the EMA of the weights;
- `checkpoint`: resumable Orbax training checkpoints;
- `metrics`: metrics.jsonl and TensorBoard;
- `run_weights`: the finished run's weights directory, with its recipe recorded.

`train_and_evaluate`, `evaluate` and `Preempted` are importable from here; they are imported on
first use, so that the pure modules (`steps`, `optim`) load without the data pipeline.
"""

from deit_jax._compat import lazy_names

_NAMES = {
    "NonFiniteLossError": "loop",
    "Preempted": "loop",
    "evaluate": "evaluation",
    "train_and_evaluate": "loop",
}
__all__ = sorted(_NAMES)

__getattr__ = lazy_names("deit_jax.train", _NAMES)
