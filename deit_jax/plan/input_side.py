"""The input side of a plan: the host CPU cores the run's input pipeline needs to feed the
target at its images/s bound, beside the cores the target's host machine has.

The rate a core turns JPEGs into batches is measured here, on this host, by the run's own
augmentation (`deit_jax.data.host_throughput`); cloud hosts' cores differ from this one's, so
the count is an estimate to compare against the host's, not a promise.
"""

from __future__ import annotations

import math
import platform
import tempfile
from typing import Any

import ml_collections

from deit_jax.config import tasks
from deit_jax.data import host_throughput
from deit_jax.plan.targets import Target


def cpu_model() -> str:
    """This host's CPU, as /proc/cpuinfo names it (else what Python's platform says)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def input_side(
    config: ml_collections.ConfigDict, target: Target, images_per_second: float | None
) -> dict[str, Any] | None:
    """Measures the run's input pipeline on this host for `config.plan.input_seconds` and says
    the vCPUs a host of the target needs at `images_per_second` (None when not measured)."""
    seconds = float(config.plan.input_seconds)
    if seconds <= 0:
        return None
    mix = not tasks.task_of(config).captions  # image-caption pairs are not mixed
    with tempfile.TemporaryDirectory() as directory:
        paths = host_throughput.sample_jpegs(directory, num=64, seed=config.seed)
        rate = host_throughput.measure(config, paths, seconds=seconds, mix=mix)
    result: dict[str, Any] = {
        "images_per_cpu_second": rate.images_per_cpu_second,
        "measured": (
            f"by this plan on this host ({cpu_model()}): {rate.images} images in "
            f"{rate.cpu_seconds:.1f} CPU-seconds on one thread, the run's augmentation at "
            f"{rate.image_size[0]} x {rate.image_size[1]}" + (" with Mixup/CutMix" if mix else "")
            + f", from JPEGs of ImageNet's sizes ({rate.mean_jpeg_bytes / 1e3:.0f} KB on average)"
        ),
    }  # fmt: skip
    host = target.chip.host_for(target.num_devices)
    if images_per_second is None or host is None:
        return result
    hosts = max(1, math.ceil(target.num_devices / host.chips))
    per_host = images_per_second / hosts
    needed = math.ceil(per_host / rate.images_per_cpu_second)
    return result | {
        "host": host.machine,
        "hosts": hosts,
        "host_vcpus": host.vcpus,
        "images_per_second_per_host": per_host,
        "vcpus_needed_per_host": needed,
        "fraction_of_host_vcpus": needed / host.vcpus,
    }


def format_input(side: dict[str, Any] | None) -> str:
    """One row's text for the plan's table."""
    if side is None:
        return "- (not measured: --config.plan.input_seconds=20)"
    rate = f"{side['images_per_cpu_second']:.0f} img/s a core here"
    if "host" not in side:
        return rate
    return (
        f"{side['vcpus_needed_per_host']} vCPUs a host of {side['host_vcpus']} "
        f"({side['host']}, {100 * side['fraction_of_host_vcpus']:.0f}%) at "
        f"{side['images_per_second_per_host']:,.0f} img/s; {rate}"
    )
