r"""Which distillation recipe a CLIP student and a label-free DeiT should use: the CLIP
quickstart's digits, its teacher and a weaker one, every candidate recipe, 3 seeds.

  python -m deit_jax.main --config configs/clip_recipes.py --workdir /tmp/clip_recipes

Offline, on the CLIP quickstart's data and students (configs/clip_quickstart.py,
deit_jax/experiments/clip_recipes.py):

1. `losses`: the quickstart's teacher (60 epochs of open_clip training) and its CLIP student
   under each pair loss alone (the in-batch KL, CLIP-KD's FD and ICL), CLIP-KD's sum, and no
   teacher (CLIP's loss alone), each from scratch and inherited from the teacher (TinyCLIP's
   leading heads and channels); the inherited ones evaluated every 2 epochs (the steps they
   need to reach the from-scratch student's final recall);
2. `weak`: a teacher of 7 epochs (about 80% zero-shot top-1) and both label-free readings (a
   DeiT learning its zero-shot head; a CLIP student learning its in-batch logits) under the
   recipes of `clip_recipes.weak_recipes` (function matching, CLIP-KD's losses, inheritance).
   Goal: at least 95% of the teacher's top-1.

Hardware and time: 45 students of 40 epochs and two teachers, a student 1.5-2 minutes alone on
a 2-core CPU (about 1.5 hours in all); measured: 1 h 48 min as 2-4 processes sharing 2 cores.
Expected (docs/clip.md, "Recipes on the digits", has the tables): inherited CLIP students
1.4-1.7 points above the same losses from scratch (96.57% by the KL, of a 98.33% teacher); FD or
ICL alone near chance; of the 78.61% teacher, the label-free DeiT 99.1% and the CLIP student
95.3% by the quickstart's recipes. Parts and seeds can
run at once as processes on one workdir (`--config.clip_recipes.parts='("weak",)'`,
`--config.clip_recipes.seeds='(2,)'`); a finished student is read back, not rerun.
Expected: docs/clip.md ("Recipes") has the measured tables.
"""

import ml_collections

from deit_jax.config import config_beside


def get_config():
    c = config_beside(__file__, "clip_quickstart.py")
    c.mode = "clip_recipes"
    with c.unlocked():
        c.clip_recipes = ml_collections.ConfigDict()
        c.clip_recipes.parts = ("losses", "weak")
        c.clip_recipes.seeds = (0, 1, 2)
        c.clip_recipes.losses = ("none", "kl", "fd", "icl", "clip_kd")  # part 1's
        c.clip_recipes.eval_every_epochs = 2.0
        c.clip_recipes.weak_teacher_epochs = 7
        c.clip_recipes.long_factor = 3.0
        # Run in this order, every seed of one first; WEAK_RECIPES has more (clip_kd_inherit,
        # clip_kd_inherit_long, deit_fm_long: 2-3x the time, not in the measured table).
        c.clip_recipes.weak_recipes = ("deit", "deit_fm", "clip_kl", "clip_kd", "clip_kl_inherit")
    return c
