"""`python -m deit_jax.export`: a finished run's weights as a timm / Hugging Face Hub folder.

`export(weights, output)` and `register_timm_export(cls, fn)` (a model family that timm gains)
are `deit_jax.weights.timm_export`'s, where the folder's format is described; the command line
is `deit_jax.weights.cli`.
"""

from deit_jax.weights.cli import export_main as main
from deit_jax.weights.timm_export import TimmSpec, export, register_timm_export

__all__ = ["TimmSpec", "export", "main", "register_timm_export"]

if __name__ == "__main__":
    main()
