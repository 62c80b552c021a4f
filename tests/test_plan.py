"""`--config.mode=plan`: a run compiled for a TPU slice on this CPU host (libtpu's compile-only
devices), from shapes alone. Real compiles throughout: XLA's TPU compiler, its memory and cost
analyses. Tolerance: FLOPs against the step's own matmul count to 2% (XLA also counts the
elementwise work: normalisation, softmax, the optimiser)."""

import json
import math
import os
import subprocess
import sys

import jax
import pytest
from _flops import matmul_flops
from _processes import cpu_env
from _train_config import tiny_config

from deit_jax.config import tasks
from deit_jax.errors import ConfigError

pytest.importorskip("libtpu", reason="the plan compiles for TPUs with libtpu (the test extra)")

from deit_jax.plan import run as plan_run  # noqa: E402
from deit_jax.plan.targets import parse_target  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = "tpu:v5e:2x2"


def _config(**changes):
    """A 2-block 256-wide DeiT at 32 px (4 px patches): matmuls dominate its step."""
    config = tiny_config(
        "/nonexistent/tfds",
        **{"model.embed_dim": 256, "model.num_heads": 4, "data.img_size": 32, **changes},
    )
    config.mode = "plan"
    config.plan.target = TARGET
    config.plan.input_seconds = 0
    return config


def test_the_plans_flops_are_the_steps_matmuls_and_a_live_teachers_share_its_forwards():
    config = _config(**{
        "distillation.kind": "soft", "teacher.name": "deit_tiny_patch16_224",
        "teacher.checkpoint": "/nonexistent/teacher", "teacher.img_size": 32,
    })  # fmt: skip
    planner = plan_run.Planner(config, "", parse_target(TARGET))
    batch, devices = 32, planner.target.num_devices
    train = planner.train_report(batch)
    teacher = planner.teacher_report(batch)

    task = planner.task
    tx, schedule, state, _ = planner.state(config, batch)
    with planner._scope():
        step = task.train_step(tx, schedule)
        shapes = task.batch_shapes(batch)
        counted = matmul_flops(jax.make_jaxpr(step)(state, task.teacher_variables, shapes).jaxpr)
        forward = plan_run.teacher_forward(task.teacher)
        in_teacher = matmul_flops(jax.make_jaxpr(forward)(task.teacher_variables, shapes).jaxpr)
    assert train["flops_per_step_per_device"] * devices == pytest.approx(counted, rel=0.02)
    share = teacher["flops_per_step_per_device"] / train["flops_per_step_per_device"]
    assert share == pytest.approx(in_teacher / counted, rel=0.02)
    assert 0.01 < share < 1  # a 12-block teacher of 5 tokens beside a 2-block one of 65


def test_a_batch_that_does_not_fit_and_the_largest_that_does(tmp_path):
    config = tiny_config("/nonexistent/tfds", batch_size=1 << 20)  # 32 wide, 16 px
    config.mode, config.plan.target, config.plan.input_seconds = "plan", TARGET, 0
    result = plan_run.plan(config, str(tmp_path))
    assert result["fits"] is False and "RESOURCE_EXHAUSTED" in result["error"]
    largest = result["largest_global_batch_that_fits"]
    assert largest % 4 == 0 and 0 < largest < 1 << 20
    planner = plan_run.Planner(config, "", parse_target(TARGET))
    chip = planner.target.chip
    assert plan_run.fits(planner.train_report(largest), chip)
    assert not plan_run.fits(planner.train_report(2 * largest), chip)
    # Each way to fit was compiled: a smaller step with accumulation fits.
    ways = {w["change"].split(" (")[0]: w["fits"] for w in result["to_fit"]}
    assert not ways["--config.batch_size=524288 --config.optim.grad_accum_steps=2"]
    assert ways["--config.batch_size=262144 --config.optim.grad_accum_steps=4"]
    assert "--config.batch_size=131072 --config.optim.grad_accum_steps=8" not in ways
    assert json.loads((tmp_path / "plan.json").read_text())["largest_global_batch_that_fits"] == (
        largest
    )


def test_a_plan_names_files_that_do_not_exist_and_still_plans(tmp_path):
    """As a user runs it: a live teacher checkpoint, a data dir and, in a second plan, a teacher
    cache that do not exist; neither plan creates them, and both write their plan."""
    missing = tmp_path / "missing"
    common = [
        sys.executable, "-m", "deit_jax.main", "--config=tests/_train_config.py",
        "--config.mode=plan", f"--config.plan.target={TARGET}",
        f"--config.data.data_dir={missing / 'tfds'}", "--config.distillation.kind=soft",
        "--config.teacher.name=cnn_small",
    ]  # fmt: skip
    runs = {
        "live": [
            f"--config.teacher.checkpoint={missing / 'teacher'}",
            "--config.plan.input_seconds=2",
        ],
        "cached": [f"--config.teacher.cache={missing / 'cache'}", "--config.plan.input_seconds=0"],
    }
    for name, extra in runs.items():
        cmd = [*common, f"--workdir={tmp_path / name}", *extra]
        result = subprocess.run(
            cmd, cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "| fits | yes |" in result.stdout
        plan = json.loads((tmp_path / name / "plan.json").read_text())
        for key in (
            "target", "devices", "global_batch", "fits", "device_memory_bytes",
            "bytes_per_device", "flops_per_step_per_device", "step_seconds_bound",
            "images_per_second_bound", "largest_global_batch_that_fits", "compile_seconds",
            "teacher_flops_fraction", "run_hours_bound", "run_hours_at_50_mfu",
            "checkpoint_bytes", "teacher_cache_bytes",
        ):  # fmt: skip
            assert key in plan, key
        assert set(plan["bytes_per_device"]) >= {"argument", "output", "temp", "alias", "total"}
        assert plan["num_examples"] == 1437 and plan["run_hours_bound"] > 0
        assert (plan["teacher_flops_fraction"] > 0) == (name == "live")
        _check_input_side(plan, result.stdout, measured=name == "live")
    assert not missing.exists()


def _check_input_side(plan, stdout, *, measured):
    """The host cores the input needs: the measured rate per core against the bound's images/s,
    on the target's host (v5e 2x2: one 4-chip ct5lp-hightpu-4t of 112 vCPUs)."""
    side = plan["input"]
    if not measured:
        assert side is None and "| host CPUs for the input | - (not measured" in stdout
        return
    assert side["host"] == "ct5lp-hightpu-4t" and side["hosts"] == 1 and side["host_vcpus"] == 112
    assert side["images_per_second_per_host"] == plan["images_per_second_bound"]
    rate = side["images_per_cpu_second"]
    assert 1 < rate < 1e5 and "by this plan on this host" in side["measured"]
    assert side["vcpus_needed_per_host"] == math.ceil(side["images_per_second_per_host"] / rate)
    assert f"{side['vcpus_needed_per_host']} vCPUs a host of 112 (ct5lp-hightpu-4t" in stdout


def test_a_bad_target_is_refused_in_one_line():
    config = _config()
    config.plan.target = "tpu:v9:2x2"
    with pytest.raises(ConfigError, match=r"config.plan.target='tpu:v9:2x2': unknown tpu 'v9'"):
        plan_run.plan(config, "")


def test_a_plan_skips_only_the_rules_on_files():
    from deit_jax.config import rules

    config = _config(**{"teacher.cache": "/nonexistent/cache", "distillation.kind": "hard"})
    assert not rules.problems(config, num_devices=4, planning=True)
    assert any("teacher.cache" in p for p in rules.problems(config, num_devices=4))
    config.batch_size = 30  # not a multiple of the target's 4 devices: still refused
    assert any(p.startswith("config.batch_size=30") for p in rules.problems(
        config, num_devices=4, planning=True))  # fmt: skip
    assert tasks.task_of(config).name == tasks.CLASSIFIER


def test_the_cache_of_a_run_is_its_teachers_outputs_for_every_step():
    from deit_jax.data import DatasetInfo
    from deit_jax.plan.costs import cache_bytes

    config = _config(**{"distillation.kind": "soft", "teacher.cache_topk": 10})
    info = DatasetInfo(num_classes=1000, num_train=1000, num_eval=10, image_shape=(32, 32, 3))
    per_example = 10 * (2 + 2)  # float16 values and int16 indices; no embeddings
    assert config.teacher.cache_dtype == "float16"
    assert cache_bytes(config, info, 100, 0) == 100 * config.batch_size * per_example
    config.distillation.kind = "none"  # no teacher: nothing to cache
    assert cache_bytes(config, info, 100, 0) == 0
