"""What XLA needs to know of an NVIDIA card to compile for it without one: a
`stream_executor.GpuTargetConfigProto` in text form, written here from the vendors' figures.

XLA's GPU compiler reads the card's compute capability (which instructions and kernels it may
emit), its streaming multiprocessors, shared memory, registers and thread limits (how it tiles
and launches fusions), and its memory and L2 sizes. A card's own description, more complete,
comes from `--config.plan.gpu_target_config=FILE` (XLA keeps them as
xla/backends/gpu/target_config/specs/<card>.txtpb; on a machine with the card,
`jax._src.lib._jax.get_topology_for_devices(jax.devices()).target_config`).
"""

from __future__ import annotations

from dataclasses import dataclass

# NVIDIA's CUDA C++ Programming Guide, "Compute Capabilities" (limits per compute capability),
# and the cards' datasheets (SMs, memory, bandwidth, L2, boost clock).
SOURCE = (
    "https://docs.nvidia.com/cuda/cuda-c-programming-guide/#compute-capabilities; "
    "NVIDIA A100, H100 and H200 datasheets"
)


@dataclass(frozen=True)
class GpuFacts:
    """What XLA's GPU compiler reads beyond the chip's memory and bandwidth (those are the
    planner's `targets.Chip`, one table for both)."""

    name: str
    compute_capability: tuple[int, int]
    multiprocessors: int
    fp32_units_per_multiprocessor: int
    l2_bytes: int
    boost_clock_ghz: float
    shared_memory_per_multiprocessor: int  # bytes, the most a block may opt in to + 1 KiB
    shared_memory_per_block_optin: int


KiB, MiB = 1 << 10, 1 << 20
FACTS: dict[str, GpuFacts] = {
    "a100": GpuFacts("NVIDIA A100-SXM4-80GB", (8, 0), 108, 64, 40 * MiB, 1.41,
                     164 * KiB, 163 * KiB),
    "h100": GpuFacts("NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 50 * MiB, 1.98,
                     228 * KiB, 227 * KiB),
    "h200": GpuFacts("NVIDIA H200", (9, 0), 132, 128, 50 * MiB, 1.98, 228 * KiB, 227 * KiB),
}  # fmt: skip


def target_config(card: str, memory_bytes: int, memory_bytes_per_second: float) -> str:
    """The GpuTargetConfigProto text of `card` (a key of FACTS) with its memory's size and
    bandwidth (the planner's chip table, `targets.GPU_CHIPS`)."""
    f = FACTS[card]
    major, minor = f.compute_capability
    # Hopper's architecture-specific features (sm_90a: wgmma, TMA), which XLA's GEMMs use.
    extension = "\n    feature_extension: ACCELERATED_FEATURES" if major == 9 else ""
    # Limits common to compute capabilities 8.0 and 9.0 (the programming guide's table).
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: {48 * KiB}
  shared_memory_per_core: {f.shared_memory_per_multiprocessor}
  shared_memory_per_block_optin: {f.shared_memory_per_block_optin}
  threads_per_core_limit: 2048
  core_count: {f.multiprocessors}
  fpus_per_core: {f.fp32_units_per_multiprocessor}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  memory_bandwidth: {int(memory_bytes_per_second)}
  l2_cache_size: {f.l2_bytes}
  clock_rate_ghz: {f.boost_clock_ghz}
  device_memory_size: {memory_bytes}
  cuda_compute_capability {{
    major: {major}
    minor: {minor}{extension}
  }}
  device_vendor: "NVIDIA Corporation"
  name: "{f.name}"
}}
platform_name: "CUDA"
device_description_str: "{f.name}"
"""
