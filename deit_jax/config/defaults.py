"""Every configuration key deit_jax reads, with the reference DeiT defaults.

Configs under `configs/` start from `base_config()` and change what their recipe needs. The
returned ConfigDict is locked: an unknown key (a typo in a config file or a `--config.key=value`
override) is an error that names the closest valid keys. Each default is written here only;
what a value may be is `deit_jax.config.rules`.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What `python -m deit_jax.main` does with a config (`config.mode`), as the rules' messages say it.
MODES = {
    "train": "train, resuming from WORKDIR's checkpoints",
    "eval": "evaluate WORKDIR's latest checkpoint or init_from",
    "teacher_cache": "write the teacher's outputs over the run's batches",
    "quickstart": "the experiment of configs/quickstart.py",
    "clip_quickstart": "the experiment of configs/clip_quickstart.py",
    "clip_recipes": "the experiment of configs/clip_recipes.py",
    "plan": "compile the run for plan.target on this host and say what it costs",
}
# The modes that run an offline experiment (deit_jax/experiments/): each trains its own teacher
# and writes its own data, so no rule asks for them on disk.
EXPERIMENTS = ("quickstart", "clip_quickstart", "clip_recipes")
# Where a teacher comes from (`config.teacher.framework`).
TEACHER_FLAX, TEACHER_TORCH, TEACHER_CLIP = "flax", "torch", "clip"
TEACHER_FRAMEWORKS = {
    TEACHER_FLAX: "a registry model",
    TEACHER_TORCH: "a timm model, for the cache writer",
    TEACHER_CLIP: "a CLIP model as a zero-shot classifier",
}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # fixes the data stream (shuffles, augmentation, mixup) and, by default, the model
    # The student's initialisation and dropout (None: `seed`). Varying it alone keeps the data
    # stream, so one teacher cache serves every such seed.
    c.init_seed = ml_collections.FieldReference(None, field_type=int)
    # train | eval | teacher_cache (deit_jax/teacher/cache/) | quickstart (the experiment of
    # configs/quickstart.py, deit_jax/experiments/quickstart.py) | clip_quickstart
    # (configs/clip_quickstart.py, deit_jax/experiments/clip_quickstart.py) | plan (compile
    # the run for `plan.target` and say what it costs, deit_jax/plan/)
    c.mode = "train"

    # Student: a registered model name plus `create_model` overrides (configs may add more keys
    # under `with c.unlocked():`). `img_size` is `data.img_size`; `num_classes` the data's.
    c.model_name = "deit_tiny_distilled_patch16_224"
    c.model = ml_collections.ConfigDict()
    c.model.drop_path_rate = 0.1
    c.model.drop_rate = 0.0
    c.model.num_classes = ml_collections.FieldReference(None, field_type=int)  # None: data's
    # None: the registered model's; True adds a distillation token (e.g. to a deit3_* student).
    c.model.distilled = ml_collections.FieldReference(None, field_type=bool)
    # DeiT kernels for big models (None: off; other students take neither): attention "xla" |
    # "cudnn" (jax.nn.dot_product_attention; cudnn needs a GPU and bfloat16), and remat, a
    # jax.checkpoint_policies name (e.g. "nothing_saveable") that rematerialises every block.
    c.model.attention = ml_collections.FieldReference(None, field_type=str)
    c.model.remat = ml_collections.FieldReference(None, field_type=str)
    c.init_from = ""  # deit_jax weights directory (python -m deit_jax.convert) to fine-tune from
    # Weight inheritance (TinyCLIP's; deit_jax/weights/inherit.py): a smaller student starts from
    # a larger model's weights, its blocks at even intervals, the leading heads and channels.
    c.init = ml_collections.ConfigDict()
    # True: `init_from` is a larger DeiT / CLIP (a deit_jax weights directory, the teacher's
    # size) that the student inherits from, instead of weights of the student's own size.
    c.init.inherit = False
    # The teacher block of each student block: "even" (TinyCLIP's: block i takes block
    # i * (teacher depth // student depth)) or a comma list, one per student block ("0,3,7,11").
    # `inherit_layers` is a DeiT's blocks or a CLIP's image tower, `inherit_text_layers` its text.
    c.init.inherit_layers = "even"
    c.init.inherit_text_layers = "even"
    # A CLIP student's towers from other weights directories (over `init_from`'s): the image
    # tower from a CLIP or a DeiT / ViT (its blocks laid out as CLIP's), the text tower (with
    # logit_scale) from a CLIP; inherited when `inherit` is on, else of the student's sizes.
    c.init.image_tower_from = ""
    c.init.text_tower_from = ""

    c.teacher = ml_collections.ConfigDict()
    c.teacher.name = "regnety_160"
    c.teacher.checkpoint = ""  # deit_jax weights directory or .pth/.safetensors file
    c.teacher.img_size = ml_collections.FieldReference(None, field_type=int)  # None: student's
    # flax: a registry model (`name`) with deit_jax or converted weights, run in the train step.
    # torch: any timm model `name` with a local checkpoint file, run by PyTorch (cache writer only).
    # clip: a CLIP model (`name` clip_vit_b32, ...; `checkpoint` a deit_jax weights directory from
    # python -m deit_jax.convert, a transformers CLIP directory or an open_clip / OpenAI file) as a
    # zero-shot classifier of `class_names` with `prompts` (deit_jax/teacher/clip/zero_shot.py).
    c.teacher.framework = TEACHER_FLAX
    # The classes' names, for the CLIP teacher's prompts and a label-free data set's class count:
    # "" = the data set's own (tfds ClassLabel names, folder names; open_clip's curated names for
    # ImageNet's WordNet ids), "a,b,c" = these, or a file with one name per line.
    c.teacher.class_names = ""
    # The CLIP teacher's prompt templates: "openai" (the 80 of CLIP's ImageNet evaluation),
    # "simple" (open_clip's 7), or a file with one template per line, each containing "{}".
    c.teacher.prompts = "openai"
    # A live teacher ensemble (deit_jax/config/members.py, deit_jax/teacher/build.py): member
    # name -> the teacher keys in which that member differs from the ones above, and its
    # `weight`. In a config file:
    #   config.teacher.members = {"regnet": dict(checkpoint="R", weight=0.7),
    #       "clip": dict(framework="clip", name="clip_vit_b32", checkpoint="C", weight=0.3)}
    # and on the command line --config.teacher.members.clip.weight=0.5. Every member runs in the
    # train step; the target is the weighted mean of their probabilities. Empty: one teacher.
    c.teacher.members = ml_collections.ConfigDict()
    # Teacher-output cache (deit_jax/teacher/cache/). `cache`: a cache directory written by
    # `--config.mode=teacher_cache` with this config; training then reads the teacher's outputs
    # from it instead of running a teacher. Several, "A,B,C" (caches of one stream, each written
    # once), are an ensemble mixed at read time with `cache_weights` ("0.5,0.3,0.2"; "" = equal):
    # the target is the weighted mean of the members' probabilities (deit_jax/teacher/cache/mix.py).
    c.teacher.cache = ""
    c.teacher.cache_weights = ""
    c.teacher.cache_topk = 10  # top-k log-probabilities kept per example (hard needs 1)
    c.teacher.cache_dtype = "float16"  # float16 | float32 (exact soft targets)
    c.teacher.cache_epochs = ""  # "START:END": write only these epochs ("" = all)
    # Also store each example's teacher embedding (a registry model's pooled pre-logit features,
    # a CLIP teacher's image embedding), so that distillation.kind=feature trains from the cache.
    c.teacher.cache_embeddings = False
    c.teacher.cache_embedding_dtype = "float16"  # float16 | float32
    c.teacher.cache_chunk_steps = 100  # steps per chunk (a kill -9 loses at most one chunk)

    # Base criterion on the class head: "ce" (soft-target cross-entropy, the DeiT reference) or
    # "bce" (DeiT III: binary cross-entropy against the mixed targets binarised, targets > 0 -> 1;
    # mixup.label_smoothing is then ignored, i.e. 0, as in the reference recipe).
    c.loss = "ce"

    c.distillation = ml_collections.ConfigDict()
    # none | soft | hard (logit KD: the distillation head, or a plain student's only head) |
    # feature (pooled pre-logit features through a learned projection, `feature_loss`; live
    # teacher).
    c.distillation.kind = "none"
    c.distillation.alpha = 0.5  # total = (1 - alpha) * base + alpha * distillation
    c.distillation.tau = 1.0
    # Soft KD's summed KL divided by batch x classes ("numel", the DeiT reference) or by the
    # batch ("batchmean", Hinton / timm's tasks).
    c.distillation.kl_reduction = "numel"
    # Soft KD's KL times tau**2 (Hinton, the DeiT reference, timm); False: the plain KL, as a
    # KL-only loop computes F.kl_div(log_softmax(s / T), softmax(t / T), reduction="batchmean").
    c.distillation.tau_squared = True
    # Feature KD's distance: "mse" (timm's FeatureDistillationTask) or "cosine" (1 - cosine
    # similarity, e.g. to a CLIP teacher's image embedding).
    c.distillation.feature_loss = "mse"
    # A CLIP student's losses on image-caption pairs (the clip_student task; losses_pair.py,
    # docs/clip.md#losses), each a weight, any combination: clip (CLIP's contrastive loss), kl (the
    # teacher's in-batch softmax, both directions, at tau), fd (CLIP-KD's feature distillation),
    # icl (CLIP-KD's interactive contrastive loss, its own learned logit scale). Unset (None):
    # from kind and alpha, as before these keys: kind=in_batch is clip = 1 - alpha, kl = alpha;
    # kind=none is clip = 1, kl = 0. kl, fd and icl need kind=in_batch and a CLIP teacher. E.g.
    # --config.distillation.pair_weights.fd=2000 --config.distillation.pair_weights.icl=1.
    c.distillation.pair_weights = ml_collections.ConfigDict()
    c.distillation.pair_weights.clip = ml_collections.config_dict.placeholder(float)
    c.distillation.pair_weights.kl = ml_collections.config_dict.placeholder(float)
    c.distillation.pair_weights.fd = 0.0
    c.distillation.pair_weights.icl = 0.0

    c.data = ml_collections.ConfigDict()
    # Any tfds name, "digits" (offline), "folder:/path/to/root" (root/<split>/<class>/*.jpg), or
    # "images:/path/to/root": every image under root, any layout, without labels (one split,
    # "train"; slice it for evaluation; trains by distillation only, see the README).
    c.data.name = "imagenet2012"
    c.data.data_dir = ""  # tfds data_dir ("" = tfds default)
    c.data.manual_dir = ""  # where manually downloaded archives live (ImageNet)
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    # More eval sets, each logged under its own prefix: comma-separated "name[:split]" entries,
    # e.g. "imagenet2012_real, imagenet_v2:test" (deit_jax/data/eval_sets.py).
    c.data.extra_eval = ""
    c.data.img_size = 224
    c.data.crop_pct = 0.875  # eval: resize to int(img_size / crop_pct), then centre crop
    c.data.eval_interpolation = "bicubic"  # eval resize: bicubic (DeiT, timm) | bilinear
    c.data.repeated_aug = 3  # repeated augmentation factor (1 = off)
    c.data.shuffle_buffer = 16_384
    c.data.cache = False
    c.data.prefetch = 2  # batches prefetched onto the devices
    # Training data shares (0: one per process). A fixed count, a multiple of the process count,
    # makes the batches (and results) the same on any number of hosts (deit_jax/data/pipeline.py).
    c.data.num_shares = 0

    c.augment = ml_collections.ConfigDict()
    c.augment.scale = (0.08, 1.0)  # RandomResizedCrop area bounds
    c.augment.ratio = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio bounds
    c.augment.interpolation = "bicubic"
    c.augment.hflip = 0.5
    c.augment.randaugment = "rand-m9-mstd0.5-inc1"  # "" disables RandAugment
    c.augment.color_jitter = 0.4  # used only when RandAugment is off; 0 disables
    c.augment.reprob = 0.25  # random erasing probability
    c.augment.remode = "pixel"  # random erasing fill: per-pixel normal noise
    # DeiT III's 3-Augment: one of greyscale, solarisation, blur, then colour jitter (replaces
    # RandAugment and random erasing); `src` replaces RandomResizedCrop by resize + 4-px padded
    # random crop (deit_jax/data/three_augment.py).
    c.augment.three_augment = False
    c.augment.src = False
    c.augment.mean = IMAGENET_MEAN
    c.augment.std = IMAGENET_STD

    c.mixup = ml_collections.ConfigDict()
    c.mixup.mixup_alpha = 0.8
    c.mixup.cutmix_alpha = 1.0
    c.mixup.prob = 1.0
    c.mixup.switch_prob = 0.5
    c.mixup.mode = "batch"
    c.mixup.label_smoothing = 0.1

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"  # adamw | lamb (DeiT III)
    c.optim.lr = 5e-4  # for a global batch of 512; scaled linearly with the batch size
    c.optim.unscale_lr = False  # True: lr is the peak rate, not scaled by batch / lr_batch_base
    c.optim.lr_batch_base = 512
    c.optim.weight_decay = 0.05
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.warmup_epochs = 5.0  # may be fractional
    c.optim.warmup_lr = 1e-6
    c.optim.min_lr = 1e-5
    c.optim.clip_grad_norm = 0.0  # 0 = no clipping (reference)
    # k > 1: a classifier accumulates k batches of `batch_size` an update (optax.MultiSteps); a
    # CLIP student, whose loss spans the batch, splits each batch into k micro-batches and takes
    # the whole batch's loss and gradient with one micro-batch's memory (GradCache).
    c.optim.grad_accum_steps = 1
    c.optim.ema_decay = 0.99996  # 0 = no EMA

    c.batch_size = 1024  # global, over all processes
    c.eval_batch_size = 1024
    c.num_epochs = 300.0  # may be fractional
    c.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by the other axes
    c.mesh.fsdp = 1  # >1 shards parameters and optimiser state over this many devices

    c.log_every_steps = 50
    c.eval_every_epochs = 1.0
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.progress_bar = True

    # mode=plan (deit_jax/plan/): the run's train and eval steps compiled for `target` on this
    # host, without its devices, data or weights, and what the run would cost there.
    c.plan = ml_collections.ConfigDict()
    # tpu:<topology> (libtpu's names: tpu:v5e:2x2, tpu:v4:2x2x1, tpu:v5p:2x2x1, tpu:v6e:2x2) or
    # gpu:<card>:<count> (gpu:h100:8, gpu:h200:8, gpu:a100:8; needs jax's CUDA plugin).
    c.plan.target = "tpu:v5e:2x2"
    # The train split's size, for the run's hours, where the data's metadata does not give it
    # without its files (0: the data's).
    c.plan.num_examples = 0
    # A GPU target's GpuTargetConfigProto (text), a file: XLA's
    # xla/backends/gpu/target_config/specs/<card>.txtpb, or a card's own (docs/planning.md).
    c.plan.gpu_target_config = ""
    # Seconds of measuring the run's input pipeline on this host's CPU (one thread, JPEGs of
    # ImageNet's sizes) for the host cores the target needs; 0: not measured.
    c.plan.input_seconds = 20.0

    c.lock()
    return c


def config_beside(this_file: str, name: str, *args: str) -> ml_collections.ConfigDict:
    """The config of the config file `name` in the folder of `this_file` (a config file's
    `__file__`), built with `args`: how one config file starts from another (config files are
    loaded by path, not imported as a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(this_file)), name)
    module_name = "deit_jax_config_" + name.removesuffix(".py")
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)
