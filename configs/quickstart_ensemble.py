r"""The quickstart's distilled student taught by a live ensemble of the quickstart's three teachers.

  # first the quickstart, whose three teachers (seeds 0-2) this ensemble reuses
  python -m deit_jax.main --config configs/quickstart.py --workdir /tmp/deit_quickstart
  # then the student, every teacher running in its train step
  python -m deit_jax.main --config configs/quickstart_ensemble.py:/tmp/deit_quickstart \
      --workdir /tmp/ensemble_live --config.init_seed=0

The quickstart's distillation stage (`configs/quickstart.py`: the 4-block DeiT with a
distillation token, hard distillation, 60 epochs on the digits, stream seed 0) with
`config.teacher.members`: the three `cnn_small` teachers at equal weights, the target the
argmax of the mean of their probabilities (docs/teacher_cache.md).
`--config.teacher.members.seed0.weight=2` re-weights one; `--config.mode=teacher_cache --workdir
CACHE` writes each member's cache into CACHE/seed0 ... for students that read them mixed.

Hardware and time: about 1 minute a run on 2 idle cores of an Intel Xeon (2026-12-06). Expected
test top-1 on that host, student init seeds 0-2: 79.17, 80.00, 81.11 (80.09 +- 0.97), the cached
equal-weight ensemble's values of docs/teacher_cache.md (the same students, bit for bit in
accuracy and loss), below each member alone (81.2-83.2); the ensemble itself scores 98.33.
"""

import os

from deit_jax.config import config_beside


def get_config(quickstart_dir: str = "/tmp/deit_quickstart"):
    c = config_beside(__file__, "quickstart.py")
    c.mode = "train"
    c.teacher.name = c.quickstart.teacher.model_name
    c.teacher.members = {
        f"seed{s}": {"checkpoint": os.path.join(quickstart_dir, f"seed{s}", "teacher", "weights")}
        for s in range(3)
    }
    return c
