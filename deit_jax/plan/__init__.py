"""Plan a run before renting the hardware: compile its step for a TPU slice or a GPU node on a
host that has neither, and read the memory, FLOPs and roofline time per device XLA reports.

`targets` names the hardware and gives compile-only devices and a mesh over them; `compile`
compiles a step for them and turns XLA's analyses into a report.
"""

from deit_jax.plan.compile import compile_step, fits, largest_batch_that_fits, roofline
from deit_jax.plan.targets import Chip, Target, compile_devices, parse_target, plan_mesh

__all__ = [
    "Chip",
    "Target",
    "compile_devices",
    "compile_step",
    "fits",
    "largest_batch_that_fits",
    "parse_target",
    "plan_mesh",
    "roofline",
]
