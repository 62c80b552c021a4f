r"""DeiT-Ti / S / B on ImageNet-1k, 300 epochs, the reference recipe (no distillation).

  python -m deit_jax.main --config configs/deit_imagenet.py:tiny --workdir gs://bucket/deit_ti \
      --config.data.data_dir=/path/to/tensorflow_datasets --config.data.manual_dir=/path/to/imagenet

`imagenet2012` needs ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in `manual_dir`; tfds
prepares it on first use (hours, ~150 GB). Argument: tiny | small | base.

Hardware and time: the paper trains DeiT-B in 53 h on one 8-V100 node (DeiT-S about 3 days on
4 GPUs, DeiT-Ti similar); expect the same order on a TPU v3-8 / 8 A100s, and about 5x less on a
v4-32 or 8 H100s with `--config.dtype=bfloat16`.
Expected ImageNet top-1 (paper): DeiT-Ti 72.2, DeiT-S 79.8, DeiT-B 81.8.
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
