"""`--config.mode=plan` for NVIDIA GPUs on this CPU host: XLA's GPU compiler through JAX's CUDA
plugin, no GPU and no CUDA libraries. The plugin is not in the test extra (it makes every JAX
process on a host without a GPU log that it found no CUDA driver); where it is installed:

  pip install "jax-cuda12-plugin==$(python -c 'import jax; print(jax.__version__)')"
  python -m pytest tests/test_plan_gpu.py

Tolerance: FLOPs against the step's own matmul count to 2%, as for the TPU plan (XLA's GPU count
also has the elementwise work: 2.0% over at 256 wide, so the model here is 512 wide)."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from _flops import matmul_flops
from _processes import cpu_env
from _train_config import tiny_config

pytest.importorskip("jax_plugins.xla_cuda12", reason="needs jax-cuda12-plugin (module doc)")

from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from deit_jax.plan import compile_step, gpu_specs, plan_mesh  # noqa: E402
from deit_jax.plan import run as plan_run  # noqa: E402
from deit_jax.plan.targets import compile_devices, parse_target  # noqa: E402

TARGET = "gpu:h100:8"


def test_eight_h100s_from_the_vendors_figures():
    devices = compile_devices(TARGET)
    assert len(devices) == 8 and {d.device_kind for d in devices} == {"NVIDIA H100 80GB HBM3"}
    chip = parse_target(TARGET).chip
    text = gpu_specs.target_config("h100", chip.hbm_bytes, chip.hbm_bytes_per_second)
    assert "device_memory_size: 80000000000" in text and "memory_bandwidth: 3350000000000" in text
    assert compile_devices(TARGET, gpu_target_config=text)[0].device_kind == devices[0].device_kind


def test_a_gpu_plan_counts_the_steps_matmuls_and_refuses_what_does_not_fit():
    config = tiny_config(
        "/nonexistent/tfds",
        **{"model.embed_dim": 512, "model.num_heads": 8, "data.img_size": 32},
    )
    config.mode, config.plan.target, config.plan.input_seconds = "plan", TARGET, 0
    planner = plan_run.Planner(config, "", parse_target(TARGET))
    batch = 64
    train = planner.train_report(batch)
    tx, schedule, state, _ = planner.state(config, batch)
    with planner._scope():
        step = planner.task.train_step(tx, schedule)
        jaxpr = jax.make_jaxpr(step)(state, None, planner.task.batch_shapes(batch)).jaxpr
    assert train["cost_source"].startswith("hlo_module_cost_analysis")
    assert train["flops_per_step_per_device"] * 8 == pytest.approx(matmul_flops(jaxpr), rel=0.02)
    chip = planner.target.chip
    assert plan_run.fits(train, chip) and train["bytes_per_device"]["total"] < chip.usable_bytes
    # 75% of 80 GB is what JAX may use on the card: 2^21 images of 32 px do not fit in it.
    huge = planner.train_report(1 << 21)
    assert not plan_run.fits(huge, chip)


def test_convolutions_handed_to_cudnn_are_counted():
    """XLA hands a convolution to cuDNN (a custom call its optimised module's cost analysis does
    not count: 0 FLOPs); the plan counts it from the step itself."""
    mesh = plan_mesh(compile_devices(TARGET))
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    x = jax.ShapeDtypeStruct((64, 32, 32, 64), jnp.float32, sharding=rows)
    replicated = NamedSharding(mesh, PartitionSpec())
    w = jax.ShapeDtypeStruct((3, 3, 64, 128), jnp.float32, sharding=replicated)

    def step(x, w):
        dims = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=dims).sum()

    report = compile_step(step, (x, w))
    counted = matmul_flops(jax.make_jaxpr(step)(x, w).jaxpr)
    assert counted == 2 * 64 * 30 * 30 * 128 * 3 * 3 * 64
    assert report["flops_per_step_per_device"] * 8 == pytest.approx(counted, rel=0.01)


def test_a_gpu_plan_as_a_user_runs_it(tmp_path):
    cmd = [
        sys.executable, "-m", "deit_jax.main", "--config=tests/_train_config.py",
        "--config.mode=plan", f"--config.plan.target={TARGET}", "--config.plan.input_seconds=1",
        "--config.data.data_dir=/nonexistent/tfds", f"--workdir={tmp_path}",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=cpu_env(1), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["fits"] and plan["devices"] == 8 and plan["chip"] == "NVIDIA H100 SXM"
    assert plan["input"]["host"] == "a3-highgpu-8g" and plan["input"]["host_vcpus"] == 208
    assert any("not autotuned" in note for note in plan["notes"])
    assert "| target | gpu:h100:8 (8 x NVIDIA H100 SXM) |" in result.stdout
