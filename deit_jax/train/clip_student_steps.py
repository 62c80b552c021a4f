"""Pure train and eval steps of a CLIP student on image-caption pairs (`captions:` data).

The student is a CLIP (`deit_jax.models.clip`); its in-batch logits are `min(exp(logit_scale),
100) * normalise(image) @ normalise(text).T` over the global batch (`losses.in_batch_logits`).
The loss is a weighted sum of `losses_pair.PAIR_LOSSES`, the weights
`config.distillation.pair_weights` (`losses_pair.resolve_pair_weights`):

    loss = w_clip ClipLoss + w_kl KL + w_fd FD + w_icl ICL

- `clip`: CLIP's contrastive loss (open_clip's `ClipLoss`, `losses.clip_contrastive_loss`);
- `kl`: the seed's `F.kl_div(log_softmax(s / tau, 1), softmax(t / tau, 1), reduction=
  "batchmean")` on the student's and the teacher's in-batch logits, image->text and
  text->image, averaged (`losses.in_batch_distillation_loss`);
- `fd`, `icl`: CLIP-KD's feature distillation and interactive contrastive learning
  (`losses_pair.pair_feature_loss`, `losses_pair.interactive_contrastive_loss`), the student's
  embeddings through `params["projection"]` (`train.projection.PairProjections`: a projection to
  each teacher's width where it differs, and ICL's own logit scale).

With `optim.grad_accum_steps = k > 1` the step splits its batch into k micro-batches and
computes the whole batch's loss and gradient with GradCache (`train.grad_cache`): the towers run
per micro-batch, the in-batch logits, every loss and their gradient with respect to the
embeddings span the whole batch, and one optimiser update follows. Accumulating k separate
batches instead (a classifier's optax.MultiSteps) would give each micro-batch's in-batch logits
alone: a batch of 4 x 256 is not a batch of 1,024.

Unset weights keep the old reading of `distillation.kind` and `alpha`: `kind="none"` is CLIP's
loss alone, `kind="in_batch"` is `(1 - alpha) * ClipLoss + alpha * KL` (`alpha=1`: the KL only),
the same numbers as before the weights existed. The teacher, or the members of an ensemble
(`PairTeachers`), run frozen on the same images and captions; with `config.teacher.cache` the
batch brings their embeddings instead (`teacher_image_embedding`, `teacher_text_embedding`,
`teacher_scale`; member m > 0 with the suffix `_m`, `member_key`). An ensemble's KL target is
the members' softmaxes averaged with their weights, each at its own logit scale (MobileCLIP);
its FD and ICL are the weighted means of the student's FD and ICL against each member.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from deit_jax import losses, losses_pair
from deit_jax.models.clip import clip_scale
from deit_jax.models.layers import l2_normalize
from deit_jax.train import grad_cache
from deit_jax.train.projection import PROJECTION, PairProjections, student_params
from deit_jax.train.state import TrainState
from deit_jax.train.steps import apply_gradients

Batch = dict[str, jax.Array]
CACHED_KEYS = ("teacher_image_embedding", "teacher_text_embedding", "teacher_scale")


def member_key(key: str, member: int) -> str:
    """The batch key of ensemble member `member`'s `key`: the key itself for the first (so that
    one teacher's batch is what it always was), `key_<m>` for the others."""
    return key if member == 0 else f"{key}_{member}"


@dataclasses.dataclass(frozen=True)
class PairTeachers:
    """The teachers a pair run's step distils from: `count` of them (several: an ensemble,
    `config.teacher.members` live or `teacher.cache="A,B"`), their weights (normalised to sum
    1), and either `cached` (the batch brings their embeddings) or the live `modules` with the
    batch key of each one's caption ids (`token_keys`; `text` when it is the student's)."""

    count: int = 1
    weights: tuple[float, ...] = (1.0,)
    cached: bool = False
    modules: tuple[nn.Module, ...] = ()
    token_keys: tuple[str, ...] = ("teacher_text",)


@dataclasses.dataclass(frozen=True)
class TeacherPair:
    """One teacher's frozen side of a batch: its image and caption embeddings (float32, not
    normalised) and its in-batch logits at its own logit scale."""

    image: jax.Array
    text: jax.Array
    logits: jax.Array


def student_embeddings(model: nn.Module, params: Any, images, ids) -> tuple[jax.Array, ...]:
    """The student's image and text embeddings (float32, not normalised) and logit scale;
    `params` may hold the FD/ICL subtree (`projection`), which is not the student's."""
    variables = {"params": student_params(params)}
    image = model.apply(variables, images, method="encode_image").astype(jnp.float32)
    text = model.apply(variables, ids, method="encode_text").astype(jnp.float32)
    return image, text, clip_scale(params["logit_scale"])


def teacher_embeddings(
    teacher, teacher_variables, batch: Batch, cached: bool, *, member: int = 0, token_key=None
):
    """A teacher's image and text embeddings and scale of a batch: from the cache's arrays
    (member `member`'s keys), or by running it on the batch's images and its own tokens
    (`token_key`, default `teacher_text`; the student's `text` when the batch has no such key)."""
    if cached:
        image, text, scale = (batch[member_key(k, member)] for k in CACHED_KEYS)
        return image, text, scale[0]
    ids = batch.get(token_key or "teacher_text", batch["text"])
    return teacher.apply(teacher_variables, batch["image"], ids)


def teacher_pairs(
    teachers: PairTeachers, teacher_variables: Any, batch: Batch
) -> tuple[TeacherPair, ...]:
    """Every teacher's frozen embeddings and in-batch logits of `batch`. Live, one teacher's
    variables are `teacher_variables` itself, an ensemble's a tuple, one per member."""
    variables: tuple = (None,) * teachers.count
    if not teachers.cached:
        variables = (teacher_variables,) if teachers.count == 1 else tuple(teacher_variables)
    pairs = []
    for m in range(teachers.count):
        module = None if teachers.cached else teachers.modules[m]
        token_key = None if teachers.cached else teachers.token_keys[m]
        t_image, t_text, t_scale = teacher_embeddings(
            module, variables[m], batch, teachers.cached, member=m, token_key=token_key
        )
        t_logits = jax.lax.stop_gradient(
            losses.in_batch_logits(t_image.astype(jnp.float32), t_text, t_scale)
        )
        pairs.append(
            TeacherPair(
                image=jax.lax.stop_gradient(t_image.astype(jnp.float32)),
                text=jax.lax.stop_gradient(t_text.astype(jnp.float32)),
                logits=t_logits,
            )
        )
    return tuple(pairs)


def pair_loss(
    model: nn.Module,
    projections: PairProjections | None,
    params: Any,
    batch: Batch,
    teacher_side: Sequence[TeacherPair],
    *,
    weights: Mapping[str, float],
    member_weights: Sequence[float] = (1.0,),
    tau: float = 1.0,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], jax.Array, jax.Array, list]]:
    """The weighted loss of the student `params` on `batch` (module doc) and, as aux, its
    parts, the student's in-batch logits, its logit scale and the ICL scales (one per teacher).

    The CLIP part is always computed (a metric), the KL whenever teachers are given (as before
    the weights existed: also at weight 0), FD and ICL only with a weight > 0."""
    return loss_of_embeddings(
        projections,
        params,
        embed_pairs(model, params, batch),
        teacher_side,
        weights=weights,
        member_weights=member_weights,
        tau=tau,
    )


def embed_pairs(model: nn.Module, params: Any, batch: Batch) -> dict[str, jax.Array]:
    """The student's image and caption embeddings of a batch (float32, not normalised): the
    part of the loss that runs per micro-batch under GradCache."""
    image, text, _ = student_embeddings(model, params, batch["image"], batch["text"])
    return {"image": image, "text": text}


def loss_of_embeddings(
    projections: PairProjections | None,
    params: Any,
    embeddings: Mapping[str, jax.Array],
    teacher_side: Sequence[TeacherPair],
    *,
    weights: Mapping[str, float],
    member_weights: Sequence[float] = (1.0,),
    tau: float = 1.0,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], jax.Array, jax.Array, list]]:
    """`pair_loss` from the whole batch's student embeddings: what reads the batch as a whole
    (the in-batch logits) and the parameters outside the towers (logit scales, projections)."""
    image, text = embeddings["image"], embeddings["text"]
    scale = clip_scale(params["logit_scale"])
    logits = losses.in_batch_logits(image, text, scale)
    parts = {"clip": losses.clip_contrastive_loss(logits)}
    total = weights["clip"] * parts["clip"]
    if teacher_side:
        parts["kl"], _ = losses_pair.ensemble_in_batch_distillation_loss(
            logits, [t.logits for t in teacher_side], member_weights, tau=tau
        )
        total = total + weights["kl"] * parts["kl"]
    icl_scales: list = []
    if weights["fd"] > 0 or weights["icl"] > 0:
        if not teacher_side:
            raise ValueError("FD and ICL compare the student with a teacher: give one.")
        if projections is None:
            heads = [(image, text, None)] * len(teacher_side)
        else:
            heads = projections.apply({"params": params[PROJECTION]}, image, text)
        if weights["fd"] > 0:
            fd = [
                losses_pair.pair_feature_loss(s_image, s_text, t.image, t.text)[0]
                for (s_image, s_text, _), t in zip(heads, teacher_side, strict=True)
            ]
            parts["fd"] = losses_pair.weighted_mean(fd, member_weights)
            total = total + weights["fd"] * parts["fd"]
        if weights["icl"] > 0:
            icl_scales = [s for _, _, s in heads]
            icl = [
                losses_pair.interactive_contrastive_loss(s_image, s_text, t.image, t.text, s)[0]
                for (s_image, s_text, s), t in zip(heads, teacher_side, strict=True)
            ]
            parts["icl"] = losses_pair.weighted_mean(icl, member_weights)
            total = total + weights["icl"] * parts["icl"]
    return total, (parts, logits, scale, icl_scales)


def pair_weights(config: ml_collections.ConfigDict) -> dict[str, float]:
    """The run's weight of each pair loss (`losses_pair.resolve_pair_weights`)."""
    given = config.distillation.get("pair_weights")
    d = config.distillation
    return losses_pair.resolve_pair_weights(
        d.kind, float(d.alpha), given.to_dict() if given is not None else {}
    )


def make_pair_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: ml_collections.ConfigDict,
    teacher: nn.Module | None = None,
    *,
    teachers: PairTeachers | None = None,
    projections: PairProjections | None = None,
) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """`train_step(state, teacher_variables, batch) -> (state, metrics)` (module doc).

    `teachers`: the run's teachers; without it, the single live `teacher` (or the cache's, with
    `config.teacher.cache`). `projections`: the FD/ICL parameters' module (`params["projection"]`),
    None when FD and ICL have none. Metrics: `loss`, each part (`loss_clip`, `loss_kl` and its
    older name `loss_distillation`, `loss_fd`, `loss_icl`), the student's `logit_scale`, ICL's
    (`icl_logit_scale`, `_m` for member m > 0), `grad_norm`, `lr`, `image_to_text_r1`."""
    distilling = config.distillation.kind == "in_batch"
    weights = pair_weights(config)
    tau = float(config.distillation.tau)
    if teachers is None:
        cached = bool(config.teacher.cache)
        teachers = PairTeachers(cached=cached, modules=() if teacher is None else (teacher,))
    if not distilling and any(weights[k] > 0 for k in losses_pair.TEACHER_PAIR_LOSSES):
        raise ValueError(
            "The kl, fd and icl losses need a teacher: set distillation.kind='in_batch'."
        )
    # Accumulation is exact, inside the step: `batch_size` images an update in k micro-batches
    # (GradCache, `train.grad_cache`), one optimiser update a step (`tasks.optimizer_config`).
    ema_decay, micro_batches = float(config.optim.ema_decay), int(config.optim.grad_accum_steps)

    def train_step(state: TrainState, teacher_variables: Any, batch: Batch):
        rng, _ = jax.random.split(state.rng)
        teacher_side = teacher_pairs(teachers, teacher_variables, batch) if distilling else ()

        def loss_fn(params, embeddings):
            return loss_of_embeddings(
                projections,
                params,
                embeddings,
                teacher_side,
                weights=weights,
                member_weights=teachers.weights,
                tau=tau,
            )

        (loss, (parts, logits, scale, icl_scales)), grads = grad_cache.value_and_grad(
            lambda params, pairs, _: embed_pairs(model, params, pairs),
            loss_fn,
            state.params,
            {"image": batch["image"], "text": batch["text"]},
            rng,
            micro_batches,
        )
        new_state, grad_norm = apply_gradients(
            state, rng, loss, grads, state.model_state, tx, ema_decay, 1
        )
        hits = losses.retrieval_hits(logits, ks=(1,))
        metrics = {
            "loss": loss,
            "loss_clip": parts["clip"],
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "logit_scale": scale,
            "image_to_text_r1": hits["image_to_text_r1"].mean(),
        }
        if "kl" in parts:
            metrics["loss_kl"] = metrics["loss_distillation"] = parts["kl"]
        metrics |= {f"loss_{k}": parts[k] for k in ("fd", "icl") if k in parts}
        for m, s in enumerate(icl_scales):
            metrics[member_key("icl_logit_scale", m)] = s
        return new_state, metrics

    return train_step


def make_embed_step(model: nn.Module, teacher: nn.Module | None):
    """`embed_step(params, teacher_variables, batch) -> embeddings` for evaluation: the
    student's L2-normalised image and text embeddings and scale, and the teacher's when it runs
    here (`teacher_*`)."""

    def embed_step(params, teacher_variables, batch: Batch) -> dict[str, jax.Array]:
        image, text, scale = student_embeddings(model, params, batch["image"], batch["text"])
        out = {"image": l2_normalize(image), "text": l2_normalize(text), "scale": scale}
        if teacher is not None:
            t_image, t_text, t_scale = teacher_embeddings(teacher, teacher_variables, batch, False)
            out |= {
                "teacher_image": l2_normalize(t_image),
                "teacher_text": l2_normalize(t_text),
                "teacher_scale": t_scale,
            }
        return out

    return embed_step
