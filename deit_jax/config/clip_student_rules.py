"""The config rules of the `clip_student` task (`deit_jax.config.tasks`): a CLIP student on
image-caption pairs (`deit_jax.train.clip_student`). They apply to that task's runs only
(`deit_jax.config.rules.rules_of`): the student is a CLIP, the teacher (with
`distillation.kind=in_batch`) a CLIP too, and the pairs are neither mixed nor repeated within a
batch (either would put the same caption beside several images, which the in-batch losses count
as different texts).
"""

from __future__ import annotations

import os

from deit_jax.config.defaults import TEACHER_CLIP
from deit_jax.config.predicates import Context, Rule
from deit_jax.config.tasks import CLIP_STUDENT, TASKS
from deit_jax.data import labels
from deit_jax.models.registry import list_models

RUN = TASKS[CLIP_STUDENT].what


def _clips(c: Context) -> str:
    return f"must be a CLIP for {RUN}: {', '.join(list_models('clip_*'))}"


def _train_slice(v: object, c: Context) -> bool:
    return isinstance(v, str) and v.split("[")[0] == "train"


CLIP_STUDENT_RULES: tuple[Rule, ...] = (
    Rule(
        "data.name",
        lambda v, c: (
            c.get("mode") == "clip_quickstart"  # which writes it
            or os.path.isdir(os.path.expanduser(v.removeprefix(labels.CAPTIONS_PREFIX)))
        ),
        "names a folder that does not exist; give captions:<root>, images with a caption file "
        "beside each (0001.jpg + 0001.txt, one caption a line)",
        on_disk=True,
    ),
    Rule("model_name", lambda v, c: v in list_models("clip_*"), _clips, after=("data.name",)),
    Rule(
        "teacher.framework",
        lambda v, c: not c.distilling or v == TEACHER_CLIP,
        f"must be {TEACHER_CLIP!r} for distillation.kind='in_batch': the teacher's in-batch "
        "logits come from a CLIP's two towers",
        after=("data.name", "distillation.kind"),
    ),
    Rule(
        "teacher.members",
        lambda v, c: not v,
        f"a teacher ensemble is not supported for {RUN} yet: give one CLIP teacher",
        after=("data.name",),
    ),
    Rule(
        "teacher.cache",
        lambda v, c: "," not in v,
        f"must be one cache for {RUN}: a teacher ensemble is not supported for it yet",
        after=("data.name",),
    ),
    Rule(
        "data.repeated_aug",
        lambda v, c: v == 1,
        f"must be 1 for {RUN}: repeated images in a batch would be counted as different pairs "
        "by the in-batch losses",
        after=("data.name",),
    ),
    *(
        Rule(
            key,
            lambda v, c: v == 0,
            f"must be 0 for {RUN}: image-caption pairs are not mixed",
            after=("data.name",),
        )
        for key in ("mixup.mixup_alpha", "mixup.cutmix_alpha")
    ),
    *(
        Rule(
            key,
            _train_slice,
            "image-caption data has one split, 'train' (every pair): slice it, e.g. "
            "--config.data.train_split='train[:95%]' --config.data.eval_split='train[95%:]'",
            after=("data.name",),
        )
        for key in ("data.train_split", "data.eval_split")
    ),
)
