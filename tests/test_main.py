"""The entry point as users run it (`python -m deit_jax.main`, real processes): bad config values
are refused in one line each before any work, bugs keep their traceback, a plain run prints
nothing but deit_jax's own lines, and SIGTERM during start-up stops cleanly.

The bad-value processes run four at a time (each spends a second or two importing JAX and
Flax; none imports TensorFlow or builds a model).
"""

import os
import re
import signal
import subprocess
import sys
import time
from multiprocessing.pool import ThreadPool

import pytest

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_train_config.py")
TIMEOUT = 300  # seconds, for any one process
DEVICES = 4  # CPU devices of every process here
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING) deit_jax[.\w]*: ")

# (key named in the error, flags): negative, zero, out of range, wrong type, impossible
# combinations. The tiny config has batch 32, patch 4, image 16, one process of 4 devices.
BAD_VALUES = [
    ("batch_size", ["--config.batch_size=-4"]),
    ("batch_size", ["--config.batch_size=0"]),
    ("batch_size", ["--config.batch_size=1.5"]),
    ("batch_size", ["--config.batch_size=30"]),  # not a multiple of the 4 devices
    ("eval_batch_size", ["--config.eval_batch_size=0"]),
    ("log_every_steps", ["--config.log_every_steps=0"]),
    ("num_epochs", ["--config.num_epochs=0"]),
    ("mode", ["--config.mode=trian"]),
    ("data.img_size", ["--config.data.img_size=0"]),
    ("data.img_size", ["--config.data.img_size=15"]),  # not a multiple of the patch size 4
    ("data.crop_pct", ["--config.data.crop_pct=0"]),
    ("data.cache", ["--config.data.cache=maybe"]),
    ("data.num_shares", ["--config.data.num_shares=3"]),  # does not divide batch 32
    ("augment.reprob", ["--config.augment.reprob=2"]),
    ("augment.scale", ["--config.augment.scale=(0.9, 0.1)"]),
    ("mixup.mixup_alpha", ["--config.mixup.mixup_alpha=-1"]),
    ("mixup.label_smoothing", ["--config.mixup.label_smoothing=1.5"]),
    ("model.drop_path_rate", ["--config.model.drop_path_rate=1.5"]),
    ("model_name", ["--config.model_name=deit_nope"]),
    ("optim.ema_decay", ["--config.optim.ema_decay=1.5"]),
    ("mesh.fsdp", ["--config.mesh.fsdp=3"]),  # does not divide 4 devices
    ("mesh.data", ["--config.mesh.data=3"]),  # 3 x 1 != 4 devices
    ("distillation.alpha", ["--config.distillation.alpha=2"]),
    (
        "teacher.checkpoint",
        ["--config.distillation.kind=hard", "--config.teacher.checkpoint=/no/such/teacher"],
    ),
]


def env(**changes) -> dict[str, str]:
    e = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(DEVICES))
    e.update(changes)
    return {k: v for k, v in e.items() if v is not None}


def command(workdir, *flags, data_dir="") -> list[str]:
    cmd = [sys.executable, "-m", "deit_jax.main", f"--config={CONFIG}", f"--workdir={workdir}"]
    return cmd + ([f"--config.data.data_dir={data_dir}"] if data_dir else []) + list(flags)


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", env())
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def test_bad_config_values_are_refused_in_one_line_before_any_work(tmp_path, data_dir):
    assert len(BAD_VALUES) >= 20

    def refuse(case):
        i, (key, flags) = case
        workdir = tmp_path / f"run{i}"
        return key, flags, workdir, run(command(workdir, *flags, data_dir=data_dir))

    with ThreadPool(4) as pool:
        results = pool.map(refuse, enumerate(BAD_VALUES))
    for key, flags, workdir, result in results:
        lines = result.stderr.strip().splitlines()
        where = f"{flags}: exit {result.returncode}\n{result.stderr[-3000:]}"
        assert result.returncode == 2, where
        assert lines and lines[-1].startswith(f"error: config.{key}="), where
        assert "Traceback" not in result.stderr + result.stdout, where
        assert not workdir.exists(), where  # Nothing written
    assert os.listdir(data_dir) == []  # No data set was prepared for any of them.


def test_all_problems_are_reported_at_once(tmp_path):
    flags = ["--config.batch_size=0", "--config.augment.reprob=2", "--config.optim.b1=1"]
    result = run(command(tmp_path / "w", *flags))
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    keys = [line.split("=", 1)[0] for line in errors]
    assert keys == ["error: config.batch_size", "error: config.augment.reprob"] + [
        "error: config.optim.b1"
    ]


def test_an_internal_error_keeps_its_traceback(tmp_path, data_dir):
    """A ValueError that is not one of deit_jax's user-facing errors is a bug: main must not turn
    it into one line (it used to turn every ValueError into one)."""
    bug = (
        "import deit_jax.data\n"
        "def dataset_info(config):\n"
        "    raise ValueError('an internal bug')\n"
        "deit_jax.data.dataset_info = dataset_info\n"
        "from deit_jax.main import run\n"
        "run()\n"
    )
    cmd = [sys.executable, "-c", bug] + command(tmp_path / "w", data_dir=data_dir)[3:]
    result = run(cmd)
    assert result.returncode == 1, result.stderr
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "ValueError: an internal bug"
    assert "error: an internal bug" not in result.stderr


def test_a_plain_cpu_run_prints_only_deit_jax_lines(tmp_path):
    """No JAX backend probing (TPU, CUDA), TensorFlow start-up lines or tfds preparation output,
    also when the data set is prepared during the run: every line is deit_jax's own. The
    environment has none of the variables deit_jax sets (tests import deit_jax, which sets them in
    this process): on a CPU with AVX-512 TensorFlow would print its oneDNN lines."""
    plain = env(JAX_PLATFORMS=None, TF_CPP_MIN_LOG_LEVEL=None, TF_ENABLE_ONEDNN_OPTS=None)
    flags = ["--config.num_epochs=0.05"]  # 2 steps
    result = subprocess.run(
        command(tmp_path / "w", *flags, data_dir=str(tmp_path / "tfds")),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=TIMEOUT,
        env=plain,
    )
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert lines and LOG_LINE.match(lines[0]), result.stdout
    assert any("Preparing digits" in line for line in lines), result.stdout
    others = [line for line in lines if not (LOG_LINE.match(line) or line.startswith("eval @"))]
    assert others == [], result.stdout


def sigterm_handled(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        caught = next(line for line in f if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)))


def start(cmd, log):
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env())


def wait_until(proc, ready, what):
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"exited ({proc.returncode}) or timed out before {what}")
        time.sleep(0.01)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
def test_sigterm_during_start_up_exits_cleanly(tmp_path):
    """SIGTERM while importing (as soon as the handler is in place), then while preparing the
    data set and building (right after the config is accepted)."""
    log_text = lambda log: log.read_text() if log.exists() else ""
    phases = {
        "imports": lambda proc, log: sigterm_handled(proc.pid),
        "data": lambda proc, log: "preparing data and compiling" in log_text(log),
    }
    for phase, ready in phases.items():
        workdir, log = tmp_path / phase, tmp_path / f"{phase}.txt"
        data_dir = str(tmp_path / f"tfds_{phase}")
        proc = start(command(workdir, data_dir=data_dir), log)
        try:
            wait_until(proc, lambda p=proc, g=log, r=ready: r(p, g), phase)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
        out = log.read_text()
        assert proc.returncode == 128 + signal.SIGTERM, (phase, out)
        assert out.strip().splitlines()[-1].startswith("stopped: SIGTERM during start-up"), out
        assert "nothing was saved yet" in out and "Traceback" not in out, (phase, out)
        assert not (workdir / "checkpoints").exists(), phase


def test_importing_the_input_pipeline_as_a_library_prints_nothing():
    """TensorFlow's start-up lines are turned off where deit_jax imports it, not only in main:
    a user's script that imports the input pipeline prints no line either."""
    plain = env(JAX_PLATFORMS=None, TF_CPP_MIN_LOG_LEVEL=None, TF_ENABLE_ONEDNN_OPTS=None)
    script = "import deit_jax.data.pipeline, tensorflow as tf; print(tf.reduce_sum([1, 2]).numpy())"
    result = run([sys.executable, "-c", script], env=plain)
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("3\n", "")
