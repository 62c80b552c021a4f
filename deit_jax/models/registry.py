"""A small registry of model names, as in timm: `create_model(name, **overrides)`."""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from typing import Any

import flax.linen as nn

_MODELS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {}


def register_model(name: str, cls: type[nn.Module], **defaults: Any) -> None:
    """Registers `cls(**defaults)` under `name`."""
    if name in _MODELS:
        raise ValueError(f"Model {name!r} is already registered.")
    _MODELS[name] = (cls, defaults)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def _unknown(kind: str, name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return f"Unknown {kind} {name!r}.{hint} Valid choices: {', '.join(sorted(choices))}."


def model_options(name: str) -> dict[str, Any]:
    """The constructor arguments a registered model is built with (its defaults)."""
    if name not in _MODELS:
        raise ValueError(_unknown("model", name, list(_MODELS)))
    cls, defaults = _MODELS[name]
    fields = {
        k: p.default
        for k, p in inspect.signature(cls).parameters.items()
        if k not in ("parent", "name")
    }
    return {**fields, **defaults}


def given_options(name: str, model: dict[str, Any]) -> dict[str, Any]:
    """The options a config's `model` section sets for model `name`: its values other than None
    (the model's own default), without a zero drop rate the model has no option for (no
    regularisation asked of a model without it, e.g. a CLIP)."""
    options = model_options(name)
    return {
        k: v
        for k, v in model.items()
        if v is not None and (k in options or k not in ("drop_rate", "drop_path_rate") or v)
    }


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Builds a registered model; keyword overrides replace its defaults (num_classes, ...)."""
    options = model_options(name)
    for key in overrides:
        if key not in options:
            raise ValueError(f"Model {name}: " + _unknown("option", key, list(options)))
    cls, defaults = _MODELS[name]
    return cls(**{**defaults, **overrides})


def input_size(model: nn.Module) -> tuple[int, int]:
    """The (height, width) a model is built for (its `img_size` attribute)."""
    size = getattr(model, "img_size", 224)
    return (size, size) if isinstance(size, int) else tuple(size)
