"""Training checkpoints: the whole train state and the input pipeline's position, resumable.

Model weights for use elsewhere (a teacher, `init_from`, the export to timm) are not these: a
finished run writes them as a deit_jax weights directory (`deit_jax.weights.directory`).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as ocm

from deit_jax.errors import CheckpointMismatchError, UserError

__all__ = ["TrainCheckpointer", "UnreadableCheckpointsError"]

log = logging.getLogger(__name__)


class UnreadableCheckpointsError(UserError, RuntimeError):
    """Every checkpoint of a run's directory is unreadable (each skipped with a warning)."""


class TrainCheckpointer:
    """Periodic, resumable training checkpoints in one directory (`<workdir>/checkpoints`).

    A thin layer over `orbax.checkpoint.CheckpointManager`. Each step directory holds two items:
    "state" (a pytree of possibly sharded `jax.Array`s: params, optimizer state, EMA, step, rng)
    and "data" (the JSON position of the input pipeline). Saves are asynchronous by default: `save`
    returns once the arrays are copied off the accelerator, and the files are written in the
    background. Orbax coordinates the processes of a multi-host run; every process calls every
    method.

    Retention keeps the last `keep` checkpoints plus the one with the best `best_metric` (among
    those saved with metrics), so a run never loses its best evaluation to rotation.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every_steps: int,
        keep: int,
        best_metric: str | None = "top1",
        best_mode: str = "max",
        async_save: bool = True,
    ):
        if save_every_steps < 1:
            raise ValueError(f"save_every_steps must be >= 1, got {save_every_steps}.")
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (checkpoints kept on disk), got {keep}.")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}.")
        directory = os.fspath(directory)
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.best_metric = best_metric
        policies = [ocm.LatestN(n=keep)]
        best_fn = None
        if best_metric is not None:
            best_fn = lambda metrics: metrics[best_metric]
            # Orbax's default policy with `best_fn` keeps only the best `max_to_keep`, dropping the
            # latest (needed to resume) whenever it scores lower. And with
            # `keep_checkpoints_without_metrics` it would never delete metric-less saves; LatestN
            # rotates those instead.
            policies.append(
                ocm.BestN(
                    get_metric_fn=best_fn,
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            best_fn=best_fn,  # Makes the manager write the metrics beside each checkpoint.
            best_mode=best_mode,
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            save_decision_policy=ocm.AnySavePolicy(
                [
                    ocm.FixedIntervalPolicy(save_every_steps),
                    # On a preemption notice (multi-host TPU/GPU jobs) save at the sync step.
                    ocm.PreemptionCheckpointingPolicy(),
                ]
            ),
            enable_async_checkpointing=async_save,
            # Temporary directories left by a save that was killed are never resumed from.
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        """The newest step on disk (finished saves only), or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All steps on disk, ascending."""
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Whether `step` is a save step (every `save_every_steps`, or a preemption point)."""
        return self._manager.should_save(step)

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_state: dict[str, Any],
        metrics: dict[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves `state` and `data_state` as `step`; returns whether a save was started.

        Without `force`, only save steps (see `should_save`) are written. A step already on disk is
        never overwritten (returns False). `metrics` (eval results, e.g. {"top1": 0.72}) rank the
        checkpoint for best-checkpoint retention. All processes pass the same `data_state`; process
        0's copy is written.
        """
        if not force and not self.should_save(step):
            return False
        if step in self._manager.all_steps():
            log.info(
                "Checkpoint for step %d already exists in %s; not saving.", step, self.directory
            )
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(_json_copy(data_state, "data_state")),
        )
        return self._manager.save(step, args=args, metrics=self._check_metrics(metrics), force=True)

    def restore(
        self, abstract_state: Any, *, delete_unreadable: bool = True
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """Restores the newest readable checkpoint; returns `(step, state, data_state)` or None.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct`s (or arrays) with shardings; arrays
        are read straight into those shardings. A checkpoint that cannot be read (a partial save,
        truncated or missing files) is skipped with a warning, the previous one is tried, and the
        skipped ones are deleted once an older one restores (training redoes those steps, and
        would otherwise collide with them). A checkpoint whose tree or shapes differ from
        `abstract_state` raises `CheckpointMismatchError`: the run's config changed, and restoring
        an older step would not help. Read-only callers (evaluation) pass
        `delete_unreadable=False`: they skip such checkpoints but leave them on disk.
        """
        abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        if any(leaf.sharding is None for leaf in jax.tree.leaves(abstract_state)):
            raise ValueError(
                "restore() needs a sharding on every leaf of abstract_state, e.g. "
                "jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec)) as built "
                "by jax.eval_shape plus the train state's shardings."
            )
        self.wait_until_finished()
        unreadable = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            restored, error = self._try_restore(step, abstract_state)
            # Every process must make the same choice, or they would restore different steps.
            if _all_processes_agree(error is None):
                for bad in unreadable if delete_unreadable else ():
                    log.warning("Deleting unreadable checkpoint %d in %s.", bad, self.directory)
                    self._manager.delete(bad)
                return step, restored["state"], dict(restored["data"])
            error = error or RuntimeError("another process could not read it")
            log.warning(
                "Skipping unreadable checkpoint at step %d in %s: %s: %s",
                step,
                self.directory,
                type(error).__name__,
                str(error)[:300],
            )
            unreadable.append(step)
        if unreadable:
            raise UnreadableCheckpointsError(
                f"No checkpoint in {self.directory} could be read (steps {sorted(unreadable)}; "
                "see the warnings above). Delete the broken step directories to start over, or use "
                "a new --workdir."
            )
        return None

    def wait_until_finished(self) -> None:
        """Blocks until background saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for background saves and releases the manager."""
        self._manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check_metrics(self, metrics: dict[str, Any] | None) -> dict[str, float] | None:
        if metrics is None or self.best_metric is None:
            return None
        try:
            metrics = {k: float(v) for k, v in metrics.items()}
        except (TypeError, ValueError) as e:
            raise ValueError(f"metrics must map names to numbers, got {metrics!r}.") from e
        if self.best_metric not in metrics:
            raise ValueError(
                f"metrics {sorted(metrics)} lack best_metric {self.best_metric!r}, which ranks "
                "checkpoints; pass it or set best_metric to one of these names."
            )
        return metrics

    def _try_restore(self, step: int, abstract_state: Any) -> tuple[Any, Exception | None]:
        """Restores `step`, or returns the error that makes it unreadable."""
        try:
            step_metadata = self._manager.metadata(step)
            if step_metadata.commit_timestamp_nsecs is None:
                raise FileNotFoundError("no commit record: the save did not finish")
            stored = step_metadata.item_metadata["state"].tree
        except Exception as e:  # Whatever the storage layer raises, this step is unusable.
            return None, e
        _check_same_arrays(step, self.directory, stored, abstract_state)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:
            return None, e
        return restored, None


def _json_copy(value: Any, name: str) -> Any:
    """A JSON round trip: fails early on unserialisable values and snapshots `value`."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"{name} must be JSON-serialisable (plain ints, floats, strs, lists, dicts): {e}"
        ) from e


def _all_processes_agree(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _check_same_arrays(step: int, directory: str, stored: Any, abstract_state: Any) -> None:
    """Raises `CheckpointMismatchError` if the stored tree or shapes differ from the target."""
    have = {"/".join(k): v.shape for k, v in ocp.tree.to_flat_dict(stored).items()}
    # Keep empty nodes: without them a tuple with an empty middle entry (optax's masked weight
    # decay state) cannot be serialised (Orbax asserts), and the stored list indices would shift.
    serialized = ocp.tree.serialize_tree(abstract_state, keep_empty_nodes=True)
    want = {"/".join(k): v for k, v in ocp.tree.to_flat_dict(serialized).items()}
    problems = [f"{k}: missing from the checkpoint" for k in sorted(want.keys() - have.keys())]
    problems += [f"{k}: in the checkpoint, not in the model" for k in sorted(have.keys() - want)]
    for k in sorted(want.keys() & have.keys()):
        # A typed PRNG key's stored shape includes its key data; its dtype pins that down.
        is_key = jax.dtypes.issubdtype(want[k].dtype, jax.dtypes.prng_key)
        if not is_key and tuple(have[k]) != tuple(want[k].shape):
            problems.append(f"{k}: shape {tuple(have[k])} in the checkpoint, {want[k].shape} now")
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise CheckpointMismatchError(
            f"The checkpoint at step {step} in {directory} was written for a different model or "
            f"config than this run's:\n  {shown}{more}\nUse a new --workdir for a new model/config "
            "(or rerun with the config that wrote it)."
        )
