r"""A small DeiT on scikit-learn's digits (offline, no download): a 2-minute CPU smoke run.

  python -m deit_jax.main --config configs/digits.py --workdir /tmp/deit_digits

Trains a 4-block, 64-wide DeiT (patch 4 on 16x16 upsampled digits) without distillation for 20
epochs on the 1,437 training images and evaluates on the 360 test images. Hardware and time: about
2 minutes on 2 CPU cores. Not tuned: the same run with the distilled variant's class head reached
72.5% test top-1 (no paper number: this is a smoke run; configs/quickstart.py will be the tuned
distillation demo). For hard distillation, train a teacher with `--config.model_name=cnn_small`,
then add `--config.model_name=deit_tiny_distilled_patch16_224 --config.distillation.kind=hard
--config.teacher.checkpoint=TEACHER_WORKDIR/weights`.
"""

from deit_jax.config import base_config


def get_config():
    c = base_config()
    c.model_name = "deit_tiny_patch16_224"
    with c.unlocked():
        c.model.embed_dim = 64
        c.model.depth = 4
        c.model.num_heads = 4
        c.model.patch_size = 4
    c.model.drop_path_rate = 0.0
    c.distillation.kind = "none"
    c.teacher.name = "cnn_small"
    c.data.name = "digits"
    c.data.eval_split = "test"
    c.data.img_size = 16
    c.data.repeated_aug = 1
    c.data.shuffle_buffer = 2048
    c.augment.randaugment = ""
    c.augment.color_jitter = 0.0
    c.augment.reprob = 0.0
    c.augment.hflip = 0.0  # digits are not mirror-symmetric
    c.augment.scale = (0.5, 1.0)
    c.mixup.mixup_alpha = 0.0
    c.mixup.cutmix_alpha = 0.0
    c.batch_size = 64
    c.eval_batch_size = 360
    c.num_epochs = 20.0
    c.eval_every_epochs = 5.0
    c.log_every_steps = 20
    c.checkpoint_every_steps = 200
    c.optim.lr = 4e-3  # at batch 512; scaled to 5e-4 at batch 64
    c.optim.warmup_epochs = 2
    c.optim.ema_decay = 0.0
    return c
