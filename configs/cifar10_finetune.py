r"""Fine-tune an ImageNet DeiT on CIFAR-10 (tfds `cifar10`, downloaded by tfds on first use).

  python -m deit_jax.convert --checkpoint deit_base_patch16_224-b5f2ef4d.pth \
      --model deit_base_patch16_224 --output /ckpt/deit_b_224
  python -m deit_jax.main --config configs/cifar10_finetune.py --workdir /runs/deit_b_cifar10 \
      --config.init_from=/ckpt/deit_b_224

Images are upsampled 32 -> 224 (as in the paper's transfer experiments); the 1000-class head is
replaced by a fresh 10-class head. Hardware and time: a few hours on one A100 / TPU v3-8 with
`--config.dtype=bfloat16`. Expected top-1 (paper, Table 7, transfer): DeiT-B 99.1.
"""

from deit_jax.config import base_config


def get_config():
    c = base_config()
    c.model_name = "deit_base_patch16_224"
    c.distillation.kind = "none"
    c.data.name = "cifar10"
    c.data.eval_split = "test"
    c.data.repeated_aug = 1
    c.data.crop_pct = 1.0
    c.num_epochs = 30.0
    c.batch_size = 512
    c.eval_batch_size = 512
    c.optim.lr = 5e-5
    c.optim.weight_decay = 1e-4
    c.optim.warmup_epochs = 2
    c.optim.min_lr = 1e-6
    c.optim.ema_decay = 0.0
    return c
