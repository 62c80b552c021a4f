"""A timm / Hugging Face Hub model folder from a deit_jax weights directory, and back.

  python -m deit_jax.export --weights WORKDIR/weights --output DIR [--pth]

writes, through timm's own `save_for_hf`:

- `model.safetensors`: the timm state dict;
- `config.json`: `architecture`, `num_classes`, `model_args` (the run's overrides: an overridden
  size such as the quickstart's 2-block, 32-wide DeiT), `pretrained_cfg` (the run's input size,
  interpolation, crop_pct, mean, std) and `label_names` where the data set has names, plus a
  `deit_jax` entry naming the deit_jax model, which `read_folder` (and so `python -m
  deit_jax.convert --checkpoint DIR`) reads to convert the folder back;
- `README.md`: a model card (data set, recipe, teacher, distillation kind, the run's final eval
  metrics from `WORKDIR/metrics.jsonl`);
- with `--pth`, `checkpoint.pth`: `{"model": state_dict}`, what the official DeiT code loads.

`timm.create_model("local-dir:DIR", pretrained=True)` then builds the model with no other
argument; `huggingface_hub.upload_folder(repo_id=..., folder_path=DIR)` publishes it, after
which `timm.create_model("hf-hub:USER/REPO", pretrained=True)` works the same. A distilled DeiT
loads as timm's `VisionTransformerDistilled` with both heads; in eval mode it returns their
average, as deit_jax's eval does.

Every registry model timm has exports: DeiT, distilled DeiT, DeiT III, any overridden size, and
the ResNet / RegNetY teachers. What timm lacks is refused, naming the model: `cnn_small`, and a
DeiT III given a distillation token (timm's distilled ViT has no DeiT III position embeddings).
A model family that timm gains (CLIP image towers) plugs in with `register_timm_export`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from deit_jax import _compat
from deit_jax.config.defaults import IMAGENET_MEAN, IMAGENET_STD
from deit_jax.errors import CheckpointError, UserError, WeightsNotFoundError
from deit_jax.models import DeiT, RegNet, ResNet, create_model, input_size, model_options
from deit_jax.weights import directory
from deit_jax.weights.state_dict import read_state_dict
from deit_jax.weights.timm_keys import flax_to_torch

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PTH_FILE = "checkpoint.pth"
# Training-time options that timm's inference model does not need (timm drops them too).
_TRAINING_ONLY = ("drop_rate", "attn_drop_rate", "drop_path_rate", "dtype", "param_dtype")


class ExportError(UserError, ValueError):
    """A model or weights directory that cannot be exported as a timm folder."""


class OutputExistsError(UserError, FileExistsError):
    """The export's output directory already exists."""


@dataclasses.dataclass(frozen=True)
class TimmSpec:
    """How timm builds a deit_jax model: `timm.create_model(architecture, **kwargs)`."""

    architecture: str
    kwargs: dict[str, Any]


# deit_jax model class -> function (registry name, resolved options) -> TimmSpec.
_EXPORTERS: dict[type[nn.Module], Callable[[str, dict[str, Any]], TimmSpec]] = {}


def register_timm_export(
    cls: type[nn.Module], fn: Callable[[str, dict[str, Any]], TimmSpec]
) -> None:
    """Makes models of class `cls` exportable: `fn(name, options)` returns their TimmSpec
    (`options`: the registry defaults with the weights' overrides applied)."""
    _EXPORTERS[cls] = fn


def _deit_spec(name: str, options: dict[str, Any]) -> TimmSpec:
    # Every architecture argument is passed explicitly, so the timm entry point only selects the
    # class: VisionTransformerDistilled (two heads) or VisionTransformer.
    distilled = bool(options["distilled"])
    if distilled and options["no_embed_class"]:
        # timm's VisionTransformerDistilled always gives pos_embed rows to both tokens.
        raise ExportError(
            f"{name!r} with a distillation token has no timm architecture: timm's distilled "
            "ViT has no DeiT III (no_embed_class) position embeddings. Export a DeiT III "
            "student without distilled=True, or a deit_* student."
        )
    if (name.startswith("deit_") and ("_distilled_" in name) == distilled) or (
        name.startswith("deit3_") and not distilled
    ):
        architecture = name
    else:  # e.g. a deit_* model with distilled=False, or one with an added token
        architecture = "deit_base_distilled_patch16_224" if distilled else "deit_base_patch16_224"
    size = options["img_size"]
    keys = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")
    kwargs = {k: options[k] for k in keys}
    kwargs |= {
        "num_classes": options["num_classes"],
        "img_size": size if isinstance(size, int) else tuple(size),
        "init_values": options["init_values"],
        "no_embed_class": bool(options["no_embed_class"]),
    }
    return TimmSpec(architecture, kwargs)


def _convnet_spec(name: str, options: dict[str, Any]) -> TimmSpec:
    # timm's ResNet / RegNet take the class and channel counts; the image size is data config.
    defaults = model_options(name)
    changed = sorted(
        k
        for k, v in options.items()
        if k not in ("num_classes", "in_chans", "img_size", *_TRAINING_ONLY) and v != defaults[k]
    )
    if changed:
        raise ExportError(
            f"{name!r} with overridden {', '.join(changed)} has no timm architecture (timm's "
            f"{name} fixes them); export the registered shape."
        )
    return TimmSpec(name, {"num_classes": options["num_classes"], "in_chans": options["in_chans"]})


register_timm_export(DeiT, _deit_spec)
register_timm_export(ResNet, _convnet_spec)
register_timm_export(RegNet, _convnet_spec)


def timm_spec(model_name: str, overrides: dict[str, Any]) -> TimmSpec:
    """The timm architecture and arguments of registry model `model_name` with `overrides`."""
    model = create_model(model_name, **overrides)
    fn = _EXPORTERS.get(type(model))
    if fn is None:
        families = ", ".join(sorted(c.__name__ for c in _EXPORTERS))
        raise ExportError(
            f"timm has no architecture for {model_name!r} ({type(model).__name__}); exportable "
            f"model classes: {families}. Its weights directory still works in deit_jax "
            "(init_from, teacher.checkpoint)."
        )
    options = {**model_options(model_name), **overrides}
    return fn(model_name, options)


# --------------------------------------------------------------------------- reading


def _data_config(meta: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """The run's eval preprocessing, or the DeiT defaults for weights dirs that predate it."""
    data = meta.get("data")
    if not data:
        log.warning(
            "The weights directory records no data config (written by an older deit_jax or by "
            "deit_jax.convert): exporting with the DeiT eval defaults (bicubic, crop_pct 0.875, "
            "ImageNet mean/std, the model's input size) and no class names."
        )
        data = {}
    h, w = input_size(model)
    size = data.get("img_size", (h, w))
    size = (size, size) if isinstance(size, int) else tuple(size)
    return {
        "input_size": (getattr(model, "in_chans", 3), *size),
        "interpolation": data.get("interpolation", "bicubic"),
        "crop_pct": data.get("crop_pct", 0.875),
        "crop_mode": "center",
        "mean": tuple(data.get("mean", IMAGENET_MEAN)),
        "std": tuple(data.get("std", IMAGENET_STD)),
    }


def final_metrics(path: str) -> dict[str, dict[str, float]]:
    """The last logged value of each eval metric in a metrics.jsonl, by prefix (`eval`, ...)."""
    found: dict[str, dict[str, float]] = {}
    if not os.path.isfile(path):
        return found
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # A line cut by a crash.
            for key, value in row.items():
                prefix, sep, metric = key.partition("/")
                if sep and prefix.startswith("eval"):
                    found.setdefault(prefix, {})[metric] = value
                    found[prefix]["step"] = row.get("step")
    return found


# --------------------------------------------------------------------------- writing


def _model_card(
    model_name: str, spec: TimmSpec, meta: dict[str, Any], metrics: dict, data_cfg: dict
) -> str:
    data, recipe = meta.get("data") or {}, meta.get("recipe") or {}
    unknown = "not recorded (older weights directory)"
    kind = recipe.get("distillation", unknown)
    teacher = recipe.get("teacher") or ("none" if kind == "none" else unknown)
    lines = [
        "---",
        "library_name: timm",
        "tags: [image-classification, timm, deit_jax]",
        "---",
        f"# {model_name} trained with deit_jax",
        "",
        "| | |",
        "|---|---|",
        f"| deit_jax model | `{model_name}` (overrides `{json.dumps(meta['model_overrides'])}`) |",
        f"| timm architecture | `{spec.architecture}` |",
        f"| data set | {data.get('name', unknown)} (train `{data.get('train_split', '?')}`, "
        f"eval `{data.get('eval_split', '?')}`) |",
        f"| input | {data_cfg['input_size']}, {data_cfg['interpolation']}, crop_pct "
        f"{data_cfg['crop_pct']}, mean {data_cfg['mean']}, std {data_cfg['std']} |",
        f"| distillation | {kind} |",
        f"| teacher | {teacher} |",
    ]
    if recipe:
        shown = {k: v for k, v in recipe.items() if k not in ("distillation", "teacher")}
        lines.append(f"| recipe | `{json.dumps(shown)}` |")
    lines += ["", "## Final evaluation", ""]
    if metrics:
        columns = ["top1", "top5", "real_top1", "real_top5", "count", "step"]
        lines += ["| eval set | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for prefix, values in sorted(metrics.items()):
            cells = [
                ("" if c not in values else f"{100 * values[c]:.2f}")
                if "top" in c
                else str(int(values[c]) if values.get(c) is not None else "")
                for c in columns
            ]
            lines.append(f"| {prefix} | " + " | ".join(cells) + " |")
    else:
        lines.append("No metrics.jsonl was found beside the weights.")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import timm",
        'model = timm.create_model("local-dir:PATH_TO_THIS_FOLDER", pretrained=True).eval()',
        "# once uploaded: timm.create_model('hf-hub:USER/REPO', pretrained=True)",
        "cfg = timm.data.resolve_data_config({}, model=model)",
        "transform = timm.data.create_transform(**cfg)",
        "```",
        "",
    ]
    return "\n".join(lines)


def export(
    weights: str | os.PathLike,
    output: str | os.PathLike,
    *,
    pth: bool = False,
    metrics: str | os.PathLike | None = None,
) -> str:
    """Writes the timm / Hub folder of deit_jax weights directory `weights` to `output`.

    `metrics` defaults to the metrics.jsonl beside `weights` (WORKDIR/metrics.jsonl). Returns
    the output directory. The folder is written beside `output` and renamed into place, so an
    interrupted export leaves no partial `output`.
    """
    weights, output = os.path.abspath(os.fspath(weights)), os.path.abspath(os.fspath(output))
    if os.path.exists(output):
        raise OutputExistsError(
            f"Output {output!r} already exists; choose a new --output directory (or delete it)."
        )
    variables, meta = directory.load_variables(weights)
    model_name = meta["model_name"]
    overrides = _tuples(meta.get("model_overrides") or {})
    spec = timm_spec(model_name, overrides)
    model = create_model(model_name, **overrides)
    data_cfg = _data_config(meta, model)

    _compat.import_torch()
    import timm
    import torch

    state_dict = flax_to_torch(variables, model_name=None)
    with torch.device("cpu"):
        timm_model = timm.create_model(spec.architecture, pretrained=False, **spec.kwargs)
    result = timm_model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"The weights of {model_name!r} do not fit timm's {spec.architecture} "
            f"{spec.kwargs}: missing {result.missing_keys}, unexpected {result.unexpected_keys}."
        )
    timm_model.eval()

    class_names = (meta.get("data") or {}).get("class_names")
    if class_names and len(class_names) != spec.kwargs["num_classes"]:
        log.warning("Ignoring %d class names for %d classes.", len(class_names), model.num_classes)
        class_names = None
    model_config: dict[str, Any] = {
        "deit_jax": {"model_name": model_name, "model_overrides": meta.get("model_overrides")},
    }
    if class_names:
        model_config["label_names"] = list(class_names)
    metrics_path = os.fspath(metrics or os.path.join(os.path.dirname(weights), "metrics.jsonl"))
    card = _model_card(model_name, spec, meta, final_metrics(metrics_path), data_cfg)

    partial = f"{output}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        timm.models.save_for_hf(
            timm_model,
            partial,
            model_config=model_config,
            safe_serialization=True,
            data_config=data_cfg,
        )
        with open(os.path.join(partial, "README.md"), "w") as f:
            f.write(card)
        if pth:
            torch.save({"model": timm_model.state_dict()}, os.path.join(partial, PTH_FILE))
        os.replace(partial, output)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("Exported %s (%s) to %s", model_name, spec.architecture, output)
    return output


def _tuples(overrides: dict[str, Any]) -> dict[str, Any]:
    """JSON lists back to tuples (Flax module attributes, e.g. a (h, w) img_size)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}


def read_folder(path: str | os.PathLike) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """`(state_dict, model_name, overrides)` of a folder written by `export`."""
    path = os.fspath(path)
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path) or not os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
        raise WeightsNotFoundError(
            f"{path!r} is not an exported model folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})."
        )
    with open(config_path) as f:
        config = json.load(f)
    origin = config.get("deit_jax")
    if not origin:
        raise CheckpointError(
            f"{config_path} has no `deit_jax` entry (not written by deit_jax.export): convert "
            f"its {WEIGHTS_FILE} with --checkpoint FILE --model NAME instead."
        )
    state_dict = read_state_dict(os.path.join(path, WEIGHTS_FILE))
    return state_dict, origin["model_name"], _tuples(origin.get("model_overrides") or {})
