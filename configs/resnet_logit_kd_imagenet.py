r"""Logit KD of a ResNet-50 (or ResNet-18) student from RegNetY-16GF on ImageNet-1k, 300 epochs.

  # 1. the teacher: convert timm's regnety_160 weights (82.9% top-1) once
  python -m deit_jax.convert --checkpoint regnety_160.pth --model regnety_160 \
      --output /ckpt/regnety_160
  # 2. train the student (argument resnet50 | resnet18)
  python -m deit_jax.main --config configs/resnet_logit_kd_imagenet.py:resnet50 \
      --workdir /runs/r50_kd --config.teacher.checkpoint=/ckpt/regnety_160 \
      --config.data.data_dir=/path/to/tensorflow_datasets --config.data.manual_dir=/path/to/imagenet

Hinton's logit KD as timm's `LogitDistillationTask` computes it: the student's single head
against the tempered teacher, KL summed over classes and averaged over the batch
(`kl_reduction="batchmean"`) times T^2, with T = 4 and equal weights (alpha 0.5; timm's default
independent weights 1 and 1 are this total times 2). Data and schedule follow timm's "ResNet
strikes back" A2 recipe (300 epochs, LAMB at lr 5e-3 for batch 2048, weight decay 0.02, binary
cross-entropy on the binarised mixed targets, RandAugment m7, mixup 0.1 / cutmix 1.0, no label
smoothing, no repeated augmentation); the KD weights and temperature are untuned here.

Hardware and time: not run with deit_jax (no ImageNet on the development machine). The RegNetY
teacher's forward (16 GFLOPs) costs more than a ResNet-50 training step's 3 x 4.1 GFLOPs, so
expect about 2.3x the time of plain ResNet-50 training. Estimate, not a measurement: 8 A100s
train a ResNet-50 at about 20k img/s in bfloat16 (--config.dtype=bfloat16), 300 epochs in about
6 hours; with the teacher, about 14 hours (ResNet-18: about the teacher's cost alone, ~8 hours).
Expected ImageNet top-1: no deit_jax measurement yet. Reference points: ResNet-50 without KD,
timm A2 (300 epochs) 79.8; the teacher 82.9; a student trained this way should land between the
two. ResNet-18: timm A2 70.6 without KD.
"""

import ml_collections

from deit_jax.config import base_config

STUDENTS = ("resnet50", "resnet18")


def get_config(student: str = "resnet50"):
    if student not in STUDENTS:
        raise ValueError(f"Unknown student {student!r}: choose one of {STUDENTS}.")
    c = base_config()
    c.model_name = student
    with c.unlocked():  # ResNets take no drop_path_rate / drop_rate
        c.model = ml_collections.ConfigDict({"num_classes": None})
    c.teacher.name = "regnety_160"
    c.distillation.kind = "soft"
    c.distillation.alpha = 0.5
    c.distillation.tau = 4.0
    c.distillation.kl_reduction = "batchmean"
    c.data.name = "imagenet2012"
    c.data.repeated_aug = 1
    c.augment.randaugment = "rand-m7-mstd0.5-inc1"
    c.augment.reprob = 0.0
    c.mixup.mixup_alpha = 0.1
    c.mixup.cutmix_alpha = 1.0
    c.mixup.label_smoothing = 0.0
    c.loss = "bce"
    c.batch_size = 2048
    c.optim.name = "lamb"
    c.optim.lr = 1.25e-3  # for batch 512: A2's 5e-3 at 2048
    c.optim.weight_decay = 0.02
    c.optim.warmup_epochs = 5.0
    c.optim.ema_decay = 0.0
    c.num_epochs = 300.0
    return c
