r"""Distilled DeiT-Ti / S / B on ImageNet-1k (hard distillation from RegNetY-16GF), 300 epochs.

  # 1. the teacher: convert timm's regnety_160 weights (82.9% top-1) once
  python -m deit_jax.convert --checkpoint regnety_160.pth --model regnety_160 \
      --output /ckpt/regnety_160
  # 2. train the student
  python -m deit_jax.main --config configs/deit_distilled_imagenet.py:tiny \
      --workdir /runs/deit_ti_dist \
      --config.teacher.checkpoint=/ckpt/regnety_160 \
      --config.data.data_dir=/path/to/tensorflow_datasets --config.data.manual_dir=/path/to/imagenet

Argument: tiny | small | base. The teacher runs inside the same jitted step, adding about 40%
(Ti) to 15% (B) to the step's FLOPs. Hardware and time as configs/deit_imagenet.py plus that.
Expected ImageNet top-1 (paper, both heads averaged): DeiT-Ti 74.5, DeiT-S 81.2, DeiT-B 83.4;
class head alone 73.9 / 80.9 / 83.0, distillation head alone 74.6 / 81.1 / 83.1.
ImageNet / ImageNet-ReaL / ImageNet-V2 (matched-frequency) top-1, timm's evaluation of the released
weights (pytorch-image-models results/ CSVs, commit aa4b585, crop 0.9):
DeiT-Ti 74.54 / 82.01 / 62.76, DeiT-S 81.20 / 86.99 / 70.51, DeiT-B 83.38 / 88.21 / 72.97. Evaluate
all three in one run: --config.data.extra_eval=imagenet2012_real,imagenet_v2/matched-frequency:test
(each prepared once with `tfds build`; ReaL reports `real_top1` under eval_imagenet2012_real/).
"""

from deit_jax.config import base_config

VARIANTS = {
    "tiny": "deit_tiny_distilled_patch16_224",
    "small": "deit_small_distilled_patch16_224",
    "base": "deit_base_distilled_patch16_224",
}


def get_config(variant: str = "tiny"):
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}: choose one of {sorted(VARIANTS)}.")
    c = base_config()
    c.model_name = VARIANTS[variant]
    c.distillation.kind = "hard"
    c.distillation.alpha = 0.5
    c.teacher.name = "regnety_160"
    c.data.name = "imagenet2012"
    return c
