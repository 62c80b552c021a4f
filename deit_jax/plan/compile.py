"""Compile a step for compile-only devices and read what XLA says it costs: memory per device,
FLOPs and bytes per step, and from those a roofline bound on the step's time.

Everything here is per device: XLA partitions the step (SPMD) before it analyses it. A step that
does not fit is no exception: the TPU compiler refuses it (RESOURCE_EXHAUSTED), and its report
says `fits: False` with XLA's message.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax

from deit_jax.plan.targets import Chip

Report = dict[str, Any]
# XLA pads batch dimensions to its tiles, so memory grows in stairs: a step down of a few
# samples may need the same bytes. Step down at least this share of the batch.
_MIN_STEP = 0.02
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@contextlib.contextmanager
def _not_persistently_cached() -> Iterator[None]:
    """Keeps compile-only executables out of JAX's persistent compilation cache: they cannot be
    loaded back (reading one warns and compiles again), so writing them only costs disk."""
    name = "jax_persistent_cache_min_compile_time_secs"
    before = getattr(jax.config, name)
    jax.config.update(name, 1e12)
    try:
        yield
    finally:
        jax.config.update(name, before)


def _memory(compiled: Any) -> dict[str, int]:
    stats = compiled.memory_analysis()
    memory = {
        "argument": int(stats.argument_size_in_bytes),
        "output": int(stats.output_size_in_bytes),
        "temp": int(stats.temp_size_in_bytes),
        "alias": int(stats.alias_size_in_bytes),  # outputs that reuse (donated) arguments
        "generated_code": int(stats.generated_code_size_in_bytes),
    }
    # XLA's own peak over the step (jaxlib 0.10 has it, though its repr does not show it); on
    # TPU it exceeds argument + output - alias + temp, whose temp leaves out some scratch.
    peak = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
    live = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
    memory["peak"] = peak or None
    memory["total"] = max(peak, live)
    return memory


def _costs(compiled: Any, lowered: Any, devices: int) -> tuple[float, float, str]:
    """(FLOPs, bytes accessed, where from), per device. GPU executables compiled without a GPU
    have no cost analysis. XLA's HLO cost analysis of their optimised modules would miss every
    convolution and GEMM XLA hands to cuDNN or cuBLAS (custom calls it does not count: a
    RegNet teacher's FLOPs vanish), so their FLOPs are the unoptimised module's (the whole step,
    before partitioning) over the devices; the bytes accessed are the optimised modules'."""
    costs = compiled.cost_analysis()
    if isinstance(costs, Sequence):  # older jax: one dict per module
        costs = costs[0] if costs else None
    if costs and "flops" in costs:
        return float(costs["flops"]), float(costs.get("bytes accessed", 0.0)), "cost_analysis"
    from jax._src.lib import _jax  # no public API for this yet

    cpu = jax.devices("cpu")[0].client
    accessed = 0.0
    for module in compiled.runtime_executable().hlo_modules():
        accessed += float(_jax.hlo_module_cost_analysis(cpu, module).get("bytes accessed", 0.0))
    whole = lowered.compiler_ir("hlo").get_hlo_module()
    flops = float(_jax.hlo_module_cost_analysis(cpu, whole).get("flops", 0.0)) / devices
    return flops, accessed, "hlo_module_cost_analysis of the unoptimised step / devices"


def _devices(args: Sequence[Any]) -> int:
    """How many devices the arguments' shardings span (1 without shardings)."""
    for leaf in jax.tree.leaves(args):
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            return len(sharding.device_set)
    return 1


def _out_of_memory(error: Exception) -> Report:
    """The report of a step XLA refused for lack of device memory; the bytes it needed when its
    message says ("... required for HLO temporaries (28.01G) exceeds available HBM (15.75G)")."""
    message = str(error).splitlines()[0]
    sizes = [
        int(float(number) * _UNITS[unit])
        for number, unit in re.findall(r"\((\d+(?:\.\d+)?)([KMGT]?)i?B?\)", message)
    ]
    return {"fits": False, "error": message, "bytes_required_at_least": max(sizes, default=None)}


def compile_step(
    fn: Callable[..., Any],
    abstract_args: Sequence[Any],
    *,
    donate_argnums: int | Sequence[int] = (),
    global_batch: int | None = None,
) -> Report:
    """Compiles `fn` for `abstract_args` (`jax.ShapeDtypeStruct`s whose shardings name the
    target's devices) and reports its cost per device. `fn` may be jitted already (with its own
    shardings and donation); else it is jitted with `donate_argnums`, as a train step donates
    its state.

    Keys: `bytes_per_device` {argument, output, temp, alias, generated_code, peak (XLA's, None
    where it gives none), total (the larger of peak and argument + output - alias + temp)},
    `flops_per_step_per_device`, `bytes_accessed` (per device a step), `cost_source`,
    `compile_seconds`, `global_batch`; a step XLA refuses for lack of memory has `fits: False`,
    `error` and `bytes_required_at_least` instead of the costs.
    """
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn, donate_argnums=donate_argnums)
    start = time.perf_counter()
    try:
        with _not_persistently_cached():
            lowered = jitted.lower(*abstract_args)
            compiled = lowered.compile()
    except Exception as e:  # jaxlib's runtime error type differs between versions
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        report = _out_of_memory(e)
    else:
        flops, accessed, source = _costs(compiled, lowered, _devices(abstract_args))
        report = {
            "bytes_per_device": _memory(compiled),
            "flops_per_step_per_device": flops,
            "bytes_accessed": accessed,
            "cost_source": source,
        }
    report["compile_seconds"] = time.perf_counter() - start
    report["global_batch"] = global_batch
    return report


def fits(report: Mapping[str, Any], chip: Chip) -> bool:
    """Whether the compiled step fits one device's memory (what JAX may use of it)."""
    if "error" in report:
        return False
    return report["bytes_per_device"]["total"] <= chip.usable_bytes


def roofline(
    report: Mapping[str, Any], chip: Chip, global_batch: int | None = None
) -> dict[str, Any]:
    """A lower bound on the step's time: its FLOPs at the chip's peak, or its bytes at the HBM
    bandwidth, whichever takes longer; and the images a second that bound allows."""
    if "error" in report:  # XLA refused the step: nothing to bound
        return {"step_seconds_bound": None, "images_per_second_bound": None, "bound_by": None}
    batch = global_batch if global_batch is not None else report.get("global_batch")
    compute = report["flops_per_step_per_device"] / chip.peak_bf16_flops
    memory = report["bytes_accessed"] / chip.hbm_bytes_per_second
    seconds = max(compute, memory)
    return {
        "step_seconds_bound": seconds,
        "images_per_second_bound": batch / seconds if batch and seconds > 0 else None,
        "bound_by": "compute" if compute >= memory else "memory",
    }


def largest_batch_that_fits(
    report_at: Callable[[int], Report],
    chip: Chip,
    *,
    probes: tuple[int, int],
    multiple: int,
    max_checks: int = 3,
) -> tuple[int, Report | None]:
    """The largest global batch (a multiple of `multiple`, the devices the batch is split over)
    whose step fits, with its report; (0, None) when not even `multiple` fits.

    Memory grows about linearly with the batch once activations dominate it (choose `probes`
    there, e.g. the configured batch and half of it): compile at the two probes, follow the line
    to the chip's memory, and compile there to check. A check that does not fit refits the line
    through itself and steps down; one XLA refused without saying the bytes it needed is bisected
    against the largest fit instead, down to `_MIN_STEP` of it (memory is not monotone in the
    batch at that scale: XLA's tiling and its choice of fusions move it by a few per cent: a
    DeiT-B step on a v5p chip measured 101.25 GiB at 3,640 and 98.84 GiB at 3,880). At most
    `max_checks` compiles after the probes.
    """
    if min(probes) < multiple or any(p % multiple for p in probes) or probes[0] == probes[1]:
        raise ValueError(f"probes {probes}: two different multiples of {multiple}")
    known = {b: report_at(b) for b in sorted(probes)}

    def needed(batch: int) -> float | None:  # bytes a device needs, where XLA says
        report = known[batch]
        if "error" in report:
            return report.get("bytes_required_at_least")
        return report["bytes_per_device"]["total"]

    def best() -> tuple[int, Report | None]:
        fitting = [b for b in known if fits(known[b], chip)]
        return (max(fitting), known[max(fitting)]) if fitting else (0, None)

    def follow_line(upper: int) -> int | None:
        """Where the line through the two largest measured batches up to `upper` meets the
        chip's memory; None without such a line."""
        measured = sorted(b for b in known if b <= upper and needed(b) is not None)
        if len(measured) < 2:
            return None
        lo, hi = measured[-2:]
        slope = (needed(hi) - needed(lo)) / (hi - lo)
        if slope <= 0:
            return None
        return math.floor((hi + (chip.usable_bytes - needed(hi)) / slope) / multiple) * multiple

    candidate, bisecting = follow_line(max(probes)), False
    for _ in range(max_checks):
        floor = best()[0]
        if candidate is None:
            failed = [b for b in known if b > floor and not fits(known[b], chip)]
            if not failed:
                break
            candidate, bisecting = (floor + min(failed)) // 2 // multiple * multiple, True
        if candidate <= floor or candidate < multiple:
            break
        if bisecting and candidate - floor < _MIN_STEP * floor:
            break  # within the stairs' share of the largest fit: more compiles tell nothing
        if candidate not in known:
            known[candidate] = report_at(candidate)
        if fits(known[candidate], chip):
            if not bisecting:
                break
            candidate = None
        elif needed(candidate) is None or bisecting:
            candidate = None
        else:
            lower = follow_line(candidate)
            step = max(multiple, math.ceil(_MIN_STEP * candidate / multiple) * multiple)
            candidate = None if lower is None else min(lower, candidate - step)
    return best()
