"""The plan's generic machinery on compile-only TPU v5e devices (libtpu, no TPU): a small MLP
train step whose matmul shapes give its FLOPs and memory by hand, compiled from shapes."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from deit_jax import _platforms
from deit_jax.errors import ConfigError, DependencyError
from deit_jax.plan import (
    compile_devices,
    compile_step,
    fits,
    largest_batch_that_fits,
    parse_target,
    plan_mesh,
    roofline,
    targets,
)
from deit_jax.plan.compile import _costs
from deit_jax.plan.targets import TPU_CHIPS
from deit_jax.sharding import DATA_AXES

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="libtpu (the test extra) not installed"
)
# What deit_jax/__init__.py does: this worker's JAX stays on the CPU, libtpu stays unlocked.
_platforms.skip_absent_accelerators()

TARGET = "tpu:v5e:2x2"
D, H = 128, 4096  # x (B, D) @ w1 (D, H) -> relu -> @ w2 (H, D): activations dominate memory


def mlp_step(params, x):
    def loss(p):
        return jnp.mean((jax.nn.relu(x @ p["w1"]) @ p["w2"]) ** 2)

    grads = jax.grad(loss)(params)
    return jax.tree.map(lambda w, g: w - 0.1 * g, params, grads)


@functools.cache
def mesh():
    return plan_mesh(compile_devices(TARGET))


def report_at(batch: int) -> dict:
    """The step's report at a global batch split over the data axis, weights replicated."""
    replicated = NamedSharding(mesh(), PartitionSpec())
    params = {
        "w1": jax.ShapeDtypeStruct((D, H), jnp.float32, sharding=replicated),
        "w2": jax.ShapeDtypeStruct((H, D), jnp.float32, sharding=replicated),
    }
    batch_sharding = NamedSharding(mesh(), PartitionSpec(DATA_AXES))
    x = jax.ShapeDtypeStruct((batch, D), jnp.float32, sharding=batch_sharding)
    return compile_step(mlp_step, (params, x), donate_argnums=0, global_batch=batch)


@functools.cache
def report_1024() -> dict:
    return report_at(1024)


def test_flops_equal_the_matmul_count():
    per_device = 1024 // 4
    matmul = 2 * per_device * D * H
    # Forward: 2 matmuls. Backward: both weight gradients and the hidden layer's input gradient;
    # x needs none (a train step differentiates the weights only): 5 matmuls, not 6.
    expected = 5 * matmul
    report = report_1024()
    assert report["cost_source"] == "cost_analysis"
    assert report["flops_per_step_per_device"] == pytest.approx(expected, rel=0.02)
    assert report["compile_seconds"] > 0


def test_hlo_cost_analysis_counts_the_same_flops():
    """The GPU path (no cost_analysis without a GPU) on the same compiled step: the unoptimised
    step's FLOPs over the devices, for a step whose rows are sharded over them."""
    replicated = NamedSharding(mesh(), PartitionSpec())
    rows = NamedSharding(mesh(), PartitionSpec(("data", "fsdp")))
    w = jax.ShapeDtypeStruct((D, H), jnp.float32, sharding=replicated)
    x = jax.ShapeDtypeStruct((256, D), jnp.float32, sharding=rows)
    lowered = jax.jit(lambda w, x: x @ w).lower(w, x)
    compiled = lowered.compile()

    class WithoutCostAnalysis:
        def cost_analysis(self):
            return None

        def runtime_executable(self):
            return compiled.runtime_executable()

    flops, _, source = _costs(WithoutCostAnalysis(), lowered, 4)
    assert source.startswith("hlo_module_cost_analysis")
    assert flops == pytest.approx(2 * 256 * D * H / 4, rel=0.02)
    assert flops == pytest.approx(_costs(compiled, lowered, 4)[0], rel=0.02)


def test_memory_per_device():
    memory = report_1024()["bytes_per_device"]
    params = 2 * D * H * 4
    assert memory["argument"] == params + (1024 // 4) * D * 4  # the batch is split 4 ways
    assert memory["alias"] == params  # the donated weights are updated in place
    assert memory["output"] >= params
    assert all(memory[k] >= 0 for k in ("temp", "generated_code"))
    live = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
    assert memory["total"] == max(memory["peak"] or 0, live) and memory["peak"] >= live
    assert fits(report_1024(), TPU_CHIPS["v5e"])


def test_roofline():
    chip = TPU_CHIPS["v5e"]
    bound = roofline(report_1024(), chip)
    report = report_1024()
    compute = report["flops_per_step_per_device"] / chip.peak_bf16_flops
    memory = report["bytes_accessed"] / chip.hbm_bytes_per_second
    assert bound["step_seconds_bound"] == pytest.approx(max(compute, memory))
    assert bound["images_per_second_bound"] == pytest.approx(1024 / max(compute, memory))
    assert bound["bound_by"] == ("compute" if compute >= memory else "memory")
    synthetic = {"flops_per_step_per_device": 197e12, "bytes_accessed": 0.0}
    assert roofline(synthetic, chip, global_batch=10)["images_per_second_bound"] == 10


def test_a_batch_too_large_does_not_fit():
    report = report_at(1 << 24)  # 16M x 512 floats: 8 GiB of input per chip, more temporaries
    assert not fits(report, TPU_CHIPS["v5e"])
    assert "RESOURCE_EXHAUSTED" in report["error"]
    assert report["bytes_required_at_least"] > 16 << 30
    over = {"bytes_per_device": {"total": TPU_CHIPS["v5e"].usable_bytes + 1}}
    assert not fits(over, TPU_CHIPS["v5e"])


def test_largest_batch_that_fits():
    # A 32 MiB chip keeps every compile small (XLA does not know the limit, `fits` applies it);
    # the probes are where activations dominate the step's memory, as a run's batches are.
    chip = dataclasses.replace(TPU_CHIPS["v5e"], name="small", hbm_bytes=32 << 20)
    compiled = []

    def counted(batch):
        compiled.append(batch)
        return report_at(batch)

    batch, report = largest_batch_that_fits(counted, chip, probes=(2048, 4096), multiple=4)
    assert batch % 4 == 0 and batch > 4096
    assert report["global_batch"] == batch and fits(report, chip)
    assert len(compiled) <= 2 + 3
    assert not fits(report_at(2 * batch), chip)


def synthetic(memory, refuse_above=None):
    """report_at for a step whose memory per device is `memory(batch)` bytes."""

    def report_at(batch):
        if refuse_above is not None and batch > refuse_above:
            return {"fits": False, "error": "RESOURCE_EXHAUSTED", "global_batch": batch}
        return {"bytes_per_device": {"total": memory(batch)}, "global_batch": batch}

    return report_at


@pytest.mark.parametrize(
    ("memory", "refuse_above"),
    [
        (lambda b: 1000 + 10 * b, None),  # linear: found at the first check
        (lambda b: 1000 + 10 * b + b * b // 1000, None),  # convex: the check steps down
        (lambda b: 1000 + 10 * b, 6_000),  # XLA refuses past 6000 without a size: bisected
        (lambda b: 200_000 + b, None),  # not even the smallest batch fits
    ],
)
def test_largest_batch_search(memory, refuse_above):
    chip = dataclasses.replace(TPU_CHIPS["v5e"], hbm_bytes=100_000)
    report_at = synthetic(memory, refuse_above)
    largest = max(
        (b for b in range(8, 20_000, 8) if fits(report_at(b), chip)), default=0
    )  # by brute force
    calls = []

    def counted(batch):
        calls.append(batch)
        return report_at(batch)

    batch, report = largest_batch_that_fits(
        counted, chip, probes=(800, 1600), multiple=8, max_checks=8
    )
    assert batch % 8 == 0 and 0.9 * largest <= batch <= largest
    assert (report is None) == (batch == 0)
    assert batch == 0 or fits(report, chip)
    assert len(calls) <= 2 + 8
    if refuse_above is None and largest:
        assert len(calls) <= 2 + 2  # the line and one step down
    # No compile within 2% of the largest fit already known: memory is not monotone at that
    # scale (XLA's tiles), so such a compile tells nothing (a bisection stops there).
    for i, b in enumerate(calls[2:], start=2):
        floor = max((c for c in calls[:i] if fits(report_at(c), chip)), default=0)
        assert b < floor or b - floor >= 0.02 * floor, (b, floor, calls)


@pytest.mark.parametrize(
    "spec",
    ["v5e:2x2", "tpu:v5e", "tpu:v9:2x2", "tpu:v5e:2x2x1", "tpu:v4:2x2", "tpu:v5e:0x2",
     "gpu:h100", "gpu:h100:0", "gpu:h100:12", "gpu:t4:8", "cpu:x:1"],
)  # fmt: skip
def test_bad_targets_are_refused_in_one_line(spec):
    with pytest.raises(ConfigError) as error:
        parse_target(spec)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"config.plan.target={spec!r}: ")
    assert "accepted: tpu:<v4|v5e|v5p|v6e>:<topology>" in message and "gpu:<" in message


def test_targets():
    assert parse_target("tpu:v5e:2x4").num_devices == 8
    assert parse_target("gpu:h100:8").topology == "1x1x8"
    assert parse_target("gpu:h200:16").topology == "1x2x8"
    for spec, kind in [("tpu:v4:2x2x1", "TPU v4"), ("tpu:v5p:2x2x1", "TPU v5"),
                       ("tpu:v6e:2x2", "TPU v6 lite")]:  # fmt: skip
        devices = compile_devices(spec)
        assert len(devices) == 4 and devices[0].device_kind == kind  # one device a chip


def test_mesh():
    grid = plan_mesh(compile_devices(TARGET), fsdp=2)
    assert grid.axis_names == DATA_AXES and dict(grid.shape) == {"data": 2, "fsdp": 2}
    with pytest.raises(ConfigError, match="config.mesh.fsdp=3"):
        plan_mesh(compile_devices(TARGET), fsdp=3)


@pytest.mark.skipif(
    any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin")),
    reason="JAX's CUDA plugin is installed",
)
def test_gpu_target_without_the_cuda_plugin():
    with pytest.raises(DependencyError, match=r'pip install "jax-cuda12-plugin=='):
        compile_devices("gpu:h100:8")


def test_gpu_target_config_fields_an_older_jaxlib_rejects_are_dropped(monkeypatch):
    """The GPU path's own logic, with the CUDA plugin's topology call faked (the plugin is not
    in the test extra; tests/test_plan_gpu.py runs the real one)."""
    seen = []

    def fake_topology(platform, target_config, topology):
        seen.append(target_config)
        if "collective_memory_granularity" in target_config:
            raise RuntimeError(
                'INVALID_ARGUMENT: Message type "stream_executor.GpuDeviceInfoProto" has no '
                'field named "collective_memory_granularity".'
            )
        assert (platform, topology) == ("cuda", "1x1x8")
        return types.SimpleNamespace(devices=list(range(8)))

    monkeypatch.setattr(targets._platforms, "cuda_plugin_installed", lambda: True)
    monkeypatch.setattr(targets.topologies, "get_topology_desc", fake_topology)
    assert compile_devices("gpu:h100:8") == list(range(8))  # the figures gpu_specs writes
    assert len(seen) == 1 and "core_count: 132" in seen[0]
    spec = "gpu_device_info {\n  core_count: 132\n  collective_memory_granularity: 2097152\n}\n"
    assert compile_devices("gpu:h100:8", gpu_target_config=spec) == list(range(8))
    assert len(seen) == 3 and "core_count: 132" in seen[2]
    assert "collective_memory_granularity" not in seen[2]
    with pytest.raises(ConfigError, match="gpu_target_config='/nonexistent/h100.txtpb': no such"):
        compile_devices("gpu:h100:8", gpu_target_config="/nonexistent/h100.txtpb")
    assert jax.config.jax_platforms == "cpu"


QUIET = """
import sys
{before}
import deit_jax._platforms as platforms  # deit_jax/__init__.py applies the fix
platforms.skip_absent_accelerators()  # a second call changes nothing
import jax
assert jax.config.jax_platforms == "cpu"
jax.devices()
from deit_jax.plan import compile_devices
print(len(compile_devices("tpu:v5e:2x2")), jax.default_backend())
"""


@pytest.mark.skipif(
    _platforms.tpu_present() or _platforms.gpu_present(), reason="an accelerator is attached"
)
@pytest.mark.parametrize("before", ["", "import jax  # imported before the fix"])
def test_quiet_on_a_host_without_tpu(before):
    """libtpu's warnings are gone, and compile-only TPU devices still come in the same process;
    without the fix the same host does print them (so this test can fail)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("JAX_PLATFORMS", "ALLOW_MULTIPLE_LIBTPU_LOAD")
    }

    def run(code):
        return subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )

    fixed = run(textwrap.dedent(QUIET).format(before=before))
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stderr == ""
    assert fixed.stdout.split() == ["4", "cpu"]
    if not before:  # the same host without the fix (libtpu unlocked: it then always speaks)
        plain = run(
            "import os; os.environ['ALLOW_MULTIPLE_LIBTPU_LOAD'] = '1'; import jax; jax.devices()"
        )
        assert "TPU_ACCELERATOR_TYPE" in plain.stderr or "libtpu" in plain.stderr
