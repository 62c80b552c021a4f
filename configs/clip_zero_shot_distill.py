r"""A KL-only CLIP loop: distil CLIP ViT-B/32's zero-shot predictions into a DeiT.

  # 1. one download, on a machine with network: OpenAI's ViT-B/32, as transformers stores it
  huggingface-cli download openai/clip-vit-base-patch32 --local-dir /ckpt/clip-vit-base-patch32
  #    (or: python -c "from transformers import CLIPModel, CLIPProcessor as P;
  #     m, d = 'openai/clip-vit-base-patch32', '/ckpt/clip-vit-base-patch32';
  #     CLIPModel.from_pretrained(m).save_pretrained(d); P.from_pretrained(m).save_pretrained(d)")
  # 2. convert it once (records QuickGELU and the sizes, copies the tokenizer files)
  python -m deit_jax.convert --checkpoint /ckpt/clip-vit-base-patch32 --model clip_vit_b32 \
      --output /ckpt/clip_vit_b32
  # 3. train the student (argument: epochs, 10 by default); the first evaluation reports the
  #    teacher's zero-shot top-1 (teacher_top1), the student's, their agreement and KL
  python -m deit_jax.main --config configs/clip_zero_shot_distill.py:10 --workdir /runs/clip_ti \
      --config.teacher.checkpoint=/ckpt/clip_vit_b32 \
      --config.data.data_dir=/path/to/tensorflow_datasets --config.data.manual_dir=/path/to/imagenet
  # or distil once into a teacher cache (top-10 per image: at T = 1 nearly the full gradient,
  # see the README's cache section), then train any number of students from it
  python -m deit_jax.main --config configs/clip_zero_shot_distill.py:10 --workdir /cache/clip_b32 \
      --config.teacher.checkpoint=/ckpt/clip_vit_b32 --config.mode=teacher_cache  (+ data flags)
  python -m deit_jax.main --config configs/clip_zero_shot_distill.py:10 --workdir /runs/clip_ti \
      --config.teacher.checkpoint=/ckpt/clip_vit_b32 --config.teacher.cache=/cache/clip_b32 ...
  # without labels: any folder of images, the classes to distil named explicitly
  python -m deit_jax.main --config configs/clip_zero_shot_distill.py:10 --workdir /runs/photos \
      --config.teacher.checkpoint=/ckpt/clip_vit_b32 --config.data.name=images:/photos \
      --config.data.train_split='train[:95%]' --config.data.eval_split='train[95%:]' \
      --config.teacher.class_names=/photos_classes.txt

(`teacher.checkpoint` may also be the transformers directory of step 1 itself, or an open_clip /
OpenAI file: they are read the same way, only converted on every start.)

The recipe, the usual transformers loop of `CLIPModel` + `CLIPProcessor` with a KL loss: teacher
logits = CLIP's `logits_per_image` for one prompt
set per class (`teacher.prompts=openai`: the 80 templates of CLIP's ImageNet evaluation,
averaged into one text embedding per class; open_clip's curated ImageNet class names); loss =
`F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean")` alone (soft,
`kl_reduction=batchmean`, alpha 1: no label term; T = 1, and `tau_squared=False`: no Hinton
T^2 factor, so the term is that `F.kl_div` for any T); Adam at lr 1e-5 (weight decay 0, no warmup,
constant: min_lr = lr, not scaled with the batch); batch 32. A plain DeiT-Ti student (no
distillation token: with alpha 1 a distilled model's class head would never train). Light
augmentation (random resized crop, flip; no RandAugment, erasing or mixup); the teacher sees
the student's exact crops, in CLIP's normalisation. Evaluation crops as CLIP's preprocessing
does (crop_pct 1: resize the short side to 224, centre crop).

Hardware and time: not run with deit_jax at this size (no ImageNet or pretrained CLIP weights on
the development machine); the README's "Distil CLIP" section has the measured step times of the
live and cached teacher on small sizes. The text tower runs once, before training: 1,000 classes
x 80 templates = 80,000 prompts, about a minute on a GPU (it is a large share of a CPU-only run:
hours on 2 cores), saved in the workdir and reused by a resume. Per image, CLIP ViT-B/32's image
tower costs 4.4 GFLOPs, DeiT-Ti's training step about 3 x 1.3: the live teacher roughly doubles
a plain DeiT-Ti step, the cached one costs about a plain step. At lr 1e-5 and batch 32 an epoch
of ImageNet is 40,000 steps.
Expected ImageNet top-1: the teacher, zero-shot, 63.3% (open_clip's results table for OpenAI's
ViT-B/32 with the 80 templates; deit_jax's resize is TensorFlow's antialiased bicubic, not PIL's,
so expect it within a few tenths). The student: no deit_jax measurement yet; it learns CLIP's
zero-shot function, so its top-1 is bounded by about the teacher's, and at this small learning
rate it approaches it slowly.
"""

from deit_jax.config import base_config


def get_config(epochs: str = "10"):
    c = base_config()
    c.model_name = "deit_tiny_patch16_224"
    c.teacher.framework = "clip"
    c.teacher.name = "clip_vit_b32"
    c.teacher.prompts = "openai"
    c.teacher.class_names = ""  # the data set's own: open_clip's curated ImageNet names
    c.distillation.kind = "soft"
    c.distillation.kl_reduction = "batchmean"
    c.distillation.alpha = 1.0
    c.distillation.tau = 1.0
    c.distillation.tau_squared = False  # the loop's plain F.kl_div, for any T (equal at T = 1)
    c.data.name = "imagenet2012"
    c.data.crop_pct = 1.0
    c.data.repeated_aug = 1
    c.augment.randaugment = ""
    c.augment.color_jitter = 0.0
    c.augment.reprob = 0.0
    c.mixup.mixup_alpha = 0.0
    c.mixup.cutmix_alpha = 0.0
    c.mixup.label_smoothing = 0.0  # the label term has weight 0
    c.batch_size = 32
    c.eval_batch_size = 256
    c.num_epochs = float(epochs)
    c.optim.lr = 1e-5
    c.optim.unscale_lr = True
    c.optim.min_lr = 1e-5  # constant, as the loop's plain Adam
    c.optim.warmup_epochs = 0.0
    c.optim.weight_decay = 0.0
    c.optim.ema_decay = 0.0
    c.model.drop_path_rate = 0.0
    c.log_every_steps = 100
    c.checkpoint_every_steps = 5000
    return c
