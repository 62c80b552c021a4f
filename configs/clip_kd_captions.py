r"""CLIP-KD's recipe: a CLIP ViT-B/16 distilled from a CLIP ViT-L/14 on web image-caption pairs.

  # 1. the teacher: CLIP-KD's, open_clip's ViT-L-14 trained on LAION-400M
  #    (vit_l_14-laion400m_e32-3d133497.pt from open_clip's releases), converted once
  python -m deit_jax.convert --checkpoint vit_l_14-laion400m_e32-3d133497.pt \
      --model clip_vit_l14 --output /ckpt/clip_vit_l14
  # 2. the pairs in img2dataset's layout (0001.jpg + 0001.txt), e.g. CC3M + CC12M
  python -m deit_jax.main --config configs/clip_kd_captions.py --workdir /runs/clip_kd_b16 \
      --config.teacher.checkpoint=/ckpt/clip_vit_l14 --config.data.name=captions:/data/cc3m_cc12m \
      --config.data.extra_eval=imagenet2012:validation   # zero-shot top-1, once tfds has it
  # or first, on any CPU: what it costs on a v5e-8 (docs/planning.md)
  python -m deit_jax.main --config configs/clip_kd_captions.py --workdir /tmp/plan_clip_kd \
      --config.mode=plan --config.plan.target=tpu:v5e:2x4

The recipe is CLIP-KD's (Yang et al., CVPR 2024; winycg/CLIP-KD's script for this pair,
script/ViT_L_14_KD_Laion/ViT_B_16_kd.sh): the losses summed as it weights them, CLIP's
contrastive loss 1, the in-batch KL 1 (its CRD), interactive contrastive learning 1, feature
distillation 2000 (`distillation.pair_weights`, docs/clip.md "Losses"); AdamW at lr 1e-3 for a
global batch of 1,024 (8 GPUs x 128; betas 0.9 / 0.98, eps 1e-6: open_clip's for a ViT; weight
decay 0.1), 10,000 warmup steps (0.8 epochs here), cosine to 0, 32 epochs of CC3M + CC12M
(12.86 M pairs as CLIP-KD downloaded them: 2.89 M + 9.97 M; `plan.num_examples`); open_clip's
training crops (scale 0.9-1, bicubic, no flip) in CLIP's normalisation; bfloat16. The student
starts from scratch: `--config.init_from=/ckpt/clip_vit_l14 --config.init.inherit=True` grows it
from the teacher instead (TinyCLIP's inheritance; docs/clip.md's digits table says what it buys
there).

Hardware and time: not run with deit_jax (no web-scale pairs or accelerator on the development
machine). docs/planning.md has the plan: the step's memory and FLOPs on a v5e-8, the
roofline's hours and the input-side CPUs.
Expected: CLIP-KD's README reports 57.5% zero-shot ImageNet top-1 for this student with this
teacher (72.8%), against 37.0% for the same student trained on the pairs by CLIP's loss alone;
no deit_jax measurement yet.
"""

from deit_jax.config import base_config
from deit_jax.models.clip import CLIP_MEAN, CLIP_STD


def get_config():
    c = base_config()
    c.model_name = "clip_vit_b16"
    c.model.drop_path_rate = 0.0
    c.dtype = "bfloat16"
    c.teacher.framework = "clip"
    c.teacher.name = "clip_vit_l14"
    c.teacher.checkpoint = "/ckpt/clip_vit_l14"
    c.distillation.kind = "in_batch"
    c.distillation.tau = 1.0
    c.distillation.pair_weights.clip = 1.0
    c.distillation.pair_weights.kl = 1.0
    c.distillation.pair_weights.icl = 1.0
    c.distillation.pair_weights.fd = 2000.0
    c.data.name = "captions:/data/cc3m_cc12m"
    c.data.train_split = "train[:99.9%]"
    c.data.eval_split = "train[99.9%:]"  # about 12,900 held-out pairs for recall
    c.data.extra_eval = ""  # e.g. imagenet2012:validation: the student's zero-shot top-1
    c.data.crop_pct = 1.0
    c.data.repeated_aug = 1
    c.augment.mean = CLIP_MEAN
    c.augment.std = CLIP_STD
    c.augment.scale = (0.9, 1.0)
    c.augment.randaugment = ""
    c.augment.color_jitter = 0.0
    c.augment.reprob = 0.0
    c.augment.hflip = 0.0
    c.mixup.mixup_alpha = 0.0
    c.mixup.cutmix_alpha = 0.0
    c.mixup.label_smoothing = 0.0
    c.batch_size = 1024
    c.eval_batch_size = 1024
    c.num_epochs = 32.0
    c.optim.lr = 1e-3
    c.optim.lr_batch_base = 1024
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.1
    c.optim.warmup_epochs = 10_000 / (12_860_000 * 0.999 / 1024)
    c.optim.warmup_lr = 0.0
    c.optim.min_lr = 0.0
    c.optim.ema_decay = 0.0
    c.plan.num_examples = 12_860_000
    return c
