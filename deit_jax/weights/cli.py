"""The weights commands: `python -m deit_jax.convert` (PyTorch to deit_jax) and `python -m
deit_jax.export` (deit_jax to a timm / Hub folder; a CLIP to open_clip or transformers), also
installed as `deit-jax-convert` and `deit-jax-export`.

  python -m deit_jax.convert --checkpoint deit_tiny_distilled_patch16_224-b40b3cf7.pth \\
      --model deit_tiny_distilled_patch16_224 --output /tmp/deit_ti_distilled
  python -m deit_jax.convert --checkpoint ~/clip-vit-base-patch32 --model clip_vit_b32 \\
      --output /tmp/clip_b32     # a transformers directory: its tokenizer is copied too
  python -m deit_jax.export --weights WORKDIR/weights --output DIR [--pth]
  python -m deit_jax.export --weights WORKDIR/weights --format open_clip --output F.safetensors
  python -m deit_jax.export --weights WORKDIR/weights --format transformers --output DIR

`convert` writes a deit_jax weights directory (an Orbax checkpoint and `deit_jax.json`) that
training and evaluation load with `config.init_from` or `config.teacher.checkpoint`. Its
`--checkpoint` may also be a folder written by `export`, whose config.json names the model and
its overrides: no --model needed. A problem with the files is one `error: ...` line (exit
code 1).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Callable

import jax
import numpy as np

from deit_jax.errors import CheckpointError, ConfigError, UserError
from deit_jax.weights import clip_export, directory, load
from deit_jax.weights.hf_clip import TOKENIZER_FILES, is_hf_dir
from deit_jax.weights.timm_export import PTH_FILE, export, read_folder

log = logging.getLogger(__name__)


def _run(command: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        command(args)
    except UserError as e:  # one line: the message says what to change
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


# --------------------------------------------------------------------------- convert


def _convert_args(argv: list[str] | None) -> argparse.Namespace:
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


def _convert(args: argparse.Namespace) -> None:
    overrides = {
        k: v for k, v in (("img_size", args.img_size), ("num_classes", args.num_classes)) if v
    }
    if args.quick_gelu is not None:
        overrides["quick_gelu"] = args.quick_gelu
    if os.path.exists(args.output):
        raise CheckpointError(f"{args.output!r} already exists; choose a new output directory.")
    if os.path.isdir(args.checkpoint) and not is_hf_dir(args.checkpoint):
        # A timm / Hub folder written by deit_jax.export: it names the model and its overrides.
        state_dict, args.model, saved = read_folder(args.checkpoint)
        overrides = {**saved, **overrides}
        variables = load.torch_to_flax(state_dict, args.model, **overrides)
    elif args.model is None:
        raise ConfigError("--model is required for a checkpoint file or a transformers directory")
    else:
        # For CLIP, the file's sizes and activation join the overrides, recorded so that
        # create_model(name, **overrides) rebuilds exactly the converted model.
        variables, overrides = load.load_with_overrides(args.checkpoint, args.model, **overrides)
    directory.save_variables(
        args.output, variables, model_name=args.model, model_overrides=overrides
    )
    if load.is_clip(args.model) and is_hf_dir(args.checkpoint):
        os.makedirs(os.path.join(args.output, "tokenizer"))
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(args.checkpoint, name)):
                shutil.copy(
                    os.path.join(args.checkpoint, name), os.path.join(args.output, "tokenizer")
                )
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables))
    log.info(
        "Wrote %s (%s, %s values) to %s", args.checkpoint, args.model, f"{count:,}", args.output
    )


def convert_main(argv: list[str] | None = None) -> None:
    """`python -m deit_jax.convert` (`deit-jax-convert`)."""
    _run(_convert, _convert_args(argv))


# --------------------------------------------------------------------------- export


def _export_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m deit_jax.export",
        description="Export a deit_jax weights directory as a timm / Hugging Face Hub folder, "
        "or a CLIP as an open_clip file or a transformers CLIPModel directory.",
    )
    parser.add_argument("--weights", required=True, help="WORKDIR/weights of a finished run")
    parser.add_argument(
        "--format",
        choices=clip_export.FORMATS,
        default="timm",
        help="timm (DeiT, convnets; default), open_clip or transformers (CLIP)",
    )
    parser.add_argument(
        "--output",
        required=True,
        help="folder to write (must not exist); for open_clip the weights file (.safetensors)",
    )
    parser.add_argument(
        "--pth", action="store_true", help=f"timm: also write {PTH_FILE} for the official DeiT code"
    )
    parser.add_argument(
        "--metrics",
        default=None,
        help="timm: metrics.jsonl for the model card (default: beside it)",
    )
    return parser.parse_args(argv)


def _export(args: argparse.Namespace) -> None:
    clip_export.check_format(args.weights, args.format)
    if args.format != "timm" and (args.pth or args.metrics):
        flag = "--pth" if args.pth else "--metrics"
        raise ConfigError(f"{flag} is for --format timm only; drop it for --format {args.format}.")
    if args.format == "open_clip":
        out, config = clip_export.export_open_clip(args.weights, args.output)
        name = os.path.basename(os.path.splitext(out)[0])
        print(
            f"Wrote {out} and {config}; load them with open_clip.add_model_config('{config}'); "
            f"open_clip.create_model('{name}', pretrained='{out}')"
        )
    elif args.format == "transformers":
        out = clip_export.export_transformers(args.weights, args.output)
        print(f"Wrote {out}; load it with transformers.CLIPModel.from_pretrained('{out}')")
    else:
        out = export(args.weights, args.output, pth=args.pth, metrics=args.metrics)
        print(f"Wrote {out}; load it with timm.create_model('local-dir:{out}', pretrained=True)")


def export_main(argv: list[str] | None = None) -> None:
    """`python -m deit_jax.export` (`deit-jax-export`)."""
    _run(_export, _export_args(argv))
