"""Pure train and eval steps: the student, the frozen teacher and the distillation loss.

`make_train_step` returns `train_step(state, teacher_variables, batch) -> (state, metrics)`,
meant to be wrapped in one `jax.jit` over the mesh (see `deit_jax.train.loop`). The teacher runs in
eval mode under `stop_gradient` on the same (mixed) images as the student, optionally resized
to its own input size; it is an argument, not part of the state, so it is neither optimised
nor checkpointed with the student; an ensemble's (`config.teacher.members`) is a tuple, one per
member. With `config.teacher.cache` no teacher runs: the batch brings the teacher's cached top-k
outputs (`teacher_logp`, `teacher_index`) or embeddings (`teacher_embedding`). Feature
distillation (`kind="feature"`) compares pooled pre-logit features instead of logits, the
student's through the projection whose parameters are `state.params["projection"]`. The train
state itself is `deit_jax.train.state.TrainState`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from deit_jax import losses
from deit_jax.data.labels import is_label_free
from deit_jax.models import pooled_features
from deit_jax.teacher.cache.targets import cached_teacher_logits
from deit_jax.teacher.forward import teacher_features, teacher_logits
from deit_jax.train import optim
from deit_jax.train.projection import Projection, project, student_params
from deit_jax.train.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def _student_outputs(outputs: Any, distilled: bool) -> tuple[jax.Array, jax.Array | None]:
    if distilled:
        cls_logits, dist_logits = outputs
        return cls_logits, dist_logits
    return outputs, None


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: ml_collections.ConfigDict,
    teacher: nn.Module | None = None,
    projection: Projection | None = None,
) -> Callable[[TrainState, Any, Batch], tuple[TrainState, Metrics]]:
    """`projection`: the feature-distillation projection whose params are `params["projection"]`
    (None when the widths match or for logit distillation)."""
    kind = config.distillation.kind
    kl_reduction = config.distillation.kl_reduction
    distilled = bool(getattr(model, "distilled", False))
    ema_decay = float(config.optim.ema_decay)
    accum = int(config.optim.grad_accum_steps)
    # With a teacher cache the batches carry the teacher's top-k outputs (deit_jax.teacher.cache).
    cached = bool(config.teacher.cache)
    labelled = not is_label_free(config.data.name)  # label-free: labels are -1

    def train_step(state: TrainState, teacher_variables: Any, batch: Batch):
        rng, dropout_rng = jax.random.split(state.rng)
        images, targets = batch["image"], batch["target"]
        t_logits = t_features = None
        if kind == "feature" and cached:  # the writer's `teacher_features`, stored
            t_features = batch["teacher_embedding"].astype(jnp.float32)
        elif kind == "feature":
            t_features = teacher_features(teacher, teacher_variables, images)
        elif kind != "none" and cached:
            t_logits = cached_teacher_logits(batch, targets.shape[-1], kind)
        elif kind != "none":
            t_logits = teacher_logits(teacher, teacher_variables, images)

        def loss_fn(params):
            variables = {"params": student_params(params), **state.model_state}
            apply_kwargs = dict(train=True, rngs={"dropout": dropout_rng})
            s_features = None
            if kind == "feature":
                outputs, s_features, new_model_state = pooled_features(
                    model, variables, images, mutable=list(state.model_state), **apply_kwargs
                )
                s_features = project(projection, params, s_features)
            else:
                outputs, new_model_state = model.apply(
                    variables, images, mutable=list(state.model_state), **apply_kwargs
                )
            cls_logits, dist_logits = _student_outputs(outputs, distilled)
            total, parts = losses.distillation_loss(
                cls_logits.astype(jnp.float32),
                None if dist_logits is None else dist_logits.astype(jnp.float32),
                t_logits,
                targets,
                kind=kind,
                alpha=config.distillation.alpha,
                tau=config.distillation.tau,
                kl_reduction=kl_reduction,
                student_features=s_features,
                teacher_features=t_features,
                base_criterion=config.loss,
                feature_loss=config.distillation.feature_loss,
                tau_squared=config.distillation.tau_squared,
            )
            return total, (parts, new_model_state, cls_logits)

        (loss, (parts, new_model_state, cls_logits)), grads = jax.value_and_grad(
            loss_fn, has_aux=True
        )(state.params)
        new_state, grad_norm = apply_gradients(
            state, rng, loss, grads, dict(new_model_state), tx, ema_decay, accum
        )
        metrics = {
            "loss": loss,
            "loss_base": parts["base"],
            "grad_norm": grad_norm,
            "lr": schedule(state.step // accum),
        }
        if labelled:
            metrics["train_top1"] = jnp.mean(jnp.argmax(cls_logits, -1) == batch["label"])
        if kind != "none":
            metrics["loss_distillation"] = parts["distillation"]
        return new_state, metrics

    return train_step


def apply_gradients(
    state: TrainState,
    rng: jax.Array,
    loss: jax.Array,
    grads: Any,
    model_state: Any,
    tx: optax.GradientTransformation,
    ema_decay: float,
    accum: int,
) -> tuple[TrainState, jax.Array]:
    """The next train state from a step's loss and gradients (optimiser, EMA, step, `rng`), and
    the gradients' global norm.

    A non-finite step is not applied: the state keeps the last good values, and the training
    loop stops when it sees `nan_step` (naming the step).
    """
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    params = keep(params, state.params)
    ema_params = state.ema_params
    if ema_decay > 0:
        ema = optim.ema_update(state.ema_params, params, ema_decay)
        if accum > 1:  # optax.MultiSteps: only every `accum`-th batch changes the params
            applied = opt_state.mini_step == 0
            ema = jax.tree.map(lambda n, o: jnp.where(applied, n, o), ema, state.ema_params)
        ema_params = keep(ema, ema_params)
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        model_state=keep(model_state, state.model_state),
        opt_state=keep(opt_state, state.opt_state),
        ema_params=ema_params,
        rng=rng,
        nan_step=jnp.where((state.nan_step < 0) & ~finite, state.step, state.nan_step).astype(
            jnp.int32
        ),
    )
    return new_state, grad_norm


def make_eval_step(
    model: nn.Module,
    teacher: nn.Module | None = None,
    *,
    tau: float = 1.0,
    kl_reduction: str = "numel",
    tau_squared: bool = True,
    labelled: bool = True,
    scored_classes: Sequence[int] | None = None,
) -> Callable[[Any, Any, Any, Batch], Metrics]:
    """`eval_step(params, model_state, ema_params, teacher_variables, batch) -> sums`.

    Sums (over the unmasked examples) of top-1/top-5 hits for: the student's prediction
    (`top1`, the heads' average for a distilled model), its class and distillation heads
    (`cls_top1`, `dist_top1`, ...), the EMA weights (`ema_top1`), the teacher (`teacher_top1`)
    and teacher-student agreement; plus the cross-entropy `loss` and the example `count`.
    A batch with `real` (ImageNet-ReaL's (B, classes) label sets) adds `real_top1`/`real_top5`
    hits (a prediction in the set), summed over the `real_count` images that have a set.
    With a teacher, also `kl`: the soft distillation term (temperature `tau`, `kl_reduction`)
    of the head that distillation trains (the distillation head of a distilled student), per
    example, so that its mean is the training term's value on the eval set. Without labels
    (`labelled=False`, label-free data) only `kl`, `agreement` and `count`.
    `scored_classes`: score only these classes (an eval set that holds some of the model's,
    deit_jax/data/class_subsets.py): every other logit of the student, its heads, EMA and the
    teacher is set to -1e30 first, so top-k, loss, agreement and KL are over these classes.
    """
    distilled = bool(getattr(model, "distilled", False))
    # Both heads, deterministically: train-mode output format with every drop rate at zero.
    both_heads = (
        model.clone(drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0) if distilled else None
    )

    def predict(params, model_state, images) -> dict[str, jax.Array]:
        variables = {"params": student_params(params), **model_state}
        if distilled:
            cls_logits, dist_logits = both_heads.apply(variables, images, train=True)
            return {"": (cls_logits + dist_logits) / 2, "cls_": cls_logits, "dist_": dist_logits}
        return {"": model.apply(variables, images, train=False)}

    def scored(logits: jax.Array) -> jax.Array:
        logits = logits.astype(jnp.float32)
        if scored_classes is None:
            return logits
        keep = np.zeros(logits.shape[-1], bool)
        keep[np.asarray(scored_classes)] = True
        return jnp.where(keep, logits, -1e30)  # finite: exp gives 0, and 0 * log stays 0

    def eval_step(params, model_state, ema_params, teacher_variables, batch: Batch) -> Metrics:
        mask = batch["mask"].astype(jnp.float32)
        labels = batch["label"]
        sums: Metrics = {"count": mask.sum()}

        def add(prefix: str, logits: jax.Array) -> None:
            for k, hits in losses.topk_correct(logits.astype(jnp.float32), labels).items():
                sums[prefix + k] = (hits * mask).sum()

        outputs = {k: scored(v) for k, v in predict(params, model_state, batch["image"]).items()}
        if labelled:
            for prefix, logits in outputs.items():
                add(prefix, logits)
            logp = jax.nn.log_softmax(outputs[""].astype(jnp.float32))
            sums["loss"] = (-jnp.take_along_axis(logp, labels[:, None], -1)[:, 0] * mask).sum()
            if ema_params:
                add("ema_", scored(predict(ema_params, model_state, batch["image"])[""]))
        if "real" in batch:
            real = batch["real"].astype(bool)
            has = real.any(-1).astype(jnp.float32) * mask
            top5 = jax.lax.top_k(outputs[""].astype(jnp.float32), min(5, real.shape[-1]))[1]
            hits = jnp.take_along_axis(real, top5, axis=-1)
            sums["real_count"] = has.sum()
            sums["real_top1"] = (hits[:, 0] * has).sum()
            sums["real_top5"] = (hits.any(-1) * has).sum()
        if teacher is not None:
            t_logits = scored(teacher_logits(teacher, teacher_variables, batch["image"]))
            if labelled:
                add("teacher_", t_logits)
            agree = jnp.argmax(t_logits, -1) == jnp.argmax(outputs[""], -1)
            sums["agreement"] = (agree * mask).sum()
            distilled_head = outputs.get("dist_", outputs[""]).astype(jnp.float32)
            kl = losses.soft_kl_per_example(
                distilled_head,
                t_logits,
                tau=tau,
                kl_reduction=kl_reduction,
                tau_squared=tau_squared,
            )
            sums["kl"] = (kl * mask).sum()
        return sums

    return eval_step
