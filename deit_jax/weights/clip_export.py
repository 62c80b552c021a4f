"""A deit_jax CLIP where CLIP users work: an open_clip weights file with its model config, or a
transformers `CLIPModel` directory with its tokenizer.

  python -m deit_jax.export --weights RUN/weights --format open_clip --output OUT/s.safetensors
  python -m deit_jax.export --weights RUN/weights --format transformers --output OUT/s_hf

- `open_clip`: the state dict (`deit_jax.weights.clip.flax_to_open_clip`) as `.safetensors`
  (or, for `.bin` / `.pt` / `.pth`, `torch.save` of plain tensors) and, beside it, `<stem>.json`:
  open_clip's own model config (`embed_dim`, `vision_cfg`, `text_cfg`, `quick_gelu`), the format
  of its built-in `model_configs/*.json`. open_clip 3.3.0 registers such a file with
  `add_model_config(path)` under its stem, so that `create_model("<stem>", pretrained=FILE)` builds
  the model and loads the file strictly. The activation must travel in the config: open_clip
  builds exact GELU unless `quick_gelu` says otherwise, and a mismatch is silent.
- `transformers`: `save_pretrained` of a `CLIPModel` (config.json, model.safetensors), the
  tokenizer files `CLIPTokenizer.from_pretrained` reads, and `preprocessor_config.json` (the run's
  eval resize, crop, mean and std) so that `CLIPProcessor.from_pretrained` works too. `hidden_act`
  follows the model's `quick_gelu`; `eos_token_id` is `vocab_size - 1`, so that transformers pools
  at the first end-of-text token, where deit_jax's and open_clip's argmax(ids) pools. The
  tokenizer is the student's: the files of the transformers directory it was converted from
  (its weights' `tokenizer/`, or that of the run's `init_from`), else open_clip's BPE written as
  vocab.json + merges.txt (OpenAI's vocabulary; the ids are open_clip's).

Both are loaded back into the target library strictly before they are written, and are written
beside the output and renamed into place, so an interrupted export leaves nothing at `--output`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from typing import Any

from deit_jax import _compat
from deit_jax.errors import CheckpointError, ConfigError, DependencyError
from deit_jax.models import create_model
from deit_jax.models.clip import CLIP, CLIP_MEAN, CLIP_STD
from deit_jax.weights import directory
from deit_jax.weights.clip import flax_to_hf, flax_to_open_clip
from deit_jax.weights.hf_clip import TOKENIZER_FILES
from deit_jax.weights.load import is_clip
from deit_jax.weights.timm_export import OutputExistsError
from deit_jax.weights.tokenizer import tokenizer_spec

log = logging.getLogger(__name__)

FORMATS = ("timm", "open_clip", "transformers")
OPEN_CLIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # PIL's codes, as transformers saves them


def check_format(weights: str, fmt: str) -> None:
    """Refuses, in one line, a `--format` that does not fit the model of `weights` (read from
    its deit_jax.json only, before any array is loaded). A missing or partial directory passes
    here and is reported by the loader."""
    meta_path = os.path.join(weights, directory.METADATA_FILE)
    if not os.path.isfile(meta_path):
        return
    with open(meta_path) as f:
        name = json.load(f)["model_name"]
    if fmt == "timm" and is_clip(name):
        raise ConfigError(
            f"--format timm (the default): {name!r} is a CLIP, which timm does not build; use "
            "--format open_clip --output FILE.safetensors or --format transformers --output DIR."
        )
    if fmt != "timm" and not is_clip(name):
        raise ConfigError(
            f"--format {fmt}: {name!r} is not a CLIP; export it with --format timm (the default)."
        )


def _load(weights: str) -> tuple[dict[str, Any], dict[str, Any], CLIP]:
    """The variables, the metadata and the resolved module of a CLIP weights directory."""
    variables, meta = directory.load_variables(weights)
    # JSON lists back to tuples (Flax module attributes), as the timm export reads them.
    overrides = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in (meta.get("model_overrides") or {}).items()
    }
    model = create_model(meta["model_name"], **overrides)
    if not isinstance(model, CLIP):
        raise ConfigError(f"--format: {meta['model_name']!r} is not a CLIP; use --format timm.")
    return variables, meta, model


def _heads(model: CLIP) -> tuple[int, int]:
    return (
        model.vision_heads or max(model.vision_width // 64, 1),
        model.text_heads or max(model.text_width // 64, 1),
    )


def open_clip_config(model: CLIP) -> dict[str, Any]:
    """open_clip's model config (`model_configs/*.json` format) of a deit_jax CLIP."""
    vision_heads, text_heads = _heads(model)
    return {
        "embed_dim": model.embed_dim,
        "quick_gelu": bool(model.quick_gelu),
        "vision_cfg": {
            "image_size": model.img_size,
            "patch_size": model.patch_size,
            "width": model.vision_width,
            "layers": model.vision_layers,
            "head_width": model.vision_width // vision_heads,  # open_clip: heads = width / this
            "mlp_ratio": model.mlp_ratio,
        },
        "text_cfg": {
            "context_length": model.context_length,
            "vocab_size": model.vocab_size,
            "width": model.text_width,
            "heads": text_heads,
            "layers": model.text_layers,
            "mlp_ratio": model.mlp_ratio,
        },
    }


def _fresh(*paths: str) -> None:
    for path in paths:
        if os.path.exists(path):
            raise OutputExistsError(
                f"{path!r} already exists; choose a new --output (or delete it)."
            )


def _check(result: Any, weights: str, target: str) -> None:
    """A strict load's outcome (torch's `_IncompatibleKeys`), as one error naming every key."""
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"The weights in {weights!r} do not fit {target}: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}."
        )


def export_open_clip(weights: str | os.PathLike, output: str | os.PathLike) -> tuple[str, str]:
    """Writes the open_clip weights file `output` and its model config `<stem>.json` beside it;
    returns both paths."""
    weights, output = os.path.abspath(os.fspath(weights)), os.path.abspath(os.fspath(output))
    stem, suffix = os.path.splitext(output)
    if suffix not in OPEN_CLIP_SUFFIXES:
        raise ConfigError(
            f"--output {output!r}: --format open_clip writes one weights file; end its name with "
            f"{' or '.join(OPEN_CLIP_SUFFIXES)} (.safetensors preferred)."
        )
    config_path = f"{stem}.json"
    _fresh(output, config_path)
    variables, meta, model = _load(weights)
    config = open_clip_config(model)
    data = meta.get("data") or {}
    mean, std = tuple(data.get("mean", CLIP_MEAN)), tuple(data.get("std", CLIP_STD))
    if (mean, std) != (CLIP_MEAN, CLIP_STD):
        # open_clip's model config holds no preprocessing: its transforms default to CLIP's.
        log.warning(
            "The run normalised images with mean %s, std %s, not CLIP's (open_clip's default): "
            "pass image_mean=%s, image_std=%s to open_clip.create_model_and_transforms.",
            mean, std, mean, std,
        )  # fmt: skip
    state = flax_to_open_clip(variables)
    torch, open_clip = _compat.import_torch(), _import("open_clip", "open_clip_torch")
    with torch.device("cpu"):
        reference = open_clip.model.CLIP(**config)
    # strict, as open_clip's create_model(pretrained=...) loads it
    _check(reference.load_state_dict(state, strict=False), weights, "open_clip's CLIP")

    os.makedirs(os.path.dirname(output), exist_ok=True)
    partial, config_partial = (f"{p}.partial-{os.getpid()}" for p in (output, config_path))
    try:
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, partial)
        else:
            torch.save(state, partial)
        with open(config_partial, "w") as f:
            json.dump(config, f, indent=2)
        os.replace(partial, output)
        os.replace(config_partial, config_path)
    finally:
        for path in (partial, config_partial):
            if os.path.exists(path):
                os.remove(path)
    log.info("Exported %s as open_clip weights %s with config %s", weights, output, config_path)
    return output, config_path


def hf_clip_config(model: CLIP) -> dict[str, Any]:
    """transformers' `CLIPConfig` arguments of a deit_jax CLIP."""
    vision_heads, text_heads = _heads(model)
    act = "quick_gelu" if model.quick_gelu else "gelu"  # transformers' "gelu" is the exact erf

    def tower(width: int, layers: int, heads: int, **own: Any) -> dict[str, Any]:
        return dict(
            hidden_size=width,
            intermediate_size=int(width * model.mlp_ratio),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            hidden_act=act,
            layer_norm_eps=1e-5,
            **own,
        )

    return dict(
        projection_dim=model.embed_dim,
        text_config=tower(
            model.text_width,
            model.text_layers,
            text_heads,
            max_position_embeddings=model.context_length,
            vocab_size=model.vocab_size,
            bos_token_id=model.vocab_size - 2,
            eos_token_id=model.vocab_size - 1,  # first end-of-text = argmax(ids): see the docstring
        ),
        vision_config=tower(
            model.vision_width,
            model.vision_layers,
            vision_heads,
            image_size=model.img_size,
            patch_size=model.patch_size,
            num_channels=3,
        ),
    )


def export_transformers(weights: str | os.PathLike, output: str | os.PathLike) -> str:
    """Writes a transformers `CLIPModel` directory (with tokenizer and image processor) of the
    CLIP weights directory `weights` to `output`; returns `output`."""
    weights, output = os.path.abspath(os.fspath(weights)), os.path.abspath(os.fspath(output))
    _fresh(output)
    variables, meta, model = _load(weights)
    torch, transformers = _compat.import_torch(), _import("transformers", "transformers")
    with torch.device("cpu"):
        hf = transformers.CLIPModel(transformers.CLIPConfig(**hf_clip_config(model)))
    _check(hf.load_state_dict(flax_to_hf(variables), strict=False), weights, "CLIPModel")
    partial = f"{output}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        hf.eval().save_pretrained(partial)
        _write_tokenizer(partial, _tokenizer_source(weights, meta), model.context_length)
        _image_processor(meta, model, transformers).save_pretrained(partial)
        os.replace(partial, output)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("Exported %s as a transformers CLIPModel directory %s", weights, output)
    return output


def _tokenizer_source(weights: str, meta: dict[str, Any]) -> str | None:
    """The transformers directory whose tokenizer the student used, or None (open_clip's BPE):
    the weights' own `tokenizer/`, else that of the run's `init_from` (as training chose it)."""
    spec = tokenizer_spec(weights)
    init_from = (meta.get("config") or {}).get("init_from")
    if spec[0] == "open_clip" and init_from:
        if os.path.exists(init_from):
            spec = tokenizer_spec(init_from)
        else:
            log.warning("init_from %r is gone: writing open_clip's tokenizer.", init_from)
    return spec[1] if spec[0] == "transformers" else None


def _write_tokenizer(out: str, source: str | None, context_length: int) -> None:
    if source is not None:
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copy(os.path.join(source, name), out)
        return
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    # OpenAI's vocabulary is open_clip's encoder, whose two special tokens open_clip renames
    # (OpenAI's and the hub's vocab.json: <|startoftext|>, <|endoftext|>); merges in rank order.
    reference = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(k, k): v for k, v in reference.encoder.items()}
    merges = sorted(reference.bpe_ranks, key=reference.bpe_ranks.get)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(tmp, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        tokenizer = CLIPTokenizer(
            os.path.join(tmp, "vocab.json"),
            os.path.join(tmp, "merges.txt"),
            model_max_length=context_length,
        )
        tokenizer.save_pretrained(out)
        for name in ("vocab.json", "merges.txt"):  # CLIPTokenizer's files, whatever it saved
            shutil.copy(os.path.join(tmp, name), out)


def _image_processor(meta: dict[str, Any], model: CLIP, transformers: Any) -> Any:
    """The run's eval preprocessing (resize the short side to size / crop_pct, centre crop);
    CLIP's own (crop_pct 1, CLIP's mean and std) for weights without a recorded run."""
    data = meta.get("data") or {}
    crop_pct = data.get("crop_pct", 1.0)
    return transformers.CLIPImageProcessor(
        size={"shortest_edge": math.floor(model.img_size / crop_pct)},
        crop_size={"height": model.img_size, "width": model.img_size},
        resample=_RESAMPLE.get(data.get("interpolation", "bicubic"), 3),
        image_mean=list(data.get("mean", CLIP_MEAN)),
        image_std=list(data.get("std", CLIP_STD)),
    )


def _import(module: str, package: str) -> Any:
    try:
        return __import__(module)
    except ImportError as e:
        raise DependencyError(
            f"--format {module} needs {package}: pip install -e '.[torch]'."
        ) from e
