"""Which task a run is, decided here once: `task_of(config)`.

A task is what a run learns. Every consumer asks `task_of` and takes what differs from the
`Task` it returns, instead of looking at the data's name again: the config rules (the common
table plus the task's own, `deit_jax.config.rules`), the training loop and `mode=eval`
(`deit_jax.train.tasks.build_task`, which builds the task's data, student, teacher, steps and
evaluation), and the teacher cache's writer and store (what the cache holds).

- `classifier`: a classifier (DeiT, any registry model) on labelled or label-free images, with or
  without a teacher (logits, features, an ensemble, a teacher cache);
- `clip_student`: a CLIP student on image-caption pairs (`captions:` data), trained by CLIP's
  loss and/or a CLIP teacher's in-batch image-text logits.

Adding a task: docs/training.md#adding-a-task lists the four files to touch.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from deit_jax.config.defaults import MODES
from deit_jax.data import labels

# What a task is built for: training (with its training stream), evaluation (`mode=eval`: the
# eval sets only) or a plan (`mode=plan`: shapes only, no weight or data file read).
TRAIN, EVAL, PLAN = "train", "eval", "plan"

CLASSIFIER = "classifier"
CLIP_STUDENT = "clip_student"

# What a task's teacher cache holds for each example of the stream.
TOPK = "topk"  # the teacher's top-k log-probabilities (+ its embedding, teacher.cache_embeddings)
PAIR_EMBEDDINGS = "pair_embeddings"  # the teacher's image and caption embeddings, no top-k


@dataclasses.dataclass(frozen=True)
class Task:
    """What the rest of the code needs to know of a task before anything is built."""

    name: str
    what: str  # how a rule's message names the run
    modes: tuple[str, ...]  # the `config.mode`s it runs in
    distillation_kinds: tuple[str, ...]  # the `config.distillation.kind`s it trains with
    cache: str  # what its teacher cache holds: TOPK or PAIR_EMBEDDINGS
    captions: bool  # its batches carry captions' token ids (the pipeline needs tokenizers)
    # How `optim.grad_accum_steps = k` accumulates: "batches" (k batches of `batch_size` an
    # update, optax.MultiSteps: right for a loss that is a mean over examples) or
    # "micro_batches" (one batch of `batch_size` an update, in k micro-batches with GradCache:
    # exact for a loss over the whole batch, as CLIP's in-batch logits are).
    accumulates: str = "batches"


TASKS: dict[str, Task] = {
    CLASSIFIER: Task(
        name=CLASSIFIER,
        what="a classifier",
        modes=tuple(m for m in MODES if not m.startswith("clip_")),
        distillation_kinds=("none", "soft", "hard", "feature"),
        cache=TOPK,
        captions=False,
    ),
    CLIP_STUDENT: Task(
        name=CLIP_STUDENT,
        what="a CLIP student on image-caption data (data.name='captions:...')",
        modes=("train", "eval", "teacher_cache", "clip_quickstart", "clip_recipes", "plan"),
        distillation_kinds=("none", "in_batch"),
        cache=PAIR_EMBEDDINGS,
        captions=True,
        accumulates="micro_batches",
    ),
}


def task_of(config: ml_collections.ConfigDict) -> Task:
    """The task of the run `config` describes: a CLIP student for image-caption data
    (`captions:/root`), a classifier for any other."""
    name = config.data.get("name") if "data" in config else None
    if isinstance(name, str) and labels.is_caption_data(name):
        return TASKS[CLIP_STUDENT]
    return TASKS[CLASSIFIER]


def optimizer_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config.optim` as the optimiser and its schedule are built from it: with a task that
    accumulates micro-batches inside its step, every step is one update of `batch_size` images
    (no optax.MultiSteps, the schedule and the learning rate's batch scaling per step)."""
    if task_of(config).accumulates == "batches" or config.optim.grad_accum_steps == 1:
        return config.optim
    optim = config.optim.copy_and_resolve_references()
    with optim.unlocked():
        optim.grad_accum_steps = 1
    return optim
