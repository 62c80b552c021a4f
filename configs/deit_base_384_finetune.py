r"""Fine-tune DeiT-B (distilled) at 384x384 from converted 224 weights, 30 epochs (reference).

  python -m deit_jax.convert --checkpoint deit_base_distilled_patch16_224-df68dfff.pth \
      --model deit_base_distilled_patch16_224 --output /ckpt/deit_b_dist_224
  python -m deit_jax.main --config configs/deit_base_384_finetune.py --workdir /runs/deit_b_384 \
      --config.init_from=/ckpt/deit_b_dist_224 --config.teacher.checkpoint=/ckpt/regnety_160

Position embeddings are resized 14x14 -> 24x24 with the reference's bicubic interpolation when the
weights are loaded. The teacher sees the images at its own 224 resolution (`teacher.img_size`).
Hardware and time: about 20 h on 8 V100s in the paper's setting; ~3x the per-image cost of 224.
Expected ImageNet top-1 (paper): DeiT-B 384 83.1, DeiT-B distilled 384 85.2.
ImageNet / ImageNet-ReaL / ImageNet-V2 (matched-frequency) top-1, timm's evaluation of the released
weights (pytorch-image-models results/ CSVs, commit aa4b585, crop 1.0):
DeiT-B 384 83.11 / 87.86 / 72.52, DeiT-B distilled 384 85.44 / 89.43 / 75.40
(--config.data.extra_eval=imagenet2012_real,imagenet_v2/matched-frequency:test adds the two).
"""

from deit_jax.config import base_config


def get_config():
    c = base_config()
    c.model_name = "deit_base_distilled_patch16_384"
    c.data.name = "imagenet2012"
    c.data.img_size = 384
    c.data.crop_pct = 1.0  # the reference evaluates 384 models at full crop
    c.distillation.kind = "hard"
    c.teacher.name = "regnety_160"
    c.teacher.img_size = 224
    c.num_epochs = 30.0
    c.batch_size = 512
    c.optim.lr = 5e-6
    c.optim.weight_decay = 1e-8
    c.optim.min_lr = 5e-6
    c.optim.warmup_epochs = 0
    c.optim.ema_decay = 0.0
    return c
