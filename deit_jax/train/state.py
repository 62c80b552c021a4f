"""The student and its train state: the model a config names, its weights (fresh, or merged
from `config.init_from`) and the state's initialisation on the mesh.
"""

from __future__ import annotations

import logging
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from deit_jax import sharding
from deit_jax.config import rules
from deit_jax.errors import CheckpointError, ConfigError
from deit_jax.jit import jit
from deit_jax.models import create_model, input_size, model_options
from deit_jax.models.registry import given_options
from deit_jax.train.projection import PROJECTION, Projection, student_params
from deit_jax.weights import inherit, surgery
from deit_jax.weights.load import load_weights

log = logging.getLogger(__name__)


def check_config(config: ml_collections.ConfigDict, devices: list[jax.Device] | None) -> None:
    """The whole config, before any data set, model or compilation (`deit_jax.config.rules`)."""
    num_devices = jax.device_count() if devices is None else len(devices)
    rules.check_config(config, num_devices=num_devices, num_processes=jax.process_count())


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    model_state: Any  # mutable collections other than params, e.g. {"batch_stats": ...}
    opt_state: Any
    ema_params: Any  # {} when EMA is off
    rng: jax.Array  # raw uint32[2] key: checkpointable as a plain array
    nan_step: jax.Array  # first step whose loss or gradients were not finite, -1 if none


def init_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    *,
    ema: bool,
    projection: Projection | None = None,
) -> TrainState:
    """A fresh state; params keep their logical-partitioning boxes (for the mesh shardings).

    With a feature-distillation `projection`, `params` gains its subtree `"projection"`.
    """
    init_rng, state_rng = jax.random.split(rng)
    h, w = input_size(model)
    images = jnp.zeros((1, h, w, getattr(model, "in_chans", 3)), jnp.float32)
    variables = model.init({"params": init_rng, "dropout": init_rng}, images, train=False)
    variables = dict(variables)
    variables.pop("intermediates", None)
    params = variables.pop("params")
    if projection is not None:
        # A key of its own: the student's init (and so every other run) stays as it was.
        params = {
            **params,
            PROJECTION: projection.init_params(jax.random.fold_in(rng, 1)),
        }
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=variables,
        opt_state=tx.init(params),
        ema_params=params if ema else {},
        rng=state_rng,
        nan_step=jnp.full((), -1, jnp.int32),
    )


def student_overrides(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
    """`create_model` overrides for the student: config.model plus the data's classes and size."""
    overrides = given_options(config.model_name, config.model.to_dict())
    if "num_classes" not in model_options(config.model_name):  # a CLIP student: no classes
        overrides.pop("num_classes", None)
    elif overrides.setdefault("num_classes", num_classes) != num_classes:
        raise ConfigError(
            f"config.model.num_classes={overrides['num_classes']} but data set "
            f"{config.data.name!r} has {num_classes} classes; remove the override or use "
            "matching data."
        )
    if "img_size" in model_options(config.model_name):
        overrides.setdefault("img_size", config.data.img_size)
    return overrides


def build_student(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    overrides = student_overrides(config, num_classes)
    return create_model(config.model_name, dtype=jnp.dtype(config.dtype), **overrides)


def merge_pretrained(params: Any, pretrained: Any, model: nn.Module) -> Any:
    """Pretrained params over fresh ones, fitted to the model (`deit_jax.weights.surgery`:
    pos_embed resized, heads of another class count kept fresh); feature distillation's
    projection is not part of the weights and stays fresh."""
    flat, source = traverse_util.flatten_dict(params), traverse_util.flatten_dict(pretrained)
    problems, fresh_heads = [], []
    for path, value in flat.items():
        if path[0] == PROJECTION:
            continue
        if path not in source:
            problems.append(f"missing {'/'.join(path)}")
            continue
        new = np.asarray(source[path])
        if new.shape != value.shape:
            new = surgery.fit(model, path, new, value.shape)
            if new is None:
                fresh_heads.append("/".join(path))
                continue
        if new.shape != value.shape:
            problems.append(f"{'/'.join(path)}: {new.shape} vs {value.shape}")
            continue
        flat[path] = jnp.asarray(new, value.dtype)
    if problems:
        raise CheckpointError("config.init_from does not fit the model: " + "; ".join(problems))
    if fresh_heads:
        log.warning("init_from: class count differs, training new %s", ", ".join(fresh_heads))
    return traverse_util.unflatten_dict(flat)


def initial_params(config: ml_collections.ConfigDict, params: Any, model: nn.Module) -> Any:
    """The student's starting params: `config.init_from` merged as is (`merge_pretrained`) or,
    with `config.init`'s inheritance or CLIP tower sources, taken from larger or other weights
    (`deit_jax.weights.inherit.load`); None when the config names no weights."""
    inheriting = inherit.wanted(config)
    if not (config.init_from or inheriting):
        return None
    if config.init_from and not (inheriting and config.init.inherit):
        pretrained, _ = load_weights(config.init_from, config.model_name)
        params = merge_pretrained(params, pretrained["params"], model)
    if inheriting:  # the projection stays fresh: it is not part of any weights
        params = {**params, **inherit.load(config, student_params(params), model)}
    log.info("Initialised from %s", config.init_from or "the CLIP tower weights")
    return params


def state_and_shardings(config, model, tx, mesh, projection=None):
    """`(init, abstract, shardings)`: the jitted initialisation of the train state on `mesh`,
    its abstract arrays (with shardings, for restoring a checkpoint) and their shardings."""
    ema = config.optim.ema_decay > 0
    # The model's own seed when given: students that differ only in it share one data stream,
    # and so one teacher cache.
    init_seed = config.init_seed
    rng = jax.random.PRNGKey(config.seed if init_seed is None else init_seed)
    boxed = jax.eval_shape(lambda: init_state(model, tx, rng, ema=ema, projection=projection))
    state_shardings = sharding.tree_shardings(boxed, mesh)
    init = jit(
        lambda: nn.meta.unbox(init_state(model, tx, rng, ema=ema, projection=projection)),
        out_shardings=state_shardings,
    )
    values = jax.tree.map(
        lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
        boxed,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), values, state_shardings
    )
    return init, abstract, state_shardings
