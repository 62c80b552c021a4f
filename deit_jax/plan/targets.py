"""What a plan compiles for: a TPU slice or a GPU node named by a string, its chips' facts, and
compile-only devices for it on a host that has none of those chips.

`tpu:<generation>:<topology>` names a slice as libtpu does (`tpu:v5e:2x2`, `tpu:v4:2x2x1`);
`gpu:<card>:<count>` names NVIDIA GPUs (`gpu:h100:8`). XLA compiles for such devices without
them, so memory and FLOPs per device come from the real compiled step.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from jax.experimental import mesh_utils, topologies
from jax.sharding import Mesh

from deit_jax import _platforms
from deit_jax.errors import ConfigError, DependencyError
from deit_jax.plan import gpu_specs
from deit_jax.sharding import DATA_AXES

GiB = 1 << 30


@dataclass(frozen=True)
class Host:
    """A cloud machine type that holds the chips: the CPU side the input pipeline runs on."""

    machine: str
    chips: int
    vcpus: int  # hardware threads


@dataclass(frozen=True)
class Chip:
    """One accelerator chip (one JAX device): vendor figures, dense bf16, no sparsity."""

    name: str
    hbm_bytes: int
    peak_bf16_flops: float  # FLOP/s
    hbm_bytes_per_second: float
    source: str  # the vendor's page the figures come from
    # JAX on a GPU preallocates a share of its memory (75%, or XLA_PYTHON_CLIENT_MEM_FRACTION)
    # and allocates within it; on a TPU the compiler itself refuses a step that does not fit.
    preallocates: bool = False
    # Google Cloud's machine types for the chip, fewest chips first (HOSTS_SOURCE).
    hosts: tuple[Host, ...] = ()

    def host_for(self, num_devices: int) -> Host | None:
        """The smallest machine type that holds `num_devices` chips, else the largest (a slice
        over several of them)."""
        fitting = [h for h in self.hosts if h.chips >= num_devices]
        return fitting[0] if fitting else (self.hosts[-1] if self.hosts else None)

    @property
    def usable_bytes(self) -> int:
        if not self.preallocates:
            return self.hbm_bytes
        return int(self.hbm_bytes * float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", 0.75)))


HOSTS_SOURCE = (
    "https://cloud.google.com/tpu/docs/<generation> (TPU VM types), "
    "https://cloud.google.com/compute/docs/accelerator-optimized-machines (A2, A3)"
)
TPU_CHIPS: dict[str, Chip] = {
    "v4": Chip(
        "TPU v4",
        32 * GiB,
        275e12,
        1200e9,
        "https://cloud.google.com/tpu/docs/v4",
        hosts=(Host("ct4p-hightpu-4t", 4, 240),),
    ),
    "v5e": Chip(
        "TPU v5e",
        16 * GiB,
        197e12,
        819e9,
        "https://cloud.google.com/tpu/docs/v5e",
        hosts=(
            Host("ct5lp-hightpu-1t", 1, 24),
            Host("ct5lp-hightpu-4t", 4, 112),
            Host("ct5lp-hightpu-8t", 8, 224),
        ),
    ),
    "v5p": Chip(
        "TPU v5p",
        95 * GiB,
        459e12,
        2765e9,
        "https://cloud.google.com/tpu/docs/v5p",
        hosts=(Host("ct5p-hightpu-4t", 4, 208),),
    ),
    "v6e": Chip(
        "TPU v6e",
        32 * GiB,
        918e12,
        1640e9,
        "https://cloud.google.com/tpu/docs/v6e",
        hosts=(
            Host("ct6e-standard-1t", 1, 44),
            Host("ct6e-standard-4t", 4, 180),
            Host("ct6e-standard-8t", 8, 180),
        ),
    ),
}
GPU_CHIPS: dict[str, Chip] = {
    "a100": Chip(
        "NVIDIA A100 SXM 80GB", 80 * 10**9, 312e12, 2039e9,
        "https://www.nvidia.com/en-us/data-center/a100/", preallocates=True,
        hosts=tuple(Host(f"a2-ultragpu-{n}g", n, 12 * n) for n in (1, 2, 4, 8)),
    ),
    "h100": Chip(
        "NVIDIA H100 SXM", 80 * 10**9, 989e12, 3350e9,
        "https://www.nvidia.com/en-us/data-center/h100/", preallocates=True,
        hosts=tuple(Host(f"a3-highgpu-{n}g", n, 26 * n) for n in (1, 2, 4, 8)),
    ),
    "h200": Chip(
        "NVIDIA H200 SXM", 141 * 10**9, 989e12, 4800e9,
        "https://www.nvidia.com/en-us/data-center/h200/", preallocates=True,
        hosts=(Host("a3-ultragpu-8g", 8, 224),),
    ),
}  # fmt: skip
# Topology rank per TPU generation, and libtpu's chip config (v4 and v5p: one device a chip).
_TPU_RANK = {"v4": 3, "v5e": 2, "v5p": 3, "v6e": 2}
_TPU_CHIP_CONFIG = {"v4": "megacore", "v5p": "megacore"}
# XLA's description of each card (xla/backends/gpu/target_config/specs/<file>).
_XLA_GPU_SPEC = {"a100": "a100_sxm_80.txtpb", "h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}
_NEWER_GPU_FIELDS = ("collective_memory_granularity",)
ACCEPTED = (
    f"tpu:<{'|'.join(TPU_CHIPS)}>:<topology> (tpu:v5e:2x2, tpu:v4:2x2x1) or "
    f"gpu:<{'|'.join(GPU_CHIPS)}>:<count> (gpu:h100:8)"
)
# What libtpu prints when it starts on a host without a TPU (dropped, see `_quiet`).
_LIBTPU_NOISE = (
    "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "Logging before InitGoogle",
    "=== Source Location Trace", "libtpu_init_utils.cc", "ALLOW_MULTIPLE_LIBTPU_LOAD",
)  # fmt: skip


@dataclass(frozen=True)
class Target:
    spec: str  # as the user wrote it
    platform: str  # "tpu" or "gpu"
    kind: str  # a key of TPU_CHIPS or GPU_CHIPS
    topology: str  # libtpu's topology name, or XLA's GPU topology "slices x hosts x GPUs"
    num_devices: int

    @property
    def chip(self) -> Chip:
        return (TPU_CHIPS if self.platform == "tpu" else GPU_CHIPS)[self.kind]


def parse_target(spec: str, key: str = "plan.target") -> Target:
    """`tpu:v5e:2x2` or `gpu:h100:8` -> Target; anything else is a one-line ConfigError."""

    def bad(why: str) -> ConfigError:
        return ConfigError(f"config.{key}={spec!r}: {why}; accepted: {ACCEPTED}")

    parts = spec.strip().lower().split(":")
    if len(parts) != 3 or parts[0] not in ("tpu", "gpu"):
        raise bad("not a target")
    platform, kind, shape = parts
    chips = TPU_CHIPS if platform == "tpu" else GPU_CHIPS
    if kind not in chips:
        raise bad(f"unknown {platform} {kind!r}")
    if platform == "gpu":
        if not shape.isdigit() or int(shape) < 1 or (int(shape) > 8 and int(shape) % 8):
            raise bad("the GPU count is 1 to 8, or a multiple of 8")
        count = int(shape)
        hosts, per_host = max(1, count // 8), min(count, 8)
        return Target(spec, platform, kind, f"1x{hosts}x{per_host}", count)
    if not re.fullmatch(r"[1-9]\d*(x[1-9]\d*)+", shape) or shape.count("x") + 1 != _TPU_RANK[kind]:
        dims = "x".join(["N"] * _TPU_RANK[kind])
        raise bad(f"a {kind} topology is {dims}")
    chips_count = math.prod(int(d) for d in shape.split("x"))
    return Target(spec, platform, kind, f"{kind}:{shape}", chips_count)


# What XLA logs when a spec file has a field this jaxlib does not know (dropped and retried).
_SPEC_NOISE = ("Error parsing text-format stream_executor.GpuTargetConfigProto",)


@contextlib.contextmanager
def _quiet(noise: Sequence[str]) -> Iterator[None]:
    """Drops the lines of C++ logging that contain one of `noise` from stderr (file descriptor
    2, where it writes); every other line written meanwhile is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            kept = [line for line in lines if not any(n in line for n in noise)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def _tpu_devices(target: Target) -> list[jax.Device]:
    if importlib.util.find_spec("libtpu") is None:
        raise DependencyError(
            f"{target.spec}: compiling for TPUs needs libtpu: "
            f'pip install "jax[tpu]=={jax.__version__}" (or the test extra)'
        )
    chip_config = _TPU_CHIP_CONFIG.get(target.kind, "default")
    with _quiet(_LIBTPU_NOISE), _libtpu_unlocked():
        topology = topologies.get_topology_desc(
            platform="tpu", topology_name=target.topology, chip_config_name=chip_config
        )
    return list(topology.devices)


@contextlib.contextmanager
def _libtpu_unlocked() -> Iterator[None]:
    """libtpu takes /tmp/libtpu_lockfile when it starts, to keep a second process off the same
    TPU; on a host without one it would only refuse a second compile-only process (another plan,
    another test worker). libtpu reads the switch when it starts; child processes do not get it."""
    name = "ALLOW_MULTIPLE_LIBTPU_LOAD"
    if _platforms.tpu_present() or name in os.environ:
        yield
        return
    os.environ[name] = "1"
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _gpu_target_config(target: Target, path: str | Path | None) -> str:
    """The card's GpuTargetConfigProto text: `path`'s (a file, or the text itself), else the
    one written from the vendor's figures (`gpu_specs`)."""
    if path is None:
        chip = target.chip
        return gpu_specs.target_config(target.kind, chip.hbm_bytes, chip.hbm_bytes_per_second)
    text = str(path)
    if "gpu_device_info" in text:
        return text
    if not Path(path).is_file():
        raise ConfigError(
            f"config.plan.gpu_target_config={text!r}: no such file; give the card's "
            f"GpuTargetConfigProto (XLA's specs/{_XLA_GPU_SPEC[target.kind]}), or leave it "
            "empty for the one deit_jax writes from the vendor's figures"
        )
    return Path(path).read_text()


def _gpu_devices(target: Target, target_config: str | Path | None) -> list[jax.Device]:
    if not _platforms.cuda_plugin_installed():
        raise DependencyError(
            f"{target.spec}: compiling for NVIDIA GPUs needs JAX's CUDA plugin: "
            f'pip install "jax-cuda12-plugin=={jax.__version__}" (180 MB: compiling needs no '
            "CUDA libraries)"
        )
    text = _gpu_target_config(target, target_config)
    if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")  # else the CUDA backend's init fails on cuInit
    # Newer spec files carry fields an older jaxlib does not know (jaxlib 0.10.2:
    # collective_memory_granularity): drop the field the error names, or the known ones.
    dropped: set[str] = set()
    while True:
        try:
            with _quiet(_SPEC_NOISE):
                topology = topologies.get_topology_desc(
                    platform="cuda", target_config=text, topology=target.topology
                )
            return list(topology.devices)
        except Exception as e:  # jaxlib's runtime error type differs between versions
            named = re.findall(r'has no field named "(\w+)"', str(e))
            fields = set(named) if named else set(_NEWER_GPU_FIELDS)
            if fields <= dropped:
                raise
            dropped |= fields
            for field in fields:
                text = re.sub(rf"(?m)^\s*{field}\s*:.*$", "", text)


def compile_devices(
    target: Target | str, *, gpu_target_config: str | Path | None = None
) -> list[jax.Device]:
    """Compile-only devices for `target`, one a chip; usable in a Mesh, not to run on.

    A GPU target needs JAX's CUDA plugin; `gpu_target_config` is the card's
    GpuTargetConfigProto, as text or a file's path (default: `gpu_specs`'s).
    """
    target = parse_target(target) if isinstance(target, str) else target
    if target.platform == "tpu":
        devices = _tpu_devices(target)
    else:
        devices = _gpu_devices(target, gpu_target_config)
    if len(devices) != target.num_devices:
        raise RuntimeError(f"{target.spec}: got {len(devices)} devices, expected one a chip")
    return devices


def plan_mesh(devices: Sequence[jax.Device], data: int = -1, fsdp: int = 1) -> Mesh:
    """A ('data', 'fsdp') mesh as `deit_jax.sharding.create_mesh` builds for a run (`data=-1`:
    what fsdp leaves), laid out along the target's interconnect."""
    if fsdp < 1 or len(devices) % fsdp:
        raise ConfigError(f"config.mesh.fsdp={fsdp}: does not divide {len(devices)} devices")
    data = len(devices) // fsdp if data == -1 else data
    if data * fsdp != len(devices):
        raise ConfigError(
            f"config.mesh.data={data}: data x fsdp = {data * fsdp}, the target has "
            f"{len(devices)} devices"
        )
    try:
        grid = mesh_utils.create_device_mesh((data, fsdp), list(devices))
    except (AssertionError, NotImplementedError, ValueError):
        grid = np.asarray(devices).reshape(data, fsdp)
    return Mesh(grid, DATA_AXES)
