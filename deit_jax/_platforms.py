"""Keep JAX off the TPU and GPU backends on hosts that have neither, before JAX initialises its
backends.

libtpu is installed with the test extra so that `mode=plan` can compile for a TPU slice on a CPU
host. Installed, it makes every JAX process try the TPU backend first: on a host without a TPU,
libtpu prints warnings (TPU_ACCELERATOR_TYPE, TPU_WORKER_HOSTNAMES) to stderr before JAX falls
back to the CPU, and takes /tmp/libtpu_lockfile for the life of the process, so that a second
process that needs libtpu (a plan, another test worker) is refused. JAX's CUDA plugin (for GPU
plans) likewise logs that it found no CUDA driver. `skip_absent_accelerators` restricts JAX to the
CPU on such a host; compile-only devices (`jax.experimental.topologies`) still work in the same
process, since they load libtpu or the plugin directly, not as a backend.

Hosts with a TPU or a GPU, and users who chose `JAX_PLATFORMS`, are left as they were.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
from pathlib import Path

# PCI ids of TPU chips (vendor Google); the ones jax._src.hardware_utils knows, as of jax 0.10.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}
# Device nodes: TPU v2-v4 (/dev/accel*), TPU v5e and later (/dev/vfio/<group>), NVIDIA, AMD.
_TPU_NODES = ("/dev/accel*", "/dev/vfio/[0-9]*")
_GPU_NODES = ("/dev/nvidia[0-9]*", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def tpu_present() -> bool:
    """Whether this host may have a TPU: a TPU device node or a TPU chip on the PCI bus."""
    if any(glob.glob(pattern) for pattern in _TPU_NODES):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if Path(vendor).read_text().strip() != _GOOGLE_PCI_VENDOR:
                continue
            device = (Path(vendor).parent / "device").read_text().strip()
        except OSError:
            continue
        if device in _TPU_PCI_DEVICES:
            return True
    return False


def gpu_present() -> bool:
    return any(glob.glob(pattern) for pattern in _GPU_NODES)


def cuda_plugin_installed() -> bool:
    """Whether JAX's CUDA plugin (jax-cuda12-plugin or jax-cuda13-plugin) is installed."""
    for name in ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13"):
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except ModuleNotFoundError:  # no jax_plugins namespace at all
            pass
    return False


def skip_absent_accelerators() -> bool:
    """Restricts JAX to the CPU when libtpu or JAX's CUDA plugin is installed on a host with no
    accelerator.

    Call it before anything initialises JAX's backends (`deit_jax/__init__.py` does). Returns
    whether it changed the platforms. Sets `JAX_PLATFORMS=cpu` (inherited by child processes,
    which would decide the same) or, when JAX is already imported, `jax_platforms`.
    """
    if os.environ.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in os.environ:
        return False
    tpu_library = importlib.util.find_spec("libtpu") or os.environ.get("TPU_LIBRARY_PATH")
    if not tpu_library and not cuda_plugin_installed():
        return False
    if tpu_present() or gpu_present():
        return False
    jax = sys.modules.get("jax")
    if jax is None:
        os.environ["JAX_PLATFORMS"] = "cpu"
        return True
    if jax.config.jax_platforms:
        return False
    jax.config.update("jax_platforms", "cpu")
    return True
