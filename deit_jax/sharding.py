"""The device mesh and the logical-axis rules that place parameters and activations on it.

Mesh axes: 'data' (pure data parallelism) and 'fsdp' (data parallelism that also shards the
parameters and optimiser state, ZeRO-3 style). Batches are split over both. Models name their
axes logically ('batch', 'embed', 'mlp', ...); `logical_rules` maps those names to mesh axes.
Names without a rule (or whose mesh axis is already taken in that array) are replicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXES = ("data", "fsdp")


def create_mesh(
    config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A ('data', 'fsdp') mesh over all devices; `config.data = -1` takes what fsdp leaves.

    `config` is `config.mesh`, whose values the config rules (`deit_jax.config.rules`) checked.
    """
    devices = list(jax.devices() if devices is None else devices)
    fsdp = int(config.fsdp)
    data = len(devices) // fsdp if config.data == -1 else int(config.data)
    return Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))


def logical_rules(mesh: Mesh) -> tuple[tuple[str, Any], ...]:
    """Logical axis name -> mesh axes. 'batch' comes first so activations never reuse 'fsdp'."""
    rules: list[tuple[str, Any]] = [("batch", DATA_AXES)]
    if mesh.shape["fsdp"] > 1:
        # Shard every weight matrix along its model width; the other dim stays whole.
        rules.append(("embed", "fsdp"))
    return tuple(rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """`tree` replicated over `mesh`: arrays put on every device; shapes (a plan's
    `jax.ShapeDtypeStruct`s) given the replicated sharding instead."""
    spec = replicated(mesh)
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree)):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=spec), tree)
    return jax.device_put(tree, spec)


def tree_shardings(boxed_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree whose leaves may be `nn.LogicallyPartitioned` boxes."""
    specs = nn.get_partition_spec(boxed_tree)
    rules = logical_rules(mesh)
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, nn.logical_to_mesh_axes(spec, rules)),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
