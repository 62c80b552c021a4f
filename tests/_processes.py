"""Helpers for tests that run `python -m deit_jax.main` as real processes.

`TF_FIRST_MAIN` runs the entry point with TensorFlow imported first, which spares
deit_jax/_compat.py's precautionary torchvision import (~5 s of each process's imports);
`cpu_env` gives a process N CPU devices and the test session's JAX compilation cache
(tests/conftest.py; each run would otherwise spend ~20 s recompiling the same steps).
"""

import os
import socket
import subprocess

import pytest
from conftest import JAX_CACHE, JAX_CACHE_MAX_BYTES

TF_FIRST_MAIN = "import tensorflow\nfrom deit_jax.main import run\nrun()"
TIMEOUT = 300  # seconds, for any one process


def cpu_env(devices: int, gloo: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_NUM_CPU_DEVICES=str(devices),
        JAX_COMPILATION_CACHE_DIR=JAX_CACHE,
        JAX_COMPILATION_CACHE_MAX_SIZE=str(JAX_CACHE_MAX_BYTES),  # turns on the cache's file lock
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    if gloo:
        env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    return env


def finish(proc, timeout=TIMEOUT) -> str:
    """Waits for `proc` (killing it after `timeout` s); returns its output (`proc.log`)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{proc.args} timed out after {timeout} s:\n{tail(proc)}")
    with open(proc.log) as f:
        return f.read()


def run_ok(proc) -> str:
    out = finish(proc)
    assert proc.returncode == 0, f"exit code {proc.returncode}:\n{tail(proc)}"
    return out


def tail(proc, lines=40) -> str:
    with open(proc.log) as f:
        return "".join(f.readlines()[-lines:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
