"""Train or evaluate DeiT: `python -m deit_jax.main --config configs/NAME.py --workdir DIR`.

Any config value can be overridden on the command line, e.g.
`--config.batch_size=256 --config.distillation.kind=hard`. Running the same command again
resumes from the latest checkpoint in DIR. `--config.mode=eval` evaluates the latest checkpoint
(or `--config.init_from` weights). `--config.mode=teacher_cache` writes the teacher's outputs over
the run's exact batches into DIR, for training runs with `--config.teacher.cache=DIR`
(deit_jax/teacher/cache.py).

Multi-host (TPU pods, GPU clusters): pass `--distributed` to call `jax.distributed.initialize()`,
which reads the cluster environment (TPU metadata, SLURM, Open MPI, ...) or the explicit
`--coordinator_address`, `--num_processes` and `--process_id` flags.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

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
    valid = _flatten_keys(_load_config_file(spec).to_dict())
    for arg in argv:
        if arg.startswith("--config.") and "=" in arg:
            key = arg[len("--config.") :].split("=", 1)[0]
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
                hint = (
                    f" Did you mean {', '.join('--config.' + c for c in close)}?" if close else ""
                )
                sys.exit(f"error: unknown config key --config.{key}.{hint} See deit_jax/config.py.")


def _flatten_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        keys.append(prefix + k)
        if isinstance(v, dict):
            keys += _flatten_keys(v, f"{prefix}{k}.")
    return keys


def main(argv: list[str]) -> None:
    del argv
    if _DISTRIBUTED.value:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    logging.basicConfig(
        level=logging.INFO if jax.process_index() == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every file it writes
    config, workdir = _CONFIG.value, _WORKDIR.value
    if config is None or workdir is None:
        sys.exit("error: --config and --workdir are required (see --help).")

    from deit_jax import train

    try:
        if config.mode == "train":
            train.train_and_evaluate(config, workdir)
        elif config.mode == "eval":
            train.evaluate(config, workdir)
        elif config.mode == "teacher_cache":
            from deit_jax.teacher import cache

            cache.write_cache(config, workdir)
        elif config.mode == "quickstart":
            from deit_jax import quickstart

            quickstart.run(config, workdir)
        else:
            sys.exit(
                "error: config.mode must be 'train', 'eval', 'teacher_cache' or 'quickstart', got "
                f"{config.mode!r}."
            )
    except train.Preempted:
        sys.exit(0)  # a clean stop: the checkpoint is written, the same command resumes
    except (train.NonFiniteLossError, ValueError, FileNotFoundError) as e:
        # Diverged training and config/data/checkpoint errors: their messages say what to change,
        # and a traceback would bury them.
        sys.exit(f"error: {e}")


def run() -> None:
    _check_override_keys(sys.argv[1:])
    app.run(main)


if __name__ == "__main__":
    run()
