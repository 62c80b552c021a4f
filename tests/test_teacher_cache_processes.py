"""The teacher cache as real `python -m deit_jax.main` processes: kill -9, two writers, resume.

The cache is written for the tiny config of tests/_train_config.py with its data read as two
shares (`data.num_shares=2`, so one process feeding both shares and two processes feeding one
each produce the same batches), 20 epochs of 44 steps in chunks of 8 steps, by a random
`cnn_small` teacher. The uninterrupted one-process writer is the reference.

Tolerances: a writer resumed after kill -9 runs the same computation on the same device, so its
cache equals the reference exactly. Two processes of one device each compute the teacher on half
batches: the stored float16 log-probabilities agree to 2e-3 (one float16 step at the values'
magnitudes, for a possible rounding flip) and the class indices exactly. A cached training run
resumed after kill -9 equals the uninterrupted cached run exactly, as in test_train_processes.py.
"""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from _processes import TF_FIRST_MAIN, TIMEOUT, cpu_env, free_port, run_ok, tail
from _train_config import save_random_teacher, tiny_config

from deit_jax.data import catalog
from deit_jax.teacher import cache
from deit_jax.train.metrics import read_jsonl
from deit_jax.weights.directory import load_variables

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_train_config.py")
EPOCHS, CHUNK = 20, 8  # 880 steps in 120 chunks per data share (6 per epoch)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    catalog.get_source(tiny_config(path).data)
    return path


@pytest.fixture(scope="module")
def launch(data_dir, tmp_path_factory):
    """`launch(workdir, *flags, devices=1, process=None)` starts deit_jax.main on the cache config
    (`process=(id, count, port)` for a multi-process run)."""
    teacher = save_random_teacher(str(tmp_path_factory.mktemp("teacher") / "weights"))
    started = []

    def start(workdir, *flags, devices=1, process=None, program=TF_FIRST_MAIN):
        env = cpu_env(devices, gloo=True)
        cmd = [
            sys.executable,
            "-c",
            program,
            f"--config={CONFIG}",
            f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}",
            "--config.data.num_shares=2",
            "--config.distillation.kind=hard",
            "--config.teacher.name=cnn_small",
            f"--config.teacher.checkpoint={teacher}",
            f"--config.teacher.cache_chunk_steps={CHUNK}",
            *flags,
        ]
        if process is not None:
            index, count, port = process
            cmd += [
                "--distributed",
                f"--coordinator_address=127.0.0.1:{port}",
                f"--num_processes={count}",
                f"--process_id={index}",
            ]
        log = f"{workdir}.log" if process is None else f"{workdir}.{process[0]}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        proc.log = log
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def write_flags(*extra):
    return ("--config.mode=teacher_cache", f"--config.num_epochs={EPOCHS}", *extra)


def chunks(path) -> int:
    """Finished chunks of the values array (a chunk file appears only when written whole)."""
    root = os.path.join(path, "values", "c")
    return sum(f.isdigit() for _, _, files in os.walk(root) for f in files)


def wait_until(proc, condition, what, timeout=TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            pytest.fail(f"exited ({proc.returncode}) before {what}:\n{tail(proc)}")
        time.sleep(0.01)
    pytest.fail(f"no {what} after {timeout} s:\n{tail(proc)}")


def checkpoint_steps(workdir) -> list[int]:
    """Finished checkpoints (Orbax renames a step's tmp directory to its number when done)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def read_cache(path):
    return cache.CacheStore(str(path)).read_all()


@pytest.fixture(scope="module")
def reference(launch, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("reference") / "cache")
    out = run_ok(launch(path, *write_flags()))
    assert "880 steps of 32 images to write" in out
    assert chunks(path) == EPOCHS * 6 * 2  # per epoch and share: 5 chunks of 8 steps, 1 of 4
    return path


def test_kill_9_while_writing_then_rerun_completes_the_same_cache(reference, launch, tmp_path):
    path = str(tmp_path / "cache")
    proc = launch(path, *write_flags())
    wait_until(proc, lambda: chunks(path) >= 20, "20 written chunks")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert chunks(path) < chunks(reference), "the writer finished before it was killed"
    out = run_ok(launch(path, *write_flags()))
    assert "already written" in out
    stored, expected = read_cache(path), read_cache(reference)
    for name in expected:
        np.testing.assert_array_equal(stored[name], expected[name])


# The entry point with the writer's DEBUG lines on in every process (main.py leaves process 1
# only WARNING lines): one line per chunk a process writes, naming the chunk.
CHUNK_LOG_MAIN = TF_FIRST_MAIN.replace(
    "\n", "\nimport logging\nlogging.getLogger('deit_jax.teacher.cache').setLevel('DEBUG')\n", 1
)


def test_two_processes_write_the_cache_one_process_writes(reference, launch, tmp_path):
    path, port = str(tmp_path / "cache"), free_port()
    procs = [
        launch(path, *write_flags(), process=(i, 2, port), program=CHUNK_LOG_MAIN) for i in range(2)
    ]
    outputs = [run_ok(proc) for proc in procs]
    # Each process wrote its own data share's chunks, each once, and no other chunk.
    for i, out in enumerate(outputs):
        written = re.findall(r"process (\d+) writes chunk c/(\d+)/(\d+)/(\d+)/0$", out, re.M)
        assert {p for p, *_ in written} == {str(i)}, tail(procs[i])
        keys = [tuple(map(int, key)) for _, *key in written]
        assert sorted(keys) == [(e, c, i) for e in range(EPOCHS) for c in range(6)]
    stored, expected = read_cache(path), read_cache(reference)
    np.testing.assert_array_equal(stored["indices"], expected["indices"])
    np.testing.assert_allclose(
        stored["values"].astype(np.float32), expected["values"].astype(np.float32), atol=2e-3
    )


def train_losses(workdir) -> dict[int, list[float]]:
    """Step -> every loss logged for it (a step redone after a restart is logged again)."""
    result = {}
    path = os.path.join(workdir, "metrics.jsonl")
    for r in read_jsonl(path) if os.path.exists(path) else []:
        if "train/loss" in r:
            result.setdefault(r["step"], []).append(r["train/loss"])
    return result


def test_kill_9_during_cached_training_resumes_exactly(reference, launch, tmp_path):
    flags = (
        f"--config.teacher.cache={reference}",
        "--config.teacher.checkpoint=",
        f"--config.num_epochs={24 / 44}",
        "--config.checkpoint_every_steps=8",
    )
    run_ok(launch(str(tmp_path / "whole"), *flags))
    workdir = str(tmp_path / "resumed")
    proc = launch(workdir, *flags)

    def past_a_checkpoint() -> bool:  # a step after the newest checkpoint (>= 8) is logged
        saved = checkpoint_steps(workdir)
        try:
            return bool(saved) and max(train_losses(workdir), default=0) > saved[-1]
        except ValueError:  # a line being written
            return False

    wait_until(proc, past_a_checkpoint, "a logged step after checkpoint 8")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(workdir, "weights")), "finished before the kill"
    saved, logged = checkpoint_steps(workdir)[-1], max(train_losses(workdir))
    assert 8 <= saved < logged < 24, (saved, logged)
    out = run_ok(launch(workdir, *flags))
    assert f"Resumed from step {saved} " in out

    # Steps up to the checkpoint are logged once, those after it until the kill twice (redone),
    # the rest once; every logged loss is the uninterrupted run's.
    whole, resumed = train_losses(tmp_path / "whole"), train_losses(workdir)
    assert {s: len(v) for s, v in whole.items()} == {s: 1 for s in range(1, 25)}
    assert {s: len(v) for s, v in resumed.items()} == {
        s: 2 if saved < s <= logged else 1 for s in range(1, 25)
    }
    for step, values in resumed.items():
        assert values == whole[step] * len(values), step
    a = load_variables(os.path.join(tmp_path / "whole", "weights"))[0]
    b = load_variables(os.path.join(workdir, "weights"))[0]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
