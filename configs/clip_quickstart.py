r"""The CLIP quickstart: a CLIP teacher distilled label-free into a DeiT and into a smaller CLIP.

  python -m deit_jax.main --config configs/clip_quickstart.py --workdir /tmp/clip_quickstart

Offline: scikit-learn's digits become image-caption pairs (three captions an image, "a photo of
the digit 7.", "a handwritten seven.", "a thick 7, written by hand."); a CLIP teacher (128-wide
2-block towers) is trained on them with open_clip's own model and `ClipLoss`, saved as an
open_clip file and converted; then, for seeds 0-2, (a) its zero-shot head is distilled
label-free into a small DeiT, beside the same DeiT trained with labels, and (b) its in-batch
image-text logits are distilled (KL only) into a CLIP student with 64-wide towers, beside the
same student trained by CLIP's loss alone (deit_jax/experiments/clip_quickstart.py). Every
student: 40 epochs of the 1,437 train digits at 16 px, batch 64; scored on the 360 test digits
(a CLIP student zero-shot, by its own text tower and the teacher's prompt).

Why these recipes (the KL alone for the CLIP student, no mixup for the DeiT): against a weaker
teacher (78.61%) they keep 95.3% and 99.1% of its top-1, and no candidate (CLIP-KD's losses,
inheritance, function matching) did better beyond the seeds' spread (configs/clip_recipes.py,
docs/clip.md "Recipes on the digits"). With a strong teacher, inheritance
(`--config.init_from=<teacher> --config.init.inherit=True`) adds 1.4-1.7 points.

Hardware and time: a 2-core CPU, 11 to 13 minutes (the teacher 1.5 to 2, each student about
1), peak RSS 3.0 GB. Expected (docs/clip.md has the measured table): the teacher's zero-shot
top-1 98.06%; the label-free DeiT 97.69% and the CLIP student 95.37% (means of seeds), both
above 90% of the teacher's.

One stage alone is an ordinary training run: e.g. the CLIP student by KL,

  python -m deit_jax.main --config configs/clip_quickstart.py --workdir /tmp/clip_kl \
      --config.mode=train --config.distillation.kind=in_batch \
      --config.data.name=captions:/tmp/clip_quickstart/data/pairs \
      --config.teacher.checkpoint=/tmp/clip_quickstart/teacher/deit_jax \
      --config.teacher.prompts=/tmp/clip_quickstart/data/pairs/prompts.txt

and with `--config.mode=teacher_cache` (workdir: the cache) then `--config.teacher.cache=DIR`,
the same student from the teacher's cached image and caption embeddings.
"""

import ml_collections

from deit_jax.config import base_config
from deit_jax.models.clip import CLIP_MEAN, CLIP_STD


def get_config():
    c = base_config()
    c.mode = "clip_quickstart"
    # The CLIP student: 64-wide 2-block towers (the teacher's are 128 wide), 16 px in 4 px patches.
    c.model_name = "clip_vit_ti16"
    with c.unlocked():
        c.model.img_size = 16
        c.model.patch_size = 4
        c.model.vision_width = 64
        c.model.vision_layers = 2
        c.model.text_width = 64
        c.model.text_layers = 2
        c.model.embed_dim = 64
        c.model.context_length = 16
        c.clip_quickstart = ml_collections.ConfigDict()
        c.clip_quickstart.seeds = (0, 1, 2)
        c.clip_quickstart.teacher_epochs = 60
        c.clip_quickstart.teacher_width = 128
        # The DeiT of reading (a): the quickstart's (64 wide, 4 blocks, 4 px patches).
        c.clip_quickstart.deit_model_name = "deit_tiny_patch16_224"
        c.clip_quickstart.deit_model = ml_collections.ConfigDict(
            {"embed_dim": 64, "depth": 4, "num_heads": 4, "patch_size": 4, "drop_path_rate": 0.0}
        )
        c.clip_quickstart.deit_lr = 1e-2  # the quickstart's (per 512 images: 1.25e-3 at 64)
    c.model.drop_path_rate = 0.0
    c.teacher.framework = "clip"
    c.teacher.name = "clip_vit_b32"  # the converted weights give its sizes
    c.distillation.kind = "in_batch"
    c.distillation.alpha = 1.0
    c.distillation.tau = 1.0
    # Filled in by the experiment (its data folder and the converted teacher).
    c.data.name = "captions:/tmp/clip_quickstart/data/pairs"
    c.data.train_split = "train[:1437]"  # the digits' train split, then its 360 test images
    c.data.eval_split = "train[1437:]"
    c.data.extra_eval = "digits:test"  # zero-shot top-1 on the same 360 test images, labelled
    c.data.img_size = 16
    c.data.crop_pct = 1.0
    c.data.repeated_aug = 1
    c.data.shuffle_buffer = 2048
    c.augment.mean = CLIP_MEAN
    c.augment.std = CLIP_STD
    c.augment.scale = (0.5, 1.0)
    c.augment.randaugment = ""
    c.augment.color_jitter = 0.0
    c.augment.reprob = 0.0
    c.augment.hflip = 0.0  # digits are not mirror-symmetric
    c.mixup.mixup_alpha = 0.0
    c.mixup.cutmix_alpha = 0.0
    c.mixup.label_smoothing = 0.0
    c.batch_size = 64
    c.eval_batch_size = 120
    c.num_epochs = 40.0
    c.eval_every_epochs = 10.0
    c.log_every_steps = 22
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 1
    c.optim.lr = 8e-3  # per 512 images (optim.lr_batch_base): 1e-3 at batch 64
    c.optim.warmup_epochs = 1.0
    c.optim.weight_decay = 0.1
    c.optim.ema_decay = 0.0
    return c
