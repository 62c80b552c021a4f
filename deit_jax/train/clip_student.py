"""The `clip_student` task (`deit_jax.config.tasks`): a CLIP student on image-caption pairs
(`captions:` data).

`python -m deit_jax.main --config configs/clip_quickstart.py --workdir DIR --config.mode=train
--config.data.name=captions:/data/pairs ...` trains one (the config's docstring has the whole
command); `--config.mode=eval` evaluates a finished one. The student is a registered CLIP
(`config.model_name`, e.g. `clip_vit_ti16`, sizes overridable in `config.model`); the steps are
`deit_jax.train.clip_student_steps` (CLIP loss, the teacher's in-batch logits by KL, or both,
`config.distillation`); the teacher, with `distillation.kind="in_batch"`, is a CLIP
(`teacher.framework="clip"`, `deit_jax.teacher.clip.two_towers`), run in the step or read from
a teacher cache of the run's stream (`teacher.cache`: its image and caption embeddings per
example, written by `--config.mode=teacher_cache`, which rebuild its in-batch logits exactly).

Captions are tokenized by the student's tokenizer and, when the teacher's differs, by the
teacher's too (`tokenizer_specs`).

Evaluation, over the whole held-out split (`data.eval_split`, each image with its first
caption), not per batch, so that it does not depend on the eval batch size:

- recall@1/5 image->text and text->image (`losses.retrieval_hits`; identical captions are one
  text, so class-level captions are ranked once), their mean `mean_recall` (which ranks
  checkpoints), and the teacher's;
- `kl`: the training KL (`losses.in_batch_distillation_loss` at `distillation.tau`) on the
  student's and the teacher's logits over all held-out pairs at once;
- on each labelled set of `data.extra_eval`, zero-shot top-1: the student's own text tower
  embeds `teacher.prompts` x the set's class names into a head (as the zero-shot teacher's,
  `deit_jax.teacher.clip.head`), beside the teacher's top-1 and their agreement.

The results table (`results.csv`, `results.md`): a row for the held-out pairs (recall, KL) and
one for each zero-shot set (top-1, the teacher's, agreement).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from deit_jax import data, losses, sharding
from deit_jax.config.tasks import PLAN, TRAIN
from deit_jax.data import labels
from deit_jax.jit import jit
from deit_jax.models import model_options
from deit_jax.models.layers import l2_normalize
from deit_jax.teacher.cache.read import CacheReader, cached_shapes
from deit_jax.teacher.clip import zero_shot
from deit_jax.teacher.clip.head import zero_shot_head
from deit_jax.teacher.clip.two_towers import PairTeacher, build_pair_teacher, teacher_runs_here
from deit_jax.train.clip_student_steps import make_embed_step, make_pair_train_step
from deit_jax.train.results import percent, set_name, write_results
from deit_jax.train.run_weights import save_run_weights
from deit_jax.train.state import build_student
from deit_jax.weights.tokenizer import tokenizer_of, tokenizer_spec

log = logging.getLogger(__name__)
Metrics = dict[str, float]
RECALLS = ("image_to_text_r1", "image_to_text_r5", "text_to_image_r1", "text_to_image_r5")
ZERO_SHOT_COLUMNS = ("top1", "teacher_top1", "agreement")
RESULT_COLUMNS = (
    "set", "model", *RECALLS, "mean_recall", "teacher_mean_recall", "kl", *ZERO_SHOT_COLUMNS,
)  # fmt: skip


class ClipStudentTask:
    """A CLIP student, its CLIP teacher and the held-out pairs (see the module doc).

    Built for `purpose` (`deit_jax.config.tasks`): training; evaluation (no training stream, no
    cache reader); or a plan (shapes only: no data, weights, tokenizer or cache read)."""

    # The metrics an eval line shows, in percent: recall@1 both ways, their mean, zero-shot top-1.
    shown = ("top1", "agreement", "_r1", "mean_recall")

    def __init__(
        self, config: ml_collections.ConfigDict, workdir: str, mesh, *, purpose: str = TRAIN
    ) -> None:
        del workdir  # nothing of the teacher's is kept in it
        shapes = purpose == PLAN
        self.config = config
        self.train_data = self.reader = self.eval_data = None
        self.zero_shot_sets: list = []
        if shapes:
            self.info = data.planned_info(config, config.plan.num_examples)
            self.tokenizers = {}
            self.contexts = planned_contexts(config)
        else:
            self.info = data.dataset_info(config)
            specs = tokenizer_specs(config)
            self.tokenizers = {key: tokenizer_of(spec) for key, spec in specs.items()}
            self.contexts = {key: int(spec[-1]) for key, spec in specs.items()}
        axes = sharding.DATA_AXES
        if purpose == TRAIN:
            self.train_data = data.build_train(config, mesh, axes, tokenizers=self.tokenizers)
            # Before a model is built or a weight read: a cache of another stream is refused.
            self.reader = CacheReader(config, self.train_data) if config.teacher.cache else None
        self.model = build_student(config, 0)
        self.teacher: PairTeacher | None = None
        teacher_variables: Any = {}
        if teacher_runs_here(config):  # also without distillation: for its eval metrics
            self.teacher, teacher_variables = build_pair_teacher(config, shapes=shapes)
        self.teacher_variables = sharding.replicate(teacher_variables, mesh)
        self.projection = None
        if not shapes:
            self.eval_data = data.build_eval(config, mesh, axes, tokenizers=self.tokenizers)
            self.zero_shot_sets = data.build_extra_evals(config, mesh, axes, num_classes=None)
        self.best = "mean_recall"
        self._embed = jit(make_embed_step(self.model, self.teacher))
        self._image_embed = jit(self._image_embeddings)
        self._teacher_heads: dict[str, np.ndarray] = {}

    def start(self, start_step: int, total_steps: int) -> None:
        if self.reader is not None:
            self.reader.check_coverage(start_step, total_steps)
            self.train_data.extras = self.reader
            log.info("Teacher embeddings from the cache %s", self.reader)

    def train_step(self, tx, schedule):
        return make_pair_train_step(self.model, tx, schedule, self.config, self.teacher)

    # ------------------------------------------------------------------ a plan's shapes

    def batch_shapes(self, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
        """A global train batch of `batch` pairs as the pipeline (and the cache reader) give it:
        `{"image", "label", "text"[, "teacher_text"]}` (+ the cached teacher's embeddings)."""
        shapes = self._pair_shapes(batch)
        if self.config.teacher.cache:
            width = model_options(self.config.teacher.name)["embed_dim"]
            shapes |= cached_shapes(self.config, batch, 0, width)
        return shapes

    def planned_eval(self, state: Any, batch: int) -> tuple[Any, tuple]:
        """The held-out pairs' jitted embedding step and its arguments, as shapes."""
        shapes = self._pair_shapes(batch) | {"mask": jax.ShapeDtypeStruct((batch,), jnp.bool_)}
        return self._embed, (state.params, self.teacher_variables, shapes)

    def _pair_shapes(self, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
        h, w, c = self.info.image_shape
        return {
            "image": jax.ShapeDtypeStruct((batch, h, w, c), jnp.float32),
            "label": jax.ShapeDtypeStruct((batch,), jnp.int32),
        } | {k: jax.ShapeDtypeStruct((batch, n), jnp.int32) for k, n in self.contexts.items()}

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, state: Any) -> tuple[Metrics, dict[str, Metrics]]:
        params = state.params
        metrics = self._held_out_pairs(params)
        return metrics, {
            prefix: self._zero_shot(prefix, passes, params)
            for prefix, passes in self.zero_shot_sets
        }

    def _held_out_pairs(self, params: Any) -> Metrics:
        parts: dict[str, list[np.ndarray]] = {}
        for batch in self.eval_data:
            out = self._embed(params, self.teacher_variables, batch)
            # The scales are replicated scalars: this process's copy.
            scales = {k: float(out.pop(k).addressable_data(0)) for k in list(out) if "scale" in k}
            out |= {"mask": batch["mask"], "ids": batch["text"]}
            for k, v in multihost_utils.process_allgather(out, tiled=True).items():
                parts.setdefault(k, []).append(np.asarray(v))
        keep = np.concatenate(parts.pop("mask")).astype(bool)
        rows = {k: np.concatenate(v)[keep] for k, v in parts.items()} | scales
        # Identical captions are one text (class-level captions, several images each).
        _, text_ids = np.unique(rows["ids"], axis=0, return_inverse=True)
        text_ids = text_ids.reshape(-1)
        # `losses.in_batch_logits` on the host: the embeddings are unit vectors already.
        logits = rows["scale"] * rows["image"] @ rows["text"].T
        metrics = _recalls(logits, text_ids, "")
        if self.teacher is not None:
            t_logits = rows["teacher_scale"] * rows["teacher_image"] @ rows["teacher_text"].T
            metrics |= _recalls(t_logits, text_ids, "teacher_")
            kl, _ = losses.in_batch_distillation_loss(
                logits, t_logits, tau=self.config.distillation.tau
            )
            metrics["kl"] = float(kl)
        return metrics | {"logit_scale": float(rows["scale"]), "count": float(keep.sum())}

    def _image_embeddings(self, params, teacher_variables, images):
        """L2-normalised image embeddings of the student and, with one, of the teacher."""
        image = self.model.apply({"params": params}, images, method="encode_image")
        out = {"image": l2_normalize(image.astype(jnp.float32))}
        if self.teacher is not None:
            t_image = self.teacher.apply(teacher_variables, images, method="encode_image")
            out["teacher_image"] = l2_normalize(t_image)
        return out

    def _zero_shot(self, prefix: str, passes: Any, params: Any) -> Metrics:
        """Zero-shot top-1 on a labelled set by the student's text tower (and the teacher's)."""
        names = zero_shot.class_names(passes.config)
        templates = labels.templates(self.config.teacher.prompts)
        head = zero_shot_head(
            self.model, {"params": params}, names, templates, self.tokenizers["text"]
        )
        t_head = None
        if self.teacher is not None:
            if prefix not in self._teacher_heads:
                t_variables = {"params": self.teacher_variables["params"]["clip"]}
                tokenize = self.tokenizers.get("teacher_text", self.tokenizers["text"])
                self._teacher_heads[prefix] = zero_shot_head(
                    self.teacher.clip, t_variables, names, templates, tokenize
                )
            t_head = self._teacher_heads[prefix]
        sums = {"top1": 0.0, "teacher_top1": 0.0, "agreement": 0.0, "count": 0.0}
        for batch in passes:
            out = self._image_embed(params, self.teacher_variables, batch["image"])
            out |= {"mask": batch["mask"], "label": batch["label"]}
            out = multihost_utils.process_allgather(out, tiled=True)
            out = {k: np.asarray(v) for k, v in out.items()}
            mask = out["mask"].astype(bool)
            predicted = np.argmax(out["image"] @ head, -1)
            sums["top1"] += float(((predicted == out["label"]) & mask).sum())
            sums["count"] += float(mask.sum())
            if t_head is not None:
                t_predicted = np.argmax(out["teacher_image"] @ t_head, -1)
                sums["teacher_top1"] += float(((t_predicted == out["label"]) & mask).sum())
                sums["agreement"] += float(((t_predicted == predicted) & mask).sum())
        count = sums.pop("count")
        if t_head is None:
            sums = {"top1": sums["top1"]}
        return {k: v / count for k, v in sums.items()} | {"count": count}

    # ------------------------------------------------------------------ results

    def write_results(self, workdir: str, params: Any, final: Metrics, extra: dict) -> None:
        del params  # the table has no parameter count: recall and zero-shot columns only
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump({"eval": final, **extra}, f, indent=1)
        held_out = {"set": set_name(self.eval_data), "model": self.config.model_name}
        held_out |= {k: percent(final.get(k)) for k in (*RECALLS, "mean_recall")}
        held_out |= {"teacher_mean_recall": percent(final.get("teacher_mean_recall"))}
        held_out |= {"kl": "" if "kl" not in final else f"{final['kl']:.6f}"}
        table = [held_out]
        for prefix, passes in self.zero_shot_sets:
            row = {"set": set_name(passes), "model": self.config.model_name}
            table.append(row | {k: percent(extra[prefix].get(k)) for k in ZERO_SHOT_COLUMNS})
        write_results(workdir, table, RESULT_COLUMNS)

    def finish(self, workdir: str, state: Any, final: Metrics, extra: dict) -> None:
        save_run_weights(workdir, self.config, state, self.info)
        if jax.process_index() == 0:
            self.write_results(workdir, state.params, final, extra)


def tokenizer_specs(config: ml_collections.ConfigDict) -> dict[str, tuple[str, ...]]:
    """The batch keys of the captions' ids and the tokenizer of each (`tokenizer_spec`): `text`
    (the student's: that of `config.init_from`'s CLIP weights, or open_clip's BPE at the
    student's context length), and `teacher_text` when a teacher runs here with another."""
    if config.init_from:
        student = tokenizer_spec(config.init_from)
    else:
        length = config.model.to_dict().get("context_length")
        student = ("open_clip", str(length or model_options(config.model_name)["context_length"]))
    specs = {"text": student}
    if teacher_runs_here(config):
        teacher = tokenizer_spec(config.teacher.checkpoint)
        if teacher != student:
            specs["teacher_text"] = teacher
    return specs


def planned_contexts(config: ml_collections.ConfigDict) -> dict[str, int]:
    """The context lengths `tokenizer_specs` would give, from the models' sizes alone (a plan
    reads no weights): the student's, and the teacher's registry model's when it runs here with
    another."""
    student = config.model.to_dict().get("context_length")
    contexts = {"text": int(student or model_options(config.model_name)["context_length"])}
    if teacher_runs_here(config):
        teacher = int(model_options(config.teacher.name)["context_length"])
        if teacher != contexts["text"]:
            contexts["teacher_text"] = teacher
    return contexts


def _recalls(logits: np.ndarray, text_ids: np.ndarray, prefix: str) -> Metrics:
    hits = losses.retrieval_hits(logits, ks=(1, 5), text_ids=text_ids)
    out = {prefix + k: float(np.mean(hits[k])) for k in RECALLS}
    out[prefix + "mean_recall"] = float(np.mean([out[prefix + k] for k in RECALLS]))
    return out
