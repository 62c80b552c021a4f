"""Measuring in one process, shared by the benchmark scripts: glibc's allocator tuned before the
frameworks start, round-robin timing with peak memory, XLA's FLOP and memory counts, and the
tables' number formats. torch is imported only where a function needs it, so that `tune_malloc`
can run first.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any


def tune_malloc() -> bool:
    """Makes glibc reuse freed memory instead of returning it to the OS; True if applied.

    One arena, no mmap-backed blocks and no heap trimming: a step's buffers then come from memory
    earlier steps freed, without page faults (about 480k faults and 0.9 s of a 3.5 s DeiT-Ti
    batch-32 train step on 2 cores). The process keeps its peak memory. Call it before any thread
    allocates (before importing torch and jax); a no-op returning False without glibc.
    """
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # <malloc.h>
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    settings = ((m_mmap_max, 0), (m_trim_threshold, -1), (m_arena_max, 1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def set_threads(n: int | None) -> int:
    """Pins this process to n CPUs; XLA sizes its CPU thread pool from the affinity mask."""
    cpus = sorted(os.sched_getaffinity(0))
    n = len(cpus) if n is None else n
    if not 1 <= n <= len(cpus):
        raise SystemExit(f"--threads must be in [1, {len(cpus)}] (the CPUs available), got {n}.")
    os.sched_setaffinity(0, cpus[:n])
    import torch

    torch.set_num_threads(n)
    return n


class RssSampler:
    """Samples the process's resident set size in a thread; `peak_since(mark)` reads the peak."""

    def __init__(self, interval: float = 0.02):
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._interval = interval
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._peak = max(self._peak, self.rss())

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def reset(self) -> int:
        """Starts a new peak window; returns the RSS now."""
        self._peak = now = self.rss()
        return now

    def peak(self) -> int:
        return max(self._peak, self.rss())


@dataclasses.dataclass
class Measured:
    seconds: list[float]
    memory: int | None = None  # bytes: step peak above the state (CPU) or device peak (GPU)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


class Runner:
    """Runs step functions round-robin and records median times and peak memory."""

    def __init__(self, gpu: bool, warmup: int, reps: int):
        self.gpu = gpu
        self.warmup = warmup
        self.reps = reps
        self.rss = None if gpu else RssSampler().start()

    def measure(
        self, fns: dict[str, Callable[[], Any]], reps: int | None = None
    ) -> dict[str, Measured]:
        results = {k: Measured([]) for k in fns}
        for key, fn in fns.items():  # warm-up (the first call also measures memory)
            before = self._reset_memory(key)
            fn()
            results[key].memory = self._peak_memory(key, before)
            for _ in range(self.warmup - 1):
                fn()
        for key, seconds in interleaved(fns, reps or self.reps).items():
            results[key].seconds = seconds
        return results

    def _reset_memory(self, key: str) -> int:
        if not self.gpu:
            malloc_trim()  # so that memory freed by earlier steps does not hide this one's
            return self.rss.reset()
        if key.startswith("timm"):
            import torch

            torch.cuda.reset_peak_memory_stats()
        return 0

    def _peak_memory(self, key: str, before: int) -> int | None:
        if not self.gpu:
            return self.rss.peak() - before
        if key.startswith("timm"):
            import torch

            return torch.cuda.max_memory_allocated()
        return None  # JAX's device peak is process-wide; the table gives XLA's plan instead


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each (warmed-up) function, called in turn round after round, so that
    load from elsewhere on a shared machine hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def malloc_trim() -> None:
    """Returns the C heap's free memory to the OS (glibc), so RSS growth measures a step."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def xla_flops(lowered: Any) -> float | None:
    """FLOPs XLA counts for a lowered function (a multiply-add is 2), before optimisation."""
    try:
        cost = lowered.cost_analysis()
    except Exception:  # a backend without HLO cost analysis
        return None
    if isinstance(cost, list):  # older JAX returned one dict per device
        cost = cost[0]
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    return flops or None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def xla_bytes(compiled: Any) -> int | None:
    """Bytes the compiled executable needs: arguments + outputs + temporaries - donated."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return int(total - m.alias_size_in_bytes)


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def mib(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:,.0f}"
