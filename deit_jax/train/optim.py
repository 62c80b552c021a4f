"""The reference DeiT optimiser: AdamW (or DeiT III's LAMB), warmup + cosine rate, EMA of weights.

Everything is built from `config.optim` (see `deit_jax.config`):

  tx, schedule = create_optimizer(config.optim, global_batch_size=config.batch_size,
                                  steps_per_epoch=batches_per_epoch, num_epochs=config.num_epochs)

`global_batch_size` is the number of examples in one data batch (all processes together) and
`steps_per_epoch` the number of data batches per epoch. With `grad_accum_steps = k > 1`, one
optimiser update averages the gradients of k batches: the learning rate is scaled for the
effective batch k * global_batch_size, and the schedule counts optimiser updates (k batches each),
so log `schedule(batch_index // k)`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

log = logging.getLogger(__name__)

# Parameters the reference model lists in `no_weight_decay()`; besides these, every parameter
# with at most one dimension (biases, LayerNorm scales) is excluded from weight decay.
NO_WEIGHT_DECAY = frozenset({"pos_embed", "cls_token", "dist_token"})


def _check_sizes(global_batch_size: int, steps_per_epoch: float, num_epochs: float) -> None:
    """The sizes a schedule is built for, derived from the data (the config's own values are
    checked by `deit_jax.config.rules`)."""
    for name, value in (
        ("global_batch_size", global_batch_size),
        ("steps_per_epoch", steps_per_epoch),
        ("num_epochs", num_epochs),
    ):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}.")


def peak_learning_rate(config: ml_collections.ConfigDict, global_batch_size: int) -> float:
    """lr * effective batch / lr_batch_base (the reference's linear scaling rule).

    warmup_lr and min_lr are not scaled, as in the reference. With `unscale_lr` (the reference's
    `--unscale-lr`, used by DeiT III) the peak rate is `lr` itself.
    """
    if config.unscale_lr:
        return float(config.lr)
    effective_batch = global_batch_size * config.grad_accum_steps
    return config.lr * effective_batch / config.lr_batch_base


def learning_rate_schedule(
    config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    steps_per_epoch: float,
    num_epochs: float,
) -> optax.Schedule:
    """Learning rate as a function of the optimiser update count.

    The formula of the reference (timm's `CosineLRScheduler` with `warmup_prefix=False`), in
    epochs e = update / updates_per_epoch:

      e < warmup_epochs:  warmup_lr + (peak - warmup_lr) * e / warmup_epochs
      otherwise:          min_lr + (peak - min_lr) * (1 + cos(pi * min(e, E) / E)) / 2

    with E = num_epochs and peak = lr * batch / lr_batch_base (`peak_learning_rate`).

    The cosine runs over the whole training, warmup included, so right after the warmup the rate
    is already cos-decayed a little (0.9993 * peak for 5 of 300 epochs) and it reaches min_lr at
    the end. The reference evaluates this once per epoch (`lr_scheduler.step(epoch)` after each
    epoch), so its rate is constant within an epoch and lags by one epoch (epochs 0 and 1 both
    train at warmup_lr; the last epoch trains at the value of epoch num_epochs - 2). This schedule
    evaluates it at every update: a smooth ramp, about one epoch ahead of the reference, with the
    same values at epoch boundaries. Over 300 epochs the difference is negligible; on runs of a
    few epochs it is not (the reference never leaves warmup_lr in a 2-epoch run).

    `global_batch_size` and `steps_per_epoch` count data batches, as in `create_optimizer`.
    """
    _check_sizes(global_batch_size, steps_per_epoch, num_epochs)
    peak = peak_learning_rate(config, global_batch_size)
    if peak < config.min_lr:
        log.warning(
            "Peak learning rate %.3g (lr %.3g x batch %d / %d) is below min_lr %.3g: the cosine "
            "will rise instead of decay. Lower config.optim.min_lr for small batches.",
            peak,
            config.lr,
            global_batch_size * config.grad_accum_steps,
            config.lr_batch_base,
            config.min_lr,
        )
    updates_per_epoch = steps_per_epoch / config.grad_accum_steps
    warmup_epochs = float(config.warmup_epochs)
    warmup_lr, min_lr = float(config.warmup_lr), float(config.min_lr)
    num_epochs = float(num_epochs)

    def schedule(count: jax.Array) -> jax.Array:
        epoch = jnp.asarray(count, jnp.float32) / updates_per_epoch
        progress = jnp.minimum(epoch, num_epochs) / num_epochs
        cosine = min_lr + 0.5 * (peak - min_lr) * (1.0 + jnp.cos(math.pi * progress))
        if warmup_epochs == 0:
            return cosine
        warmup = warmup_lr + (peak - warmup_lr) * epoch / warmup_epochs
        return jnp.where(epoch < warmup_epochs, warmup, cosine)

    return schedule


def _leaf_name(path: tuple[Any, ...]) -> str:
    # Flax boxes (nn.Partitioned) add attribute keys below the parameter's own dict key.
    keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    return str(keys[-1]) if keys else ""


def weight_decay_mask(params: Any) -> Any:
    """Pytree of bools, True where weight decay applies (optax's `mask` convention).

    The reference rule: no decay on any parameter with at most one dimension (biases, LayerNorm
    scales and offsets), on any `bias`, nor on pos_embed, cls_token, dist_token.
    """

    def decays(path: tuple[Any, ...], leaf: Any) -> bool:
        name = _leaf_name(path)
        return not (jnp.ndim(leaf) <= 1 or name == "bias" or name in NO_WEIGHT_DECAY)

    return jax.tree_util.tree_map_with_path(decays, params)


def total_steps(num_epochs: float, steps_per_epoch: float) -> int:
    """The steps a run of `num_epochs` (may be fractional) takes: at least one."""
    return max(1, int(round(num_epochs * steps_per_epoch)))


def create_optimizer(
    config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    steps_per_epoch: float,
    num_epochs: float,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (or LAMB, `config.name="lamb"`) with the reference schedule and weight-decay mask.

    Returns `(tx, schedule)`.

    Optional global-norm gradient clipping (`clip_grad_norm > 0`) acts on the (accumulated)
    gradient before AdamW. With `grad_accum_steps = k > 1` the transformation is wrapped in
    `optax.MultiSteps`: it averages k gradients and updates the parameters on every k-th call
    (zero updates otherwise); the schedule counts those real updates. Update the EMA of the
    weights only on real updates too (`optax.MultiSteps` state `mini_step == 0` after the call).
    """
    schedule = learning_rate_schedule(
        config,
        global_batch_size=global_batch_size,
        steps_per_epoch=steps_per_epoch,
        num_epochs=num_epochs,
    )
    if config.name == "lamb":
        tx = lamb(schedule, config)
    else:
        tx = optax.adamw(
            schedule,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=weight_decay_mask,
        )
    if config.clip_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.clip_grad_norm), tx)
    if config.grad_accum_steps > 1:
        tx = optax.MultiSteps(
            tx, every_k_schedule=config.grad_accum_steps
        ).gradient_transformation()
    return tx, schedule


def lamb(
    learning_rate: optax.ScalarOrSchedule, config: ml_collections.ConfigDict
) -> optax.GradientTransformation:
    """LAMB as the DeiT III reference runs it (apex `FusedLAMB`, through timm's optimiser factory).

    optax's `lamb` pieces (Adam moments with bias correction, decoupled weight decay, the layer's
    trust ratio ||param|| / ||update||, then the rate), with the reference's two differences from
    `optax.lamb`: the weight-decay mask of `weight_decay_mask` and, as FusedLAMB's default
    `use_nvlamb=False` (timm `Lamb(always_adapt=False)`), no trust ratio on the parameters
    without weight decay (nowhere when weight_decay is 0). FusedLAMB also clips the global
    gradient norm at 1.0 by default: the DeiT III configs set `clip_grad_norm = 1.0` for that.
    """
    decay = config.weight_decay > 0
    return optax.chain(
        optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
        optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask),
        optax.masked(optax.scale_by_trust_ratio(), weight_decay_mask)
        if decay
        else optax.identity(),
        optax.scale_by_learning_rate(learning_rate),
    )


def ema_update(ema_params: Any, params: Any, decay: float | jax.Array) -> Any:
    """One step of the weights' moving average: decay * ema + (1 - decay) * params.

    timm's `ModelEma`, which the reference updates after every optimiser step. Keeps the dtypes
    of `ema_params`; decay 0 returns `params` (no EMA).
    """
    if isinstance(decay, (int, float)):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1) (0 disables), got {decay}.")
        if decay == 0:
            return params
    return jax.tree.map(
        lambda e, p: (decay * e + (1.0 - decay) * p).astype(jnp.result_type(e)), ema_params, params
    )
