"""The config rules of the `clip_student` task (`deit_jax.config.tasks`): a CLIP student on
image-caption pairs (`deit_jax.train.clip_student`). They apply to that task's runs only
(`deit_jax.config.rules.rules_of`): the student is a CLIP, the teacher (with
`distillation.kind=in_batch`) a CLIP too, or each member of an ensemble, and the pairs are
neither mixed nor repeated within a batch (either would put the same caption beside several
images, which the in-batch losses count as different texts). The losses' weights
(`distillation.pair_weights`, `deit_jax.losses_pair`) are numbers >= 0, not all 0, and the
losses against a teacher (kl, fd, icl) need `distillation.kind=in_batch`.
"""

from __future__ import annotations

import os

from deit_jax import losses_pair
from deit_jax.config.defaults import EXPERIMENTS, TEACHER_CLIP
from deit_jax.config.predicates import Context, Rule, is_num, problem_rule
from deit_jax.config.tasks import CLIP_STUDENT, TASKS
from deit_jax.data import labels
from deit_jax.models.registry import list_models

RUN = TASKS[CLIP_STUDENT].what


def _clips(c: Context) -> str:
    return f"must be a CLIP for {RUN}: {', '.join(list_models('clip_*'))}"


def _train_slice(v: object, c: Context) -> bool:
    return isinstance(v, str) and v.split("[")[0] == "train"


WEIGHTS = "distillation.pair_weights"
WEIGHT_KEYS = tuple(f"{WEIGHTS}.{name}" for name in losses_pair.PAIR_LOSSES)


def _weight_names(v: object, c: Context) -> str | None:
    """A config file may replace the whole dict: its keys must be the losses'."""
    names = set(v) if hasattr(v, "keys") else None
    if names is None or not names <= set(losses_pair.PAIR_LOSSES):
        return f"must map the losses {', '.join(losses_pair.PAIR_LOSSES)} to their weights"
    return None


def _resolved(c: Context) -> dict[str, float]:
    given = c.get(WEIGHTS)
    kind, alpha = c.get("distillation.kind"), c.get("distillation.alpha")
    return losses_pair.resolve_pair_weights(kind, alpha, given.to_dict())


def _weight_rules() -> tuple[Rule, ...]:
    """Each weight a number >= 0 (or unset); a loss against a teacher only with one; not all 0."""
    rules = [problem_rule(WEIGHTS, _weight_names)]
    for name, what in losses_pair.PAIR_LOSSES.items():
        key = f"{WEIGHTS}.{name}"
        rules.append(
            Rule(
                key,
                lambda v, c: v is None or (is_num(v) and v >= 0),
                f"must be a number >= 0, the weight of {name}: {what} (unset: from "
                "distillation.kind and alpha)",
                after=(WEIGHTS,),
            )
        )
        if name in losses_pair.TEACHER_PAIR_LOSSES:
            rules.append(
                Rule(
                    key,
                    lambda v, c: not v or c.get("distillation.kind") == "in_batch",
                    f"{name} compares the student with a teacher: set "
                    "--config.distillation.kind=in_batch and a CLIP teacher (teacher.checkpoint, "
                    f"teacher.members or teacher.cache), or give {name} the weight 0",
                    after=(WEIGHTS, "distillation.kind"),
                )
            )
    rules.append(
        Rule(
            WEIGHTS,
            lambda v, c: any(w > 0 for w in _resolved(c).values()),
            "gives every loss the weight 0 (with distillation.kind and alpha): give one of "
            f"{', '.join(losses_pair.PAIR_LOSSES)} a weight > 0",
            after=(*WEIGHT_KEYS, "distillation.kind", "distillation.alpha"),
        )
    )
    return tuple(rules)


CLIP_STUDENT_RULES: tuple[Rule, ...] = (
    Rule(
        "data.name",
        lambda v, c: (
            c.get("mode") in EXPERIMENTS  # which write it
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
    *_weight_rules(),
    Rule(
        "optim.grad_accum_steps",
        lambda v, c: (
            not isinstance(c.get("batch_size"), int)
            or c.get("batch_size") % (v * c.num_devices) == 0
        ),
        lambda c: (
            f"splits each batch of {c.get('batch_size')} into micro-batches for {RUN} (one "
            f"update a batch, its loss the whole batch's): batch_size must be a multiple of "
            f"grad_accum_steps x the {c.num_devices} devices"
        ),
        after=("data.name", "batch_size"),
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
