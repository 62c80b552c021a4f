"""The `clip_student` task (`deit_jax.config.tasks`): a CLIP student on image-caption pairs
(`captions:` data).

`python -m deit_jax.main --config configs/clip_quickstart.py --workdir DIR --config.mode=train
--config.data.name=captions:/data/pairs ...` trains one (the config's docstring has the whole
command); `--config.mode=eval` evaluates a finished one. The student is a registered CLIP
(`config.model_name`, e.g. `clip_vit_ti16`, sizes overridable in `config.model`); the steps are
`deit_jax.train.clip_student_steps` (CLIP loss, the teacher's in-batch logits by KL, CLIP-KD's
FD and ICL: any weighted combination, `config.distillation.pair_weights`); the teacher, with
`distillation.kind="in_batch"`, is a CLIP (`teacher.framework="clip"`,
`deit_jax.teacher.clip.two_towers`), run in the step or read from a teacher cache of the run's
stream (`teacher.cache`: its image and caption embeddings per example, written by
`--config.mode=teacher_cache`, which rebuild its in-batch logits exactly). Several CLIPs teach
as an ensemble: `teacher.members`, each run in the step, or their caches (`teacher.cache=A,B`,
`teacher.cache_weights`); the evaluation then reports the student alone. FD and ICL's own
parameters (`PairProjections`) are the train state's `params["projection"]`.

Captions are tokenized by the student's tokenizer and, when a teacher's differs, by the
teacher's too (`tokenizer_specs`; an ensemble's members by each distinct one).

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
from deit_jax.config import members, teacher_rules
from deit_jax.config.tasks import PLAN, TRAIN
from deit_jax.data import labels
from deit_jax.jit import jit
from deit_jax.models import model_options
from deit_jax.models.layers import l2_normalize
from deit_jax.teacher.cache import store as cache_store
from deit_jax.teacher.cache.read import CacheReader, cached_shapes, member_readers
from deit_jax.teacher.clip import zero_shot
from deit_jax.teacher.clip.head import zero_shot_head
from deit_jax.teacher.clip.two_towers import PairTeacher, build_pair_teacher, teacher_runs_here
from deit_jax.train.clip_student_steps import (
    PairTeachers,
    make_embed_step,
    make_pair_train_step,
    member_key,
    pair_weights,
)
from deit_jax.train.projection import PairProjections, build_pair_projections, student_params
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
            self.contexts, self.token_keys = planned_contexts(config, with_keys=True)
        else:
            self.info = data.dataset_info(config)
            specs, self.token_keys = tokenizer_specs(config, with_keys=True)
            self.tokenizers = {key: tokenizer_of(spec) for key, spec in specs.items()}
            self.contexts = {key: int(spec[-1]) for key, spec in specs.items()}
        axes = sharding.DATA_AXES
        if purpose == TRAIN:
            self.train_data = data.build_train(config, mesh, axes, tokenizers=self.tokenizers)
            # Before a model is built or a weight read: a cache of another stream is refused.
            self.reader = open_pair_reader(config, self.train_data)
        self.model = build_student(config, 0)
        # The live teachers: the single one (also without distillation: for its eval metrics),
        # or an ensemble's members when they run in the step.
        built = [build_pair_teacher(c, shapes=shapes) for c in live_teacher_configs(config)]
        self.teachers = tuple(t for t, _ in built)
        self.teacher: PairTeacher | None = self.teachers[0] if len(built) == 1 else None
        teacher_variables: Any = {}
        if built:
            teacher_variables = built[0][1] if len(built) == 1 else tuple(v for _, v in built)
        self.teacher_variables = sharding.replicate(teacher_variables, mesh)
        # The teachers' embedding widths, where something needs them: a plan's cached batch,
        # or FD and ICL's projections (read from the caches' manifests when cached).
        weights = pair_weights(config)
        distilling = config.distillation.kind == "in_batch"
        needed = shapes or (distilling and (weights["fd"] > 0 or weights["icl"] > 0))
        self.teacher_widths = teacher_widths(config, self.teachers, shapes) if needed else ()
        self.projection: PairProjections | None = pair_projections(
            config, self.model, self.teacher_widths
        )
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
        count = self.pair_teachers().count
        if count > 1 and self.config.distillation.kind == "in_batch":
            log.info("An ensemble of %d CLIP teachers: the evaluation reports the student.", count)

    def train_step(self, tx, schedule):
        return make_pair_train_step(
            self.model,
            tx,
            schedule,
            self.config,
            teachers=self.pair_teachers(),
            projections=self.projection,
        )

    def pair_teachers(self) -> PairTeachers:
        """The step's teachers: the caches' (`teacher.cache`, one or several) or the live ones."""
        config = self.config
        paths = teacher_rules.cache_paths(config.teacher.cache)
        if paths:
            weights = teacher_rules.cache_weights(config.teacher.cache_weights, len(paths))
            return PairTeachers(count=len(paths), weights=tuple(weights), cached=True)
        weights = members.member_weights(config) if len(self.teachers) > 1 else [1.0]
        return PairTeachers(
            count=max(1, len(self.teachers)),
            weights=tuple(weights),
            modules=self.teachers,
            token_keys=tuple(self.token_keys) or ("teacher_text",),
        )

    # ------------------------------------------------------------------ a plan's shapes

    def batch_shapes(self, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
        """A global train batch of `batch` pairs as the pipeline (and the cache reader) give it:
        `{"image", "label", "text"[, "teacher_text"]}` (+ the cached teacher's embeddings)."""
        shapes = self._pair_shapes(batch)
        if self.config.teacher.cache:
            for m, width in enumerate(self.teacher_widths):
                cached = cached_shapes(self.config, batch, 0, width)
                shapes |= {member_key(k, m): v for k, v in cached.items()}
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
        params = student_params(state.params)  # without FD/ICL's own parameters
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


def tokenizer_specs(config: ml_collections.ConfigDict, *, with_keys: bool = False):
    """The batch keys of the captions' ids and the tokenizer of each (`tokenizer_spec`): `text`
    (the student's: that of `config.init_from`'s CLIP weights, or open_clip's BPE at the
    student's context length), and `teacher_text` when a teacher runs here with another (an
    ensemble's members: `teacher_text_<m>` for each further distinct one, `_token_keys`).
    `with_keys`: also each live teacher's key, in order."""
    if config.init_from:
        student = tokenizer_spec(config.init_from)
    else:
        length = config.model.to_dict().get("context_length")
        student = ("open_clip", str(length or model_options(config.model_name)["context_length"]))
    teachers = [tokenizer_spec(c.teacher.checkpoint) for c in live_teacher_configs(config)]
    specs, keys = _token_keys(student, teachers)
    return (specs, keys) if with_keys else specs


def planned_contexts(config: ml_collections.ConfigDict, *, with_keys: bool = False):
    """The context lengths `tokenizer_specs` would give, from the models' sizes alone (a plan
    reads no weights): the student's, and each live teacher's registry model's when it differs.
    `with_keys`: also each live teacher's key, in order."""
    student = config.model.to_dict().get("context_length")
    student = int(student or model_options(config.model_name)["context_length"])
    teachers = [
        int(model_options(c.teacher.name)["context_length"]) for c in live_teacher_configs(config)
    ]
    contexts, keys = _token_keys(student, teachers)
    return (contexts, keys) if with_keys else contexts


def _token_keys(student: Any, teachers: list[Any]) -> tuple[dict[str, Any], list[str]]:
    """The batch keys of the distinct tokenizers (or context lengths) `student` and `teachers`
    need, `text` the student's, `teacher_text` the first other, `teacher_text_<m>` one first
    needed by member m; and each teacher's key."""
    found: dict[str, Any] = {"text": student}
    keys = []
    for m, value in enumerate(teachers):
        key = next((k for k, v in found.items() if v == value), None)
        if key is None:
            key = "teacher_text" if "teacher_text" not in found else f"teacher_text_{m}"
            found[key] = value
        keys.append(key)
    return found, keys


def live_teacher_configs(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
    """The configs of the CLIP teachers a run builds: a single teacher's (`teacher_runs_here`:
    whenever it names one, to distil and for its eval metrics), a one-member ensemble's as that
    teacher, and an ensemble's members' when they run in the step (`distillation.kind=
    "in_batch"` without `teacher.cache`); none for an ensemble taught from its caches."""
    ensemble = members.members_of(config)
    if len(ensemble) > 1:
        live = config.distillation.kind == "in_batch" and not config.teacher.cache
        return [m.config for m in ensemble] if live else []
    single = ensemble[0].config if ensemble else config
    return [single] if teacher_runs_here(single) else []


def teacher_widths(
    config: ml_collections.ConfigDict, teachers: tuple[PairTeacher, ...], shapes: bool
) -> tuple[int, ...]:
    """The embedding width of each teacher the step distils from: each cache's (a plan reads
    none: the registry width of the member, or of `teacher.name`, it would hold), else each
    live teacher's; () when none."""
    paths = teacher_rules.cache_paths(config.teacher.cache)
    if paths and not shapes:
        return tuple(cache_store.embedding_dim(p) for p in paths)
    if paths:
        names = [m.config.teacher.name for m in members.members_of(config)]
        names = names if len(names) == len(paths) else [config.teacher.name] * len(paths)
        return tuple(int(model_options(n)["embed_dim"]) for n in names)
    return tuple(int(t.clip.embed_dim) for t in teachers)


def pair_projections(
    config: ml_collections.ConfigDict, model: Any, widths: tuple[int, ...]
) -> PairProjections | None:
    """FD and ICL's own parameters for the run (`build_pair_projections`), or None."""
    weights = pair_weights(config)
    if not widths or config.distillation.kind != "in_batch":
        return None
    return build_pair_projections(
        int(model.embed_dim),
        widths,
        fd=weights["fd"] > 0,
        icl=weights["icl"] > 0,
        dtype=getattr(model, "dtype", jnp.float32),
    )


class PairCacheReaders:
    """`reader(epoch, step)` -> the cached embeddings of an ensemble's caches (`teacher.cache=
    A,B`) for that batch, member m's under its own keys (`member_key`): each cache read and
    checked as a single one (`CacheReader`), not mixed (the step mixes their softmaxes)."""

    def __init__(self, config: ml_collections.ConfigDict, train_data: data.TrainIterator):
        self.paths, self.readers = member_readers(config, train_data)

    def check_coverage(self, start_step: int, total_steps: int) -> None:
        for reader in self.readers:
            reader.check_coverage(start_step, total_steps)

    def __call__(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        out = {}
        for m, reader in enumerate(self.readers):
            out |= {member_key(k, m): v for k, v in reader(epoch, step).items()}
        return out

    def __str__(self) -> str:
        return ", ".join(self.paths)


def open_pair_reader(
    config: ml_collections.ConfigDict, train_data: data.TrainIterator
) -> CacheReader | PairCacheReaders | None:
    """The run's cache reader: none, one cache's, or an ensemble's (several caches)."""
    paths = teacher_rules.cache_paths(config.teacher.cache)
    if not paths:
        return None
    return (
        CacheReader(config, train_data) if len(paths) == 1 else PairCacheReaders(config, train_data)
    )


def _recalls(logits: np.ndarray, text_ids: np.ndarray, prefix: str) -> Metrics:
    hits = losses.retrieval_hits(logits, ks=(1, 5), text_ids=text_ids)
    out = {prefix + k: float(np.mean(hits[k])) for k in RECALLS}
    out[prefix + "mean_recall"] = float(np.mean([out[prefix + k] for k in RECALLS]))
    return out
