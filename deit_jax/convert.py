"""PyTorch interop: official DeiT / timm checkpoints to Flax variables and back.

Flax modules in `deit_jax.models` are named after their timm counterparts, so one rule maps every
parameter, for DeiT and the convnet teachers alike:

  flax path                      torch key
  blocks_3/attn/qkv/kernel   ->  blocks.3.attn.qkv.weight   (Dense: transposed)
  patch_embed/proj/kernel    ->  patch_embed.proj.weight    (conv: HWIO -> OIHW)
  norm/scale                 ->  norm.weight
  s1/b1/conv1/bn/mean        ->  s1.b1.conv1.bn.running_mean (collection 'batch_stats')

CLIP models (`clip_*`) take open_clip / OpenAI files (also OpenAI's TorchScript `.pt`, read as
data) and transformers CLIP directories: `deit_jax.convert_clip`.

Command line (writes an Orbax checkpoint that training and evaluation load with `init_from`):

  python -m deit_jax.convert --checkpoint deit_tiny_distilled_patch16_224-b40b3cf7.pth \\
      --model deit_tiny_distilled_patch16_224 --output /tmp/deit_ti_distilled
  python -m deit_jax.convert --checkpoint ~/clip-vit-base-patch32 --model clip_vit_b32 \\
      --output /tmp/clip_b32     # a transformers directory: its tokenizer is copied too

`--checkpoint` may also be a folder written by `python -m deit_jax.export` (the other
direction), whose config.json names the model and its overrides: no --model needed.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import zipfile
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from deit_jax import _compat, checkpoint, convert_clip
from deit_jax.checkpoint import CheckpointMismatchError
from deit_jax.errors import CheckpointError, ConfigError, UserError, WeightsNotFoundError
from deit_jax.models import create_model, input_size, model_options

log = logging.getLogger(__name__)

_IGNORED_SUFFIXES = ("num_batches_tracked",)
_HEADS = ("head", "head_dist", "fc")  # classifier layers, re-initialised on a class-count change
_LEAF_TO_TORCH = {
    "scale": "weight",
    "kernel": "weight",
    "mean": "running_mean",
    "var": "running_var",
}


# --------------------------------------------------------------------------- position embeddings


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


# --------------------------------------------------------------------------- key mapping


def _torch_key(path: tuple[str, ...]) -> str:
    """('blocks_3', 'attn', 'qkv', 'kernel') -> 'blocks.3.attn.qkv.weight'."""
    *modules, leaf = path
    modules = [re.sub(r"^(.*)_(\d+)$", r"\1.\2", m) for m in modules]
    return ".".join([*modules, _LEAF_TO_TORCH.get(leaf, leaf)])


def _to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:  # OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    if leaf == "kernel" and value.ndim == 2:  # (out, in) -> (in, out)
        return value.T
    return value


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The model state dict inside an official DeiT checkpoint (`{"model": ...}`) or a plain one."""
    for wrapper in ("model", "state_dict"):
        inner = checkpoint.get(wrapper)
        if isinstance(inner, Mapping):
            return dict(inner)
    return dict(checkpoint)


def _template(model: nn.Module) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    h, w = input_size(model)
    channels = getattr(model, "in_chans", 3)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, h, w, channels), jnp.float32))
    )
    shapes = nn.meta.unbox(shapes)
    shapes.pop("intermediates", None)
    return traverse_util.flatten_dict(shapes)


def torch_to_flax(
    state_dict: Mapping[str, Any],
    model_name: str,
    *,
    rng: jax.Array | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Converts a PyTorch state dict (timm or official DeiT) into Flax variables for `model_name`.

    `overrides` are passed to `create_model`. With another `img_size`, position embeddings are
    resized as in the reference; with another `num_classes`, classifier heads are dropped and
    freshly initialised (from `rng`), with a warning. Any other missing, unexpected or mis-shaped
    key raises `CheckpointMismatchError` listing all of them.

    For a CLIP model, the state dict is open_clip's or transformers'; its sizes are read from the
    shapes (`overrides` win).
    """
    if is_clip(model_name):
        state = convert_clip.normalize_open_clip(unwrap_state_dict(state_dict))
        if any(k.startswith(("vision_model.", "text_model.")) for k in state):
            state = convert_clip.hf_to_open_clip(state)
        sizes = convert_clip.open_clip_overrides(state)
        return convert_clip.torch_to_flax(state, model_name, **{**sizes, **overrides})
    model = create_model(model_name, **overrides)
    template = _template(model)
    source = {
        k: v for k, v in unwrap_state_dict(state_dict).items() if not k.endswith(_IGNORED_SUFFIXES)
    }
    converted: dict[tuple[str, ...], np.ndarray] = {}
    missing, mismatched, reinit = [], [], []
    for path, spec in template.items():
        key = _torch_key(path[1:])
        if key not in source:
            missing.append(key)
            continue
        value = _to_flax_layout(path[-1], _as_numpy(source.pop(key)))
        if value.shape != spec.shape and path[-1] == "pos_embed":
            prefix = getattr(model, "num_pos_prefix_tokens", 1)
            rows = value.shape[1] - prefix
            if value.shape[-1] == spec.shape[-1] and round(rows**0.5) ** 2 == rows:
                value = resize_pos_embed(value, model.grid_size, prefix)
        if value.shape != spec.shape and path[1] in _HEADS and value.shape[-1] != spec.shape[-1]:
            reinit.append(path)
            continue
        if value.shape != spec.shape:
            mismatched.append(f"{key}: checkpoint {value.shape} vs model {spec.shape}")
            continue
        converted[path] = value.astype(spec.dtype)

    error = checkpoint.state_dict_mismatch(
        model_name,
        overrides,
        missing,
        list(source),
        mismatched,
        "Check that --model names the architecture the checkpoint was trained with.",
    )
    if error is not None:
        raise error

    if reinit:
        log.warning(
            "Class count changed to %s: re-initialising %s from scratch.",
            overrides.get("num_classes"),
            ", ".join(sorted({_torch_key(p[1:]).rsplit(".", 1)[0] for p in reinit})),
        )
        h, w = input_size(model)
        fresh = nn.meta.unbox(
            model.init(
                jax.random.key(0) if rng is None else rng,
                jnp.zeros((1, h, w, getattr(model, "in_chans", 3))),
            )
        )
        fresh = traverse_util.flatten_dict(fresh)
        for path in reinit:
            converted[path] = np.asarray(fresh[path])

    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in converted.items()})


def flax_to_torch(variables: Mapping[str, Any], model_name: str | None = None) -> dict[str, Any]:
    """Converts Flax variables to a PyTorch state dict (torch tensors) that timm's model loads.

    `model_name`, when given, checks first that the variables fit that registered model. CLIP
    variables give an open_clip state dict (`convert_clip.flax_to_hf` gives transformers').
    """
    if "visual" in variables.get("params", {}):
        return convert_clip.flax_to_open_clip(variables)
    torch = _compat.import_torch()
    flat = traverse_util.flatten_dict(nn.meta.unbox(dict(variables)))
    flat = {k: v for k, v in flat.items() if k[0] in ("params", "batch_stats")}
    if model_name is not None:
        template = _template(create_model(model_name))
        bad = sorted(
            "/".join(k) for k in set(template) ^ set(flat) if k[0] in ("params", "batch_stats")
        )
        bad += ["/".join(k) for k in flat if k in template and flat[k].shape != template[k].shape]
        if bad:
            raise CheckpointMismatchError(f"Variables do not fit {model_name!r}: {', '.join(bad)}")
    state_dict: dict[str, Any] = {}
    for path, value in flat.items():
        key = _torch_key(path[1:])
        array = np.array(_to_torch_layout(path[-1], np.asarray(value)), order="C", copy=True)
        state_dict[key] = torch.from_numpy(array)
        if path[0] == "batch_stats" and path[-1] == "var":
            prefix = key.rsplit(".", 1)[0]
            state_dict[f"{prefix}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return state_dict


# --------------------------------------------------------------------------- files


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a `.pth`/`.pt`/`.bin` (never executing pickled code) or `.safetensors` file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsNotFoundError(
            f"Checkpoint {path!r} does not exist. Download the official DeiT or timm weights "
            "(a .pth or .safetensors file) and pass its local path."
        )
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"Could not read {path!r} as safetensors ({e}); the file is truncated or corrupt: "
                "download it again."
            ) from e
    torch = _compat.import_torch()
    try:
        # Checkpoints written by the official training script also pickle its argparse.Namespace,
        # which holds plain values only; everything else outside tensors is refused.
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"Could not read {path!r} as a PyTorch checkpoint ({type(e).__name__}: {e}). The file "
            "is truncated or corrupt, or holds pickled objects other than tensors (refused: "
            "loading is done with weights_only=True)."
        ) from e
    except Exception as e:  # pickle.UnpicklingError from the weights_only unpickler
        raise CheckpointError(_refusal(path, e)) from None
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path!r} holds a {type(checkpoint).__name__}, not a state dict.")
    return unwrap_state_dict(checkpoint)


def _refusal(path: str, error: Exception) -> str:
    """One line for a pickle the weights-only unpickler refused, without torch's advice to load
    it with weights_only=False (which would run the file's code)."""
    text = str(error)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        what = f"asks for {found[1]}"
    else:  # torch's message: its advice, the reason, a link to its docs; keep the reason
        parts = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
        reasons = [p for p in parts if "weights_only" not in p and "documentation" not in p]
        what = "holds objects other than tensors" + (f" ({reasons[0]})" if reasons else "")
    return (
        f"Refused to load {path!r}: its pickle {what}, which is not part of a state dict. deit_jax "
        "never runs code from a weights file (it reads them with torch.load(weights_only=True)); "
        "use a .safetensors or plain state-dict copy of these weights."
    )


def is_clip(model_name: str) -> bool:
    """Whether `model_name` is a CLIP (its weights convert through `deit_jax.convert_clip`)."""
    return "text_width" in model_options(model_name)


def inferred_overrides(path: str | os.PathLike, model_name: str) -> dict[str, Any]:
    """What a PyTorch file or transformers directory says about the model, as `create_model`
    overrides: a CLIP's sizes and activation; nothing for the DeiT models and convnets."""
    if not is_clip(model_name):
        return {}
    if convert_clip.is_hf_dir(path):
        return convert_clip.hf_overrides(convert_clip.hf_config(path))
    return convert_clip.read_weights(path)[1]


def load_torch_checkpoint(
    path: str | os.PathLike, model_name: str, **overrides: Any
) -> dict[str, Any]:
    """Reads a PyTorch checkpoint file and converts it with `torch_to_flax`.

    For a CLIP model, `path` may also be a transformers CLIP directory or an OpenAI TorchScript
    archive, and the file's `inferred_overrides` apply first (`overrides` win).
    """
    return load_with_overrides(path, model_name, **overrides)[0]


def load_with_overrides(
    path: str | os.PathLike, model_name: str, **overrides: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`load_torch_checkpoint`, also returning the overrides the model was built with (the
    file's `inferred_overrides` updated by `overrides`), reading the file once."""
    if is_clip(model_name):
        state, inferred = convert_clip.read_weights(path)
        overrides = {**inferred, **overrides}
        return convert_clip.torch_to_flax(state, model_name, **overrides), overrides
    return torch_to_flax(read_state_dict(path), model_name, **overrides), overrides


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m deit_jax.convert",
        description="Convert an official DeiT / timm PyTorch checkpoint into an Orbax checkpoint.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help=".pth, .pt, .bin or .safetensors file, a folder from python -m deit_jax.export, or "
        "(CLIP) a transformers model directory",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="registered model name, e.g. deit_tiny_patch16_224 (an exported folder names it)",
    )
    parser.add_argument(
        "--output", required=True, help="directory for the Orbax checkpoint (must not exist)"
    )
    parser.add_argument(
        "--img-size", type=int, default=None, help="resize position embeddings to this size"
    )
    parser.add_argument(
        "--num-classes", type=int, default=None, help="re-initialise heads for this many classes"
    )
    parser.add_argument(
        "--quick-gelu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CLIP: QuickGELU (OpenAI's weights) or exact GELU, when the file does not say",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = _parse_args(argv)
    try:
        _convert(args)
    except UserError as e:  # one line: the message says what to change
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def _convert(args: argparse.Namespace) -> None:
    overrides = {
        k: v for k, v in (("img_size", args.img_size), ("num_classes", args.num_classes)) if v
    }
    if args.quick_gelu is not None:
        overrides["quick_gelu"] = args.quick_gelu
    if os.path.exists(args.output):
        raise CheckpointError(f"{args.output!r} already exists; choose a new output directory.")
    if os.path.isdir(args.checkpoint) and not convert_clip.is_hf_dir(args.checkpoint):
        # A timm / Hub folder written by deit_jax.export: it names the model and its overrides.
        from deit_jax.export import read_folder

        state_dict, args.model, saved = read_folder(args.checkpoint)
        overrides = {**saved, **overrides}
        variables = torch_to_flax(state_dict, args.model, **overrides)
    elif args.model is None:
        raise ConfigError("--model is required for a checkpoint file or a transformers directory")
    else:
        # For CLIP, the file's sizes and activation join the overrides, recorded so that
        # create_model(name, **overrides) rebuilds exactly the converted model.
        variables, overrides = load_with_overrides(args.checkpoint, args.model, **overrides)
    checkpoint.save_variables(
        args.output, variables, model_name=args.model, model_overrides=overrides
    )
    if is_clip(args.model) and convert_clip.is_hf_dir(args.checkpoint):
        os.makedirs(os.path.join(args.output, "tokenizer"))
        for name in convert_clip.TOKENIZER_FILES:
            if os.path.isfile(os.path.join(args.checkpoint, name)):
                shutil.copy(
                    os.path.join(args.checkpoint, name), os.path.join(args.output, "tokenizer")
                )
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables))
    log.info(
        "Wrote %s (%s, %s values) to %s", args.checkpoint, args.model, f"{count:,}", args.output
    )


if __name__ == "__main__":
    main()
