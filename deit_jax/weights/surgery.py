"""Weights meeting a model of another shape: position embeddings resized, heads made afresh.

The one place where pretrained weights are changed to fit the model that loads them, for a
PyTorch checkpoint (`deit_jax.weights.timm_keys`) and for `config.init_from`
(`deit_jax.train.state`) alike:

- DeiT / DeiT III `pos_embed` for another image size: the token rows kept, the patch grid
  resized as the reference fine-tuning code does (`resize_pos_embed`);
- classifier heads (`head`, `head_dist` of DeiT, `fc` of the convnets, RegNet's `head/fc`) for
  another class count: left to the model's fresh initialisation.

CLIP weights are never resized: a CLIP runs at the resolution of its weights.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

# Classifier layers, the first name of their Flax path (below the collection).
HEADS = ("head", "head_dist", "fc")


def _bicubic_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
    """(out, in) matrix of PyTorch's bicubic `F.interpolate(align_corners=False)` along one axis.

    PyTorch uses the cubic convolution kernel with a = -0.75 (not -0.5 as `jax.image.resize`),
    does not clamp negative source coordinates, and clamps the tap indices at the borders.
    """

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    matrix = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for i in range(out_size):
        src = scale * (i + 0.5) - 0.5
        base = int(np.floor(src))
        t = src - base
        weights = (far(t + 1), near(t), near(1 - t), far(2 - t))
        for k, wk in enumerate(weights):
            matrix[i, min(max(base - 1 + k, 0), in_size - 1)] += wk
    return matrix


def resize_pos_embed(
    pos_embed: np.ndarray | jax.Array,
    new_grid: tuple[int, int],
    num_prefix_tokens: int,
    old_grid: tuple[int, int] | None = None,
) -> np.ndarray:
    """Resizes (1, prefix + gh*gw, D) position embeddings to another patch grid.

    Follows the reference fine-tuning code: keep the class/distillation rows, reshape the rest to
    the grid, resize bicubically as `F.interpolate(mode="bicubic", align_corners=False)`, and
    concatenate back. `old_grid` defaults to a square grid. `num_prefix_tokens` counts the
    token rows of `pos_embed`: 1 or 2 for DeiT, 0 for DeiT III (`no_embed_class`).
    """
    pos_embed = np.asarray(pos_embed)
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[0, num_prefix_tokens:]
    if old_grid is None:
        side = int(round(np.sqrt(grid.shape[0])))
        if side * side != grid.shape[0]:
            raise ValueError(f"{grid.shape[0]} grid rows are not a square; pass old_grid=(h, w).")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != grid.shape[0]:
        raise ValueError(f"old_grid {old_grid} does not match {grid.shape[0]} position rows.")
    grid = grid.reshape(*old_grid, -1).astype(np.float64)
    rows = _bicubic_matrix(old_grid[0], new_grid[0])
    cols = _bicubic_matrix(old_grid[1], new_grid[1])
    resized = np.einsum("yh,hwd,xw->yxd", rows, grid, cols).reshape(1, -1, grid.shape[-1])
    return np.concatenate([prefix, resized.astype(pos_embed.dtype)], axis=1)


def fit(
    model: nn.Module, path: tuple[str, ...], value: np.ndarray, shape: tuple[int, ...]
) -> np.ndarray | None:
    """`value`, stored for another shape, fitted to `model`'s parameter at `path` (a params path
    without the collection): a resized `pos_embed`, None for a head of another class count (the
    model's fresh one is used), else `value` unchanged (the caller reports the mismatch)."""
    if path[-1] == "pos_embed":
        prefix = getattr(model, "num_pos_prefix_tokens", 1)
        rows = value.shape[1] - prefix
        if value.shape[-1] == shape[-1] and round(rows**0.5) ** 2 == rows:
            return resize_pos_embed(value, model.grid_size, prefix)
    if path[0] in HEADS and value.shape[-1] != shape[-1]:
        return None
    return value
