r"""DeiT-Ti / S / B on ImageNet-1k, 300 epochs, the reference recipe (no distillation).

  python -m deit_jax.main --config configs/deit_imagenet.py:tiny --workdir gs://bucket/deit_ti \
      --config.data.data_dir=/path/to/tensorflow_datasets --config.data.manual_dir=/path/to/imagenet

`imagenet2012` needs ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in `manual_dir`; tfds
prepares it on first use (hours, ~150 GB). Argument: tiny | small | base.

Hardware and time: the paper trains DeiT-B in 53 h on one 8-V100 node (DeiT-S about 3 days on
4 GPUs, DeiT-Ti similar); expect the same order on a TPU v3-8 / 8 A100s, and about 5x less on a
v4-32 or 8 H100s with `--config.dtype=bfloat16`.
Expected ImageNet top-1 (paper): DeiT-Ti 72.2, DeiT-S 79.8, DeiT-B 81.8.
ImageNet / ImageNet-ReaL / ImageNet-V2 (matched-frequency) top-1, timm's evaluation of the released
weights (pytorch-image-models results/ CSVs, commit aa4b585, crop 0.9):
DeiT-Ti 72.19 / 80.03 / 59.92, DeiT-S 79.86 / 85.67 / 68.53, DeiT-B 81.98 / 86.83 / 70.97. Evaluate
all three in one run: --config.data.extra_eval=imagenet2012_real,imagenet_v2/matched-frequency:test
(each prepared once with `tfds build`; ReaL reports `real_top1` under eval_imagenet2012_real/).
"""

from deit_jax.config import base_config

VARIANTS = {
    "tiny": "deit_tiny_patch16_224",
    "small": "deit_small_patch16_224",
    "base": "deit_base_patch16_224",
}


def get_config(variant: str = "tiny"):
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}: choose one of {sorted(VARIANTS)}.")
    c = base_config()
    c.model_name = VARIANTS[variant]
    c.distillation.kind = "none"
    c.data.name = "imagenet2012"
    return c
