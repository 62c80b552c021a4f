"""The config rules of a CLIP student on image-caption pairs (`captions:` data,
`deit_jax.train.pairs`): the student is a CLIP, the teacher (with `distillation.kind=in_batch`)
a CLIP too, and the pairs are neither mixed nor repeated within a batch (either would put the
same caption beside several images, which the in-batch losses count as different texts).
"""

from __future__ import annotations

import os

from deit_jax.config.predicates import Context, Rule
from deit_jax.data import labels
from deit_jax.models.registry import list_models

CAPTIONS = "image-caption data (data.name='captions:...')"


def captions(c: Context) -> bool:
    return labels.is_caption_data(c.get("data.name"))


def _clips() -> str:
    return ", ".join(list_models("clip_*"))


PAIR_RULES: tuple[Rule, ...] = (
    Rule(
        "data.name",
        lambda v, c: (
            not captions(c)
            or c.get("mode") == "clip_quickstart"  # which writes it
            or os.path.isdir(os.path.expanduser(v.removeprefix(labels.CAPTIONS_PREFIX)))
        ),
        "names a folder that does not exist; give captions:<root>, images with a caption file "
        "beside each (0001.jpg + 0001.txt, one caption a line)",
    ),
    Rule(
        "model_name",
        lambda v, c: not captions(c) or v in list_models("clip_*"),
        lambda c: f"must be a CLIP for {CAPTIONS}, which trains a CLIP student: {_clips()}",
        after=("data.name",),
    ),
    Rule(
        "distillation.kind",
        lambda v, c: v in ("none", "in_batch") if captions(c) else v != "in_batch",
        lambda c: (
            f"{CAPTIONS} trains with CLIP's loss ('none') or distils a CLIP teacher's in-batch "
            "logits ('in_batch')"
            if captions(c)
            else f"'in_batch' distils image-text logits: it needs {CAPTIONS} and a CLIP student"
        ),
        after=("data.name",),
    ),
    Rule(
        "teacher.framework",
        lambda v, c: not captions(c) or not c.distilling or v == "clip",
        "must be 'clip' for distillation.kind='in_batch': the teacher's in-batch logits come "
        "from a CLIP's two towers",
        after=("data.name", "distillation.kind"),
    ),
    Rule(
        "teacher.members",
        lambda v, c: not captions(c) or not v,
        f"a teacher ensemble is not supported for {CAPTIONS} yet: give one CLIP teacher",
        after=("data.name",),
    ),
    Rule(
        "teacher.cache",
        lambda v, c: not captions(c) or "," not in v,
        f"must be one cache for {CAPTIONS}: a teacher ensemble is not supported for it yet",
        after=("data.name",),
    ),
    Rule(
        "data.repeated_aug",
        lambda v, c: not captions(c) or v == 1,
        f"must be 1 for {CAPTIONS}: repeated images in a batch would be counted as different "
        "pairs by the in-batch losses",
        after=("data.name",),
    ),
    *(
        Rule(
            key,
            lambda v, c: not captions(c) or v == 0,
            f"must be 0 for {CAPTIONS}: image-caption pairs are not mixed",
            after=("data.name",),
        )
        for key in ("mixup.mixup_alpha", "mixup.cutmix_alpha")
    ),
    Rule(
        "mode",
        lambda v, c: not captions(c) or v in ("train", "teacher_cache", "clip_quickstart"),
        f"{CAPTIONS} runs with mode='train' (it evaluates as it trains) or 'teacher_cache'",
        after=("data.name",),
    ),
    *(
        Rule(
            key,
            lambda v, c: not captions(c) or (isinstance(v, str) and v.split("[")[0] == "train"),
            f"{CAPTIONS} has one split, 'train' (every pair): slice it, e.g. "
            "--config.data.train_split='train[:95%]' --config.data.eval_split='train[95%:]'",
            after=("data.name",),
        )
        for key in ("data.train_split", "data.eval_split")
    ),
)
