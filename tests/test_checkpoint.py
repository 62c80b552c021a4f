"""Checkpoints on disk: variables (`save_variables`) and training checkpoints (`TrainCheckpointer`).

Real Orbax files in tmp_path, real 8-device CPU meshes (see conftest.py).
"""

import glob
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deit_jax.errors import CheckpointMismatchError
from deit_jax.train.checkpoint import TrainCheckpointer
from deit_jax.weights.directory import load_variables, save_variables


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((8,), ("data",))


def _state(mesh, seed=0, width=32):
    """A small train-state-like pytree: a sharded and a replicated array, a step and an rng."""
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "w": jax.device_put(
                rng.normal(size=(64, width)).astype(np.float32), NamedSharding(mesh, P("data"))
            ),
            "b": jax.device_put(
                rng.normal(size=(width,)).astype(np.float32), NamedSharding(mesh, P())
            ),
        },
        "step": jnp.int32(seed),
        "rng": jax.random.key(seed),
    }


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _assert_same(a, b):
    a = jax.tree.map(
        lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, a
    )
    b = jax.tree.map(
        lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, b
    )
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _steps_on_disk(directory):
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def test_variables_round_trip(tmp_path, mesh):
    variables = {"params": _state(mesh)["params"]}
    save_variables(tmp_path / "w", variables, model_name="deit_tiny_patch16_224")
    with pytest.raises(FileExistsError):
        save_variables(tmp_path / "w", variables, model_name="deit_tiny_patch16_224")
    restored, metadata = load_variables(tmp_path / "w", variables)
    assert metadata == {"model_name": "deit_tiny_patch16_224", "model_overrides": {}}
    _assert_same(restored, variables)
    assert restored["params"]["w"].sharding == variables["params"]["w"].sharding


def test_round_trip_into_target_shardings(tmp_path, mesh):
    state = _state(mesh, seed=3)
    with TrainCheckpointer(tmp_path, save_every_steps=5, keep=3, async_save=False) as ckpt:
        assert ckpt.restore(_abstract(state)) is None
        assert not ckpt.should_save(7) and ckpt.should_save(10)
        assert not ckpt.save(7, state, data_state={"epoch": 0})  # Not a save step.
        assert ckpt.save(10, state, data_state={"epoch": 1, "position": 123})
        assert ckpt.save(13, state, data_state={"epoch": 1, "position": 200}, force=True)
        assert not ckpt.save(13, state, data_state={}, force=True)  # Never overwrites.
        assert ckpt.all_steps() == [10, 13]

    # Restore `w` into another sharding than the saved one: split on its second axis.
    target = _abstract(state)
    resharded = NamedSharding(mesh, P(None, "data"))
    target["params"]["w"] = jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=resharded)
    with TrainCheckpointer(tmp_path, save_every_steps=5, keep=3) as ckpt:
        assert ckpt.latest_step() == 13
        step, restored, data_state = ckpt.restore(target)
    assert step == 13 and data_state == {"epoch": 1, "position": 200}
    _assert_same(restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target), strict=True):
        assert got.sharding == want.sharding
    assert restored["params"]["w"].sharding.spec == P(None, "data")


def test_optimizer_state_with_an_empty_entry_round_trips(tmp_path, mesh):
    # optax's masked weight decay leaves an empty state between non-empty ones in the chain's tuple;
    # resuming training once failed on it (an assertion inside Orbax's tree serialisation).
    import optax

    state = _state(mesh)
    tx = optax.chain(
        optax.scale_by_adam(),
        optax.add_decayed_weights(0.05, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
        optax.scale_by_schedule(lambda count: -1.0),
    )
    state["opt_state"] = tx.init(state["params"])
    with TrainCheckpointer(tmp_path, save_every_steps=1, keep=1, async_save=False) as ckpt:
        ckpt.save(1, state, data_state={})
    with TrainCheckpointer(tmp_path, save_every_steps=1, keep=1) as ckpt:
        step, restored, _ = ckpt.restore(_abstract(state))
    assert step == 1
    _assert_same(restored, state)


def test_keeps_last_k_plus_best(tmp_path, mesh):
    state = _state(mesh)
    top1 = {1: 0.1, 2: 0.5, 3: 0.2, 4: 0.3, 5: 0.1, 6: 0.05}
    with TrainCheckpointer(tmp_path, save_every_steps=1, keep=2, async_save=False) as ckpt:
        for step, acc in top1.items():
            ckpt.save(step, state, data_state={}, metrics={"top1": acc, "loss": 1.0})
        assert _steps_on_disk(tmp_path) == [2, 5, 6]
        # Saves without eval metrics rotate like the others; the best one stays.
        ckpt.save(7, state, data_state={})
        ckpt.save(8, state, data_state={})
        assert _steps_on_disk(tmp_path) == [2, 7, 8]
        ckpt.save(9, state, data_state={}, metrics={"top1": 0.9})
        ckpt.save(10, state, data_state={})
        ckpt.save(11, state, data_state={})
        assert _steps_on_disk(tmp_path) == [9, 10, 11]
        with pytest.raises(ValueError, match="best_metric 'top1'"):
            ckpt.save(12, state, data_state={}, metrics={"acc": 0.5})

    with TrainCheckpointer(
        tmp_path / "min", save_every_steps=1, keep=1, best_metric="loss", best_mode="min"
    ) as ckpt:
        for step, loss in {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5}.items():
            ckpt.save(step, state, data_state={}, metrics={"loss": loss})
        ckpt.wait_until_finished()
        assert _steps_on_disk(tmp_path / "min") == [2, 4]

    with TrainCheckpointer(
        tmp_path / "latest", save_every_steps=1, keep=2, best_metric=None, async_save=False
    ) as ckpt:
        for step in range(1, 5):
            ckpt.save(step, state, data_state={}, metrics={"top1": 1.0 / step})
        assert _steps_on_disk(tmp_path / "latest") == [3, 4]


# After a failed read, TensorStore may still call back into Orbax's closed event loop; Python
# reports that as "Exception ignored". It is noise from the deliberately broken checkpoint.
quiet_failed_reads = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@quiet_failed_reads
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_unreadable_checkpoints_are_skipped(tmp_path, mesh, caplog, damage):
    states = {step: _state(mesh, seed=step) for step in (1, 2, 3)}
    with TrainCheckpointer(tmp_path, save_every_steps=1, keep=5, async_save=False) as ckpt:
        for step, state in states.items():
            ckpt.save(step, state, data_state={"position": step})

    # Step 3: its array data file (the OCDBT database the per-process writes are merged into) is
    # damaged. Step 4: a save killed before its commit record was written.
    data_file = max(glob.glob(str(tmp_path / "3" / "state" / "d" / "*")), key=os.path.getsize)
    assert os.path.getsize(data_file) > 8 * 64 * 32 // 2  # Holds the arrays, not just an index.
    if damage == "truncate":
        os.truncate(data_file, os.path.getsize(data_file) // 2)
    else:
        os.remove(data_file)
    shutil.copytree(tmp_path / "2", tmp_path / "4")
    os.remove(tmp_path / "4" / "_CHECKPOINT_METADATA")

    caplog.set_level(logging.WARNING, logger="deit_jax.checkpoint")
    with TrainCheckpointer(tmp_path, save_every_steps=1, keep=5, async_save=False) as ckpt:
        assert ckpt.latest_step() == 4
        # Read-only (evaluation): the same step is found, nothing is deleted.
        step, _, _ = ckpt.restore(_abstract(states[1]), delete_unreadable=False)
        assert step == 2 and _steps_on_disk(tmp_path) == [1, 2, 3, 4]
        caplog.clear()
        step, restored, data_state = ckpt.restore(_abstract(states[1]))
        assert step == 2 and data_state == {"position": 2}
        _assert_same(restored, states[2])
        skipped = [r.getMessage() for r in caplog.records if "Skipping" in r.getMessage()]
        assert len(skipped) == 2
        assert "step 4" in skipped[0] and "commit" in skipped[0]
        assert "step 3" in skipped[1] and "Error" in skipped[1]
        # The broken steps are gone, so training can save them again.
        assert ckpt.latest_step() == 2 and _steps_on_disk(tmp_path) == [1, 2]
        assert ckpt.save(3, states[3], data_state={"position": 3})


@quiet_failed_reads
def test_all_unreadable_raises(tmp_path, mesh):
    state = _state(mesh)
    with TrainCheckpointer(tmp_path, save_every_steps=1, keep=5, async_save=False) as ckpt:
        ckpt.save(1, state, data_state={})
    os.remove(tmp_path / "1" / "_CHECKPOINT_METADATA")
    with (
        TrainCheckpointer(tmp_path, save_every_steps=1, keep=5) as ckpt,
        pytest.raises(RuntimeError, match=r"No checkpoint .* could be read \(steps \[1\]"),
    ):
        ckpt.restore(_abstract(state))
    assert _steps_on_disk(tmp_path) == [1]  # Nothing deleted when nothing restored.


def test_different_model_is_not_corruption(tmp_path, mesh):
    with TrainCheckpointer(tmp_path, save_every_steps=1, keep=5, async_save=False) as ckpt:
        ckpt.save(1, _state(mesh), data_state={})
        ckpt.save(2, _state(mesh), data_state={})

    other = _state(mesh, width=16)  # e.g. a wider model.
    other["params"]["head"] = other["params"]["b"]
    with TrainCheckpointer(tmp_path, save_every_steps=1, keep=5) as ckpt:
        with pytest.raises(CheckpointMismatchError) as e:
            ckpt.restore(_abstract(other))
        message = str(e.value)
        assert "step 2" in message and "different model or config" in message
        assert "new --workdir" in message
        assert "params/w: shape (64, 32) in the checkpoint, (64, 16) now" in message
        assert "params/head: missing from the checkpoint" in message
        assert _steps_on_disk(tmp_path) == [1, 2]  # Nothing deleted.
        with pytest.raises(ValueError, match="needs a sharding"):
            ckpt.restore(
                jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(mesh))
            )


def test_async_save_is_seen_by_a_new_checkpointer(tmp_path, mesh):
    state = _state(mesh, seed=5)
    ckpt = TrainCheckpointer(tmp_path, save_every_steps=100, keep=2, async_save=True)
    assert ckpt.save(100, state, data_state={"epoch": 2, "order": [3, 1, 2]})
    with pytest.raises(TypeError, match="JSON-serialisable"):
        ckpt.save(200, state, data_state={"rng": np.zeros(2)})
    ckpt.wait_until_finished()
    with TrainCheckpointer(tmp_path, save_every_steps=100, keep=2) as fresh:
        assert fresh.latest_step() == 100
        step, restored, data_state = fresh.restore(_abstract(state))
    assert step == 100 and data_state == {"epoch": 2, "order": [3, 1, 2]}
    _assert_same(restored, state)
    ckpt.close()
