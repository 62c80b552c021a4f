"""Training as real processes of `python -m deit_jax.main`: two hosts, kill -9, SIGTERM, NaN.

Every run is the tiny config of tests/_train_config.py on the offline digits data, 32 steps,
a checkpoint every 8 (last 3 kept), training data read as 2 shares (`data.num_shares=2`, so that
one process feeding both shares and two processes feeding one each see the same batches). The
uninterrupted reference run (1 process, 4 CPU devices) is shared by the tests of this module.

Tolerances: two processes x 2 devices reduce in another order than one process x 4 devices, so
losses agree to a relative 1e-4 and parameters to an absolute 1e-4 (as across meshes in
tests/test_train.py). A run resumed on the same mesh (after kill -9, a corrupt checkpoint or
SIGTERM) must equal the uninterrupted run exactly: same losses and bitwise the same parameters.

Every subprocess has a timeout. To keep the ~8 processes cheap they share a JAX compilation
cache (a module tmp dir; each run would otherwise spend ~20 s recompiling the same steps), and
all but the NaN test's run the entry point as `python -c "import tensorflow; ...main.run()"`:
`python -m deit_jax.main` with TensorFlow imported first, which spares deit_jax/_compat.py's
precautionary torchvision import (~5 s of each process's ~17 s of imports).
"""

import glob
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _processes import TF_FIRST_MAIN, TIMEOUT, cpu_env, finish, free_port, run_ok, tail
from _train_config import save_random_teacher, tiny_config

from deit_jax.data import catalog
from deit_jax.train.metrics import read_jsonl
from deit_jax.weights.directory import load_variables

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_train_config.py")
STEPS = 32  # 44 steps make an epoch
EVERY = 8  # checkpoint_every_steps


# --------------------------------------------------------------------------- processes


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    catalog.get_source(tiny_config(path).data)  # Prepare digits once, before any subprocess.
    return path


@pytest.fixture(scope="module")
def processes():
    """Started processes; any still running at the end of the module is killed."""
    started = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def launch(data_dir, processes):
    """`launch(workdir, log, *flags, devices=4, gloo=False, tf_first=True)` starts deit_jax.main."""

    def start(workdir, log, *flags, devices=4, gloo=False, tf_first=True):
        env = cpu_env(devices, gloo)
        entry = ["-c", TF_FIRST_MAIN] if tf_first else ["-m", "deit_jax.main"]
        cmd = [
            sys.executable,
            *entry,
            f"--config={CONFIG}",
            f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}",
            f"--config.num_epochs={STEPS / 44}",
            "--config.data.num_shares=2",
            f"--config.checkpoint_every_steps={EVERY}",
            *flags,
        ]
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        proc.log = str(log)
        processes.append(proc)
        return proc

    return start


def checkpoint_steps(workdir) -> list[int]:
    """Finished checkpoints (Orbax renames a step's tmp directory to its number when done)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def wait_for_checkpoint(proc, workdir, min_step, timeout=TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited ({proc.returncode}) before checkpoint {min_step}:\n{tail(proc)}")
        steps = checkpoint_steps(workdir)
        if steps and steps[-1] >= min_step:
            return
        time.sleep(0.02)
    pytest.fail(f"no checkpoint >= {min_step} after {timeout} s:\n{tail(proc)}")


def wait_for_output(proc, text, timeout=TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(proc.log) as f:
            if text in f.read():
                return
        if proc.poll() is not None:
            pytest.fail(f"exited ({proc.returncode}) before printing {text!r}:\n{tail(proc)}")
        time.sleep(0.05)
    pytest.fail(f"no {text!r} after {timeout} s:\n{tail(proc)}")


def run_two_processes(launch, workdir, log_prefix, *flags) -> list[str]:
    """Two processes of two devices (gloo) on one workdir; returns their outputs."""
    port = free_port()
    procs = [
        launch(
            workdir,
            f"{log_prefix}{i}.txt",
            *flags,
            "--distributed",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
            devices=2,
            gloo=True,
        )
        for i in range(2)
    ]
    try:
        return [run_ok(proc) for proc in procs]
    finally:  # One failed process leaves the other waiting in a collective.
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


# --------------------------------------------------------------------------- results


def train_losses(workdir) -> dict[int, list[float]]:
    """Step -> every loss logged for it (a step redone after a restart is logged again)."""
    losses = {}
    for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")):
        if "train/loss" in r:
            losses.setdefault(r["step"], []).append(r["train/loss"])
    return losses


def final_params(workdir):
    variables, _ = load_variables(os.path.join(workdir, "weights"))
    return variables["params"]


def checkpoint_state(workdir, step):
    """The raw train state of a checkpoint, on one device (whatever topology wrote it)."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckpt:
        stored = ckpt.metadata(path).item_metadata.tree
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), stored
        )
        return ckpt.restore(path, target)


def assert_trees_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, launch):
    """The uninterrupted run: one process, four devices."""
    workdir = tmp_path_factory.mktemp("reference")
    run_ok(launch(workdir / "run", workdir / "log.txt"))
    return workdir / "run"


# --------------------------------------------------------------------------- tests


def test_two_processes_of_two_devices_train_as_one_process_of_four(reference, launch, tmp_path):
    workdir = tmp_path / "run"
    outputs = run_two_processes(launch, workdir, tmp_path / "log")

    # Only process 0 reports and writes metrics: every step once, one TensorBoard file.
    assert "eval @ step" in outputs[0] and "eval @ step" not in outputs[1]
    losses, want = train_losses(workdir), train_losses(reference)
    assert {step: len(v) for step, v in losses.items()} == {s: 1 for s in range(1, STEPS + 1)}
    assert len(glob.glob(str(workdir / "tensorboard" / "events.*"))) == 1
    np.testing.assert_allclose(
        [v[0] for v in losses.values()], [v[0] for v in want.values()], rtol=1e-4
    )
    assert_trees_close(final_params(workdir), final_params(reference), atol=1e-4)
    evals = [r for r in read_jsonl(workdir / "metrics.jsonl") if "eval/top1" in r]
    (ref_eval,) = [r for r in read_jsonl(reference / "metrics.jsonl") if "eval/top1" in r]
    assert len(evals) == 1 and evals[0]["step"] == STEPS and evals[0]["eval/count"] == 360
    assert abs(evals[0]["eval/top1"] - ref_eval["eval/top1"]) <= 1 / 360

    # Both processes wrote their shards into the same checkpoints, during the run.
    assert (
        checkpoint_steps(workdir)
        == checkpoint_steps(reference)
        == [STEPS - 2 * EVERY, STEPS - EVERY, STEPS]
    )
    for step in checkpoint_steps(workdir):
        assert os.path.isdir(workdir / "checkpoints" / str(step) / "state" / "ocdbt.process_1")
        assert_trees_close(
            checkpoint_state(workdir, step), checkpoint_state(reference, step), atol=1e-4
        )


def test_kill_9_a_torn_checkpoint_and_sigterm_then_resume_exactly(reference, launch, tmp_path):
    """One workdir through three processes: killed, then stopped by SIGTERM, then finished."""
    workdir = tmp_path / "run"

    # 1. kill -9 once a checkpoint beyond the first is on disk.
    proc = launch(workdir, tmp_path / "log1.txt")
    wait_for_checkpoint(proc, workdir, 2 * EVERY)
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not (workdir / "weights").exists()
    steps = checkpoint_steps(workdir)
    assert len(steps) >= 2 and steps[-1] < STEPS, steps

    # 2. The newest checkpoint loses the second half of every array file (a torn write): the
    # restart skips it, resumes from the one before, and this time is stopped by SIGTERM.
    latest = workdir / "checkpoints" / str(steps[-1])
    for path in glob.glob(str(latest / "state" / "ocdbt.process_0" / "d" / "*")):
        os.truncate(path, os.path.getsize(path) // 2)
    proc = launch(workdir, tmp_path / "log2.txt")
    wait_for_output(proc, "Resumed from step")  # The torn checkpoint is deleted by then.
    wait_for_checkpoint(proc, workdir, steps[-1])  # Redone: training is under way.
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert f"Skipping unreadable checkpoint at step {steps[-1]}" in out
    assert f"Resumed from step {steps[-2]} " in out
    assert proc.returncode == 0, tail(proc)
    saved = re.search(r"SIGTERM: saved step (\d+), exiting", out)
    assert saved, tail(proc)
    stopped = int(saved.group(1))
    assert steps[-1] <= stopped < STEPS and stopped in checkpoint_steps(workdir)
    assert not (workdir / "weights").exists()

    # 3. The rerun finishes: same losses (the redone steps logged twice) and bitwise the same
    # parameters as the uninterrupted run.
    out = run_ok(launch(workdir, tmp_path / "log3.txt"))
    assert f"Resumed from step {stopped} " in out
    losses, want = train_losses(workdir), train_losses(reference)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert any(len(v) > 1 for v in losses.values())
    for step, values in losses.items():
        assert values == [want[step][0]] * len(values), f"loss at step {step}"
    assert_trees_equal(final_params(workdir), final_params(reference))
    assert checkpoint_steps(workdir) == checkpoint_steps(reference)


def test_non_finite_loss_stops_with_one_line_and_keeps_the_good_checkpoints(launch, tmp_path):
    workdir = tmp_path / "run"
    proc = launch(
        workdir,
        tmp_path / "log.txt",
        "--config.optim.lr=1e30",  # AdamW steps of ~1e28: the second forward overflows.
        "--config.checkpoint_every_steps=1",
        tf_first=False,  # The entry point exactly as users run it.
    )
    out = finish(proc)
    assert proc.returncode == 1, tail(proc)
    error = re.search(r"^error: Non-finite loss or gradients at step (\d+) .*$", out, re.M)
    assert error, tail(proc)
    assert "Traceback" not in out and "rerun" in error.group(0)
    bad = int(error.group(1))
    assert not (workdir / "weights").exists()

    # Checkpoints stop at the last good step, and it restores to finite values.
    steps = checkpoint_steps(workdir)
    assert steps and steps[-1] == bad - 1, (steps, bad)
    state = checkpoint_state(workdir, steps[-1])
    assert int(state["step"]) == bad - 1 and int(state["nan_step"]) == -1
    floats = [np.asarray(x) for x in jax.tree.leaves(state) if x.dtype.kind == "f"]
    assert floats and all(np.isfinite(x).all() for x in floats)
    logged = train_losses(workdir)
    assert max(logged) < bad and all(np.isfinite(v).all() for v in logged.values())


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory):
    return save_random_teacher(str(tmp_path_factory.mktemp("teacher") / "weights"))


def test_hard_distillation_on_two_processes_equals_one_process(random_teacher, launch, tmp_path):
    """Both processes load the teacher from disk and place it on the global mesh."""
    steps = 2 * EVERY
    flags = (
        f"--config.num_epochs={steps / 44}",
        "--config.distillation.kind=hard",
        "--config.teacher.name=cnn_small",
        f"--config.teacher.checkpoint={random_teacher}",
    )
    one = tmp_path / "one"
    run_ok(launch(one, tmp_path / "one.txt", *flags))
    two = tmp_path / "two"
    run_two_processes(launch, two, tmp_path / "two", *flags)

    records = {w: read_jsonl(w / "metrics.jsonl") for w in (one, two)}
    losses = {w: [r["train/loss"] for r in rs if "train/loss" in r] for w, rs in records.items()}
    distill = {
        w: [r["train/loss_distillation"] for r in rs if "train/loss" in r]
        for w, rs in records.items()
    }
    assert len(losses[one]) == steps and all(v > 0 for v in distill[one])
    np.testing.assert_allclose(losses[two], losses[one], rtol=1e-4)
    np.testing.assert_allclose(distill[two], distill[one], rtol=1e-4)
    assert_trees_close(final_params(two), final_params(one), atol=1e-4)
    (eval_one,), (eval_two,) = ([r for r in rs if "eval/top1" in r] for rs in records.values())
    for key in ("top1", "teacher_top1", "agreement"):
        assert abs(eval_two[f"eval/{key}"] - eval_one[f"eval/{key}"]) <= 1 / 360, key
