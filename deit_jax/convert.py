"""`python -m deit_jax.convert`: a PyTorch checkpoint (official DeiT, timm, open_clip, OpenAI,
transformers, or a folder from `python -m deit_jax.export`) into a deit_jax weights directory.

The conversion functions, for use from Python: `load_torch_checkpoint(path, name, **overrides)`,
`torch_to_flax(state_dict, name, **overrides)` and `flax_to_torch(variables, name)`. They live
in `deit_jax.weights` (`load`, with the formats in `timm_keys` and `clip`); the command line is
`deit_jax.weights.cli`.
"""

from deit_jax.weights.cli import convert_main as main
from deit_jax.weights.load import flax_to_torch, load_torch_checkpoint, torch_to_flax

__all__ = ["flax_to_torch", "load_torch_checkpoint", "main", "torch_to_flax"]

if __name__ == "__main__":
    main()
