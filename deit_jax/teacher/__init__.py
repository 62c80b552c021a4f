"""The teacher side of distillation, in one place.

- `build`: which frozen teacher a run gets (`build_teacher`).
- `flax_teacher`: a registry model with deit_jax (or converted PyTorch) weights.
- `forward`: the frozen teacher inside the jitted steps (`teacher_logits`, `teacher_features`),
  on the stream's images mapped to its normalisation and size.
- `feature`: feature distillation's learned projection of the student's features.
- `cache/`: the teacher's top-k outputs over the exact seeded training stream, written once
  (`--config.mode=teacher_cache`) and read by any number of student runs
  (`--config.teacher.cache=DIR`).
- `torch_teacher`: any timm / PyTorch model as the teacher of a cache.
- `clip/`: a CLIP model as a zero-shot classifier (`framework="clip"`): its image tower and a
  text head computed once, a frozen Flax module.
"""
