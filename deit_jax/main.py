"""Train or evaluate a run: `python -m deit_jax.main --config configs/NAME.py --workdir DIR`.

A run is one of deit_jax's tasks (`deit_jax/config/tasks.py`), given by its data: a classifier
(DeiT, DeiT III, any registry model; labelled or label-free images; any teacher) or a CLIP
student (image-caption data, `captions:/root`). Any config value can be overridden on the
command line, e.g. `--config.batch_size=256 --config.distillation.kind=hard`. Running the same
command again resumes from the latest checkpoint in DIR. `--config.mode=eval` evaluates the
latest checkpoint (or `--config.init_from` weights) of either task and writes its results
table. `--config.mode=teacher_cache` writes the teacher's outputs over the run's exact batches
into DIR, for training runs with `--config.teacher.cache=DIR` (deit_jax/teacher/cache/).
`--config.mode=quickstart` and `clip_quickstart` run the offline
experiments of configs/quickstart.py and configs/clip_quickstart.py. `--config.mode=plan
--config.plan.target=tpu:v5e:2x4` compiles the run for that TPU slice (or `gpu:h100:8`) on this
host and prints what it will cost there (deit_jax/plan/).

Multi-host (TPU pods, GPU clusters): pass `--distributed` to call `jax.distributed.initialize()`,
which reads the cluster environment (TPU metadata, SLURM, Open MPI, ...) or the explicit
`--coordinator_address`, `--num_processes` and `--process_id` flags.

The config is checked as a whole before anything slow starts (`deit_jax/config/rules.py`). Exit
codes: 0 finished, or stopped by SIGTERM after saving a checkpoint (rerun to resume); 2 a bad
config or command line (one `error: config.<key>=<value>: ...` line per problem); 1 a data,
checkpoint or weights problem or diverged training (one `error: ...` line), or a bug (its
traceback); 143 SIGTERM during start-up, before anything was saved.
"""

from __future__ import annotations

import glob
import os
import signal
import sys

_STARTUP = {"workdir": None, "defaults": {}}


def _stop_on_sigterm(signum, frame) -> None:
    """SIGTERM before training's own handler is installed (imports, data preparation, model
    building, compilation) or after it is removed: stop at once, saying what is on disk."""
    workdir = _STARTUP["workdir"]
    # A run's checkpoints, or the quickstart's finished stages' (<workdir>/seed<S>/<stage>/).
    saved = workdir and glob.glob(os.path.join(workdir, "**", "checkpoints", "*"), recursive=True)
    if saved:
        line = f"stopped: SIGTERM; what was saved in {workdir} is kept, rerun to resume."
    else:
        line = (
            "stopped: SIGTERM during start-up, before the first training step: nothing was "
            "saved yet; rerun the same command to start."
        )
    sys.stdout.flush()
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    os._exit(128 + signal.SIGTERM)  # The shell's code for "terminated by SIGTERM".


if __name__ == "__main__":  # As early as possible: the imports below take seconds.
    signal.signal(signal.SIGTERM, _stop_on_sigterm)

import difflib  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from deit_jax.config import rules  # noqa: E402
from deit_jax.config.defaults import EXPERIMENTS  # noqa: E402
from deit_jax.errors import ConfigError, Preempted, UserError  # noqa: E402

log = logging.getLogger("deit_jax.main")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/quickstart.py.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host runs)."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def _load_config_file(spec: str):
    """`path.py[:arg]` -> its `get_config([arg])`, as ml_collections' config_flags loads it."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_deit_jax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _check_override_keys(argv: list[str]) -> None:
    """Fails on unknown `--config.a.b=...` keys with the closest valid names (before absl's
    less readable traceback)."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None and "--config" in argv[:-1]:
        spec = argv[argv.index("--config") + 1]
    if spec is None or not os.path.isfile(spec.partition(":")[0]):
        return  # absl reports the missing flag or file
    valid = _STARTUP["defaults"] = _flatten_keys(_load_config_file(spec).to_dict())
    for arg in argv:
        if arg.startswith("--config.") and "=" in arg:
            key = arg[len("--config.") :].split("=", 1)[0]
            if key not in valid:
                close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
                hint = (
                    f" Did you mean {', '.join('--config.' + c for c in close)}?" if close else ""
                )
                print(
                    f"error: unknown config key --config.{key}.{hint} See "
                    "deit_jax/config/defaults.py.",
                    file=sys.stderr,
                )
                sys.exit(2)


def _flatten_keys(tree: dict, prefix: str = "") -> dict[str, object]:
    """Every dotted key of a nested dict, with its value."""
    keys = {}
    for k, v in tree.items():
        keys[prefix + k] = v
        if isinstance(v, dict):
            keys.update(_flatten_keys(v, f"{prefix}{k}."))
    return keys


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a value that does not parse as its key's type reported as one
    `error: config.<key>=<value>: ...` line (exit code 2) like every other config problem."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        match = re.match(r"flag --config\.([\w.]+)=(.*?): (.*)", str(e), re.S)
        if match:
            key, value, why = match.groups()
            default = _STARTUP["defaults"].get(key)
            wanted = f"of type {type(default).__name__}" if default is not None else "of its type"
            _refuse([f"config.{key}={value!r}: must be {wanted} (it does not parse: {why}); see "
                     "deit_jax/config/defaults.py"])  # fmt: skip
        print(f"error: {e} (see --help)", file=sys.stderr)
        sys.exit(2)


def _refuse(problems: list[str]) -> None:
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    sys.exit(2)


def _setup_logging() -> None:
    """deit_jax's INFO lines (process 0 only); libraries' warnings, never their INFO chatter
    (backend probing, Orbax's every file, tfds)."""
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("deit_jax").setLevel(logging.INFO)


def main(argv: list[str]) -> None:
    del argv
    _setup_logging()
    if _DISTRIBUTED.value:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    if jax.process_index() != 0:
        logging.getLogger("deit_jax").setLevel(logging.WARNING)
    config, workdir = _CONFIG.value, _WORKDIR.value
    if config is None or workdir is None:
        print("error: --config and --workdir are required (see --help).", file=sys.stderr)
        sys.exit(2)
    _STARTUP["workdir"] = os.path.abspath(workdir)
    try:
        # Before anything slow (TensorFlow, data sets, models, compilation).
        # The quickstart trains the teacher its distillation stages use: none is given. A plan
        # is checked for its target's devices, and reads none of the run's files.
        planning = config.mode == "plan"
        rules.check_config(
            config,
            num_devices=_planned_devices(config) if planning else jax.device_count(),
            num_processes=1 if planning else jax.process_count(),
            teacher_from_run=config.mode in EXPERIMENTS,
            planning=planning,
        )
    except ConfigError as e:
        _refuse(e.problems)
    log.info(
        "%s %s on %s (%d devices, %d processes) in %s: preparing data and compiling.",
        config.mode, config.model_name, config.data.name, jax.device_count(),
        jax.process_count(), _STARTUP["workdir"],
    )  # fmt: skip

    try:
        _job(config.mode)(config, workdir)
    except Preempted:
        sys.exit(0)  # a clean stop: the checkpoint is written, the same command resumes
    except ConfigError as e:
        _refuse(e.problems)
    except UserError as e:
        # Config, data and checkpoint problems and diverged training: their messages say what to
        # change, and a traceback would bury them. Any other exception is a bug: traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


# What each `config.mode` runs: imported once the config is checked (the check must not wait
# for TensorFlow and the models).
JOBS = {
    "train": ("deit_jax.train.loop", "train_and_evaluate"),
    "eval": ("deit_jax.train.evaluation", "evaluate"),
    "teacher_cache": ("deit_jax.teacher.cache.write", "write_cache"),
    "quickstart": ("deit_jax.experiments.quickstart", "run"),
    "clip_quickstart": ("deit_jax.experiments.clip_quickstart", "run"),
    "clip_recipes": ("deit_jax.experiments.clip_recipes", "run"),
    "plan": ("deit_jax.plan.run", "plan"),
}


def _planned_devices(config) -> int:
    """The device count of `config.plan.target` (a one-line ConfigError when it is no target)."""
    from deit_jax.plan.targets import parse_target

    return parse_target(config.plan.target).num_devices


def _job(mode: str):
    module, name = JOBS[mode]
    return getattr(importlib.import_module(module), name)


def run() -> None:
    """The command line entry point (also for `python -c "...; from deit_jax.main import run;
    run()"`, which installs the start-up SIGTERM handler here)."""
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    _check_override_keys(sys.argv[1:])
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
