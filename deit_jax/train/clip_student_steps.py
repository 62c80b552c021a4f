"""Pure train and eval steps of a CLIP student on image-caption pairs (`captions:` data).

The student is a CLIP (`deit_jax.models.clip`); its in-batch logits are `min(exp(logit_scale),
100) * normalise(image) @ normalise(text).T` over the global batch (`losses.in_batch_logits`).
The loss, with `config.distillation`:

- `kind="none"`: CLIP's contrastive loss (open_clip's `ClipLoss`, `losses.clip_contrastive_loss`);
- `kind="in_batch"`: `(1 - alpha) * ClipLoss + alpha * KL`, the KL being the seed's
  `F.kl_div(log_softmax(s / tau, 1), softmax(t / tau, 1), reduction="batchmean")` on the
  student's and the teacher's in-batch logits, image->text and text->image, averaged
  (`losses.in_batch_distillation_loss`); `alpha=1` is the label-free reading (KL only).

The teacher (`deit_jax.teacher.clip.two_towers.PairTeacher`) runs frozen on the same images and
captions; with `config.teacher.cache` the batch brings its embeddings instead
(`teacher_image_embedding`, `teacher_text_embedding`, `teacher_scale`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from deit_jax import losses
from deit_jax.models.clip import clip_scale
from deit_jax.models.layers import l2_normalize
from deit_jax.train.state import TrainState
from deit_jax.train.steps import apply_gradients

Batch = dict[str, jax.Array]


def student_embeddings(model: nn.Module, params: Any, images, ids) -> tuple[jax.Array, ...]:
    """The student's image and text embeddings (float32, not normalised) and logit scale."""
    variables = {"params": params}
    image = model.apply(variables, images, method="encode_image").astype(jnp.float32)
    text = model.apply(variables, ids, method="encode_text").astype(jnp.float32)
    return image, text, clip_scale(params["logit_scale"])


def teacher_embeddings(teacher, teacher_variables, batch: Batch, cached: bool):
    """The teacher's image and text embeddings and scale of a batch: from the cache's arrays,
    or by running it on the batch's images and its own tokens (`teacher_text`, else `text`)."""
    if cached:
        scale = batch["teacher_scale"][0]
        return batch["teacher_image_embedding"], batch["teacher_text_embedding"], scale
    ids = batch.get("teacher_text", batch["text"])
    return teacher.apply(teacher_variables, batch["image"], ids)


def make_pair_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: ml_collections.ConfigDict,
    teacher: nn.Module | None = None,
) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """`train_step(state, teacher_variables, batch) -> (state, metrics)` (module docstring)."""
    distilling = config.distillation.kind == "in_batch"
    alpha, tau = float(config.distillation.alpha), float(config.distillation.tau)
    cached = bool(config.teacher.cache)
    ema_decay, accum = float(config.optim.ema_decay), int(config.optim.grad_accum_steps)

    def train_step(state: TrainState, teacher_variables: Any, batch: Batch):
        rng, _ = jax.random.split(state.rng)
        t_logits = None
        if distilling:
            t_image, t_text, t_scale = teacher_embeddings(teacher, teacher_variables, batch, cached)
            t_logits = jax.lax.stop_gradient(
                losses.in_batch_logits(t_image.astype(jnp.float32), t_text, t_scale)
            )

        def loss_fn(params):
            image, text, scale = student_embeddings(model, params, batch["image"], batch["text"])
            logits = losses.in_batch_logits(image, text, scale)
            parts = {"clip": losses.clip_contrastive_loss(logits)}
            total = parts["clip"]
            if distilling:
                parts["distillation"], _ = losses.in_batch_distillation_loss(
                    logits, t_logits, tau=tau
                )
                total = (1 - alpha) * parts["clip"] + alpha * parts["distillation"]
            return total, (parts, logits, scale)

        (loss, (parts, logits, scale)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        new_state, grad_norm = apply_gradients(
            state, rng, loss, grads, state.model_state, tx, ema_decay, accum
        )
        hits = losses.retrieval_hits(logits, ks=(1,))
        metrics = {
            "loss": loss,
            "loss_clip": parts["clip"],
            "grad_norm": grad_norm,
            "lr": schedule(state.step // accum),
            "logit_scale": scale,
            "image_to_text_r1": hits["image_to_text_r1"].mean(),
        }
        if distilling:
            metrics["loss_distillation"] = parts["distillation"]
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
