"""The teacher side of distillation, in one place.

- `deit_jax.teacher.build`: which frozen teacher a run gets (`build_teacher`).
- `deit_jax.teacher.flax_teacher`: a registry model with deit_jax (or converted PyTorch) weights,
  run frozen inside the jitted train step (`teacher_logits`, `teacher_features`).
- `deit_jax.teacher.cache`: the teacher's top-k outputs over the exact seeded training stream,
  written once (`--config.mode=teacher_cache`) and read by any number of student runs
  (`--config.teacher.cache=DIR`); `cache_store`: what fixes a cache and where it lives.
- `deit_jax.teacher.torch_teacher`: any timm / PyTorch model as the teacher of a cache.
- `deit_jax.teacher.zero_shot`: a CLIP model as a zero-shot classifier (`framework="clip"`):
  its image tower and a text head computed once (`deit_jax.teacher.clip`), a frozen Flax module.
"""

from deit_jax.teacher.build import build_teacher
from deit_jax.teacher.flax_teacher import (
    load_weights,
    teacher_features,
    teacher_logits,
)

__all__ = ["build_teacher", "load_weights", "teacher_features", "teacher_logits"]
