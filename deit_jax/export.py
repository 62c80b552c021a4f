"""`python -m deit_jax.export`: a finished run's weights as a timm / Hugging Face Hub folder, or
(`--format open_clip` / `transformers`) a CLIP's as an open_clip file or a `CLIPModel` directory.

`export(weights, output)` and `register_timm_export(cls, fn)` (a model family that timm gains)
are `deit_jax.weights.timm_export`'s, where the folder's format is described;
`export_open_clip` and `export_transformers` are `deit_jax.weights.clip_export`'s; the command
line is `deit_jax.weights.cli`.
"""

from deit_jax.weights.cli import export_main as main
from deit_jax.weights.clip_export import export_open_clip, export_transformers
from deit_jax.weights.timm_export import TimmSpec, export, register_timm_export

__all__ = [
    "TimmSpec",
    "export",
    "export_open_clip",
    "export_transformers",
    "main",
    "register_timm_export",
]

if __name__ == "__main__":
    main()
