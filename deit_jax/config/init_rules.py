"""The rules of `config.init`: a student inherited from a larger model's weights
(`deit_jax.weights.inherit`, TinyCLIP's weight inheritance) and a CLIP student's towers from two
sources. What needs the teacher's shapes (a student wider or deeper than it, block indices past
its depth) is checked when the weights are read."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import ml_collections

from deit_jax.config.predicates import Context, Rule, one_of, parses
from deit_jax.models.registry import given_options, model_options

# config.init (deit_jax.weights.inherit): which student blocks and towers inheritance fills.
_LAYERS = {"init.inherit_layers": "image", "init.inherit_text_layers": "text"}
_TOWER_FROM = ("init.image_tower_from", "init.text_tower_from")
_CONVERT = "python -m deit_jax.convert --checkpoint FILE --model NAME --output DIR"


def _student_options(c: Context) -> dict[str, Any]:
    name, model = c.get("model_name"), c.get("model")
    given = (
        given_options(name, model.to_dict()) if isinstance(model, ml_collections.ConfigDict) else {}
    )
    return {**model_options(name), **given}


def _clip_student(c: Context) -> bool:
    return "text_width" in _student_options(c)


def _student_depth(c: Context, tower: str) -> int | None:
    """The student's block count of `tower` ("image": a DeiT's blocks or a CLIP's image tower;
    "text": a CLIP's text tower), None where it has no such blocks (a convnet)."""
    options = _student_options(c)
    if _clip_student(c):
        return options["vision_layers" if tower == "image" else "text_layers"]
    return options.get("depth") if tower == "image" else None


def _layer_list(v: Any) -> list[int] | None:
    """A comma list of block indices, or None for "even" (ValueError for anything else)."""
    if not isinstance(v, str):
        raise TypeError("a layer choice is a string")
    if v.strip() == "even":
        return None
    indices = [int(part) for part in v.split(",")]
    if min(indices) < 0:
        raise ValueError("negative block index")
    return indices


def _layer_count(key: str) -> Callable[[Any, Context], bool]:
    def ok(v: Any, c: Context) -> bool:
        listed = _layer_list(v)
        return listed is None or len(listed) == _student_depth(c, _LAYERS[key])

    return ok


def _layer_count_message(key: str) -> Callable[[Context], str]:
    def message(c: Context) -> str:
        depth, tower = _student_depth(c, _LAYERS[key]), _LAYERS[key]
        return (
            f"lists {len(_layer_list(c.get(key)))} teacher blocks for the student's {depth} "
            f"{tower} blocks; give one per student block, or 'even'"
        )

    return message


def _inherits_from(v: Any, c: Context) -> bool:
    return not v or bool(c.get("init_from")) or any(c.get(k) for k in _TOWER_FROM)


def _weights_dir(path: Any) -> bool:
    path = os.path.expanduser(path)
    return os.path.isfile(os.path.join(path, "deit_jax.json"))


INIT_RULES: tuple[Rule, ...] = (
    Rule("init.inherit", one_of(True, False), "must be True or False"),
    Rule(
        "init.inherit",
        _inherits_from,
        "needs config.init_from, the larger model's weights directory to inherit from; set "
        "init_from, or init.inherit=False",
    ),
    Rule(
        "init.inherit",
        lambda v, c: not v or _student_depth(c, "image") is not None,
        "needs a DeiT or a CLIP student (blocks to inherit into); set init.inherit=False",
        after=("model_name", "model"),
    ),
    Rule(
        "init.inherit",
        lambda v, c: not v or c.get("mode") != "eval",
        "is for training: mode=eval reads init_from as the student's own weights; set "
        "init.inherit=False",
        after=("mode",),
    ),
    Rule(
        "init.inherit",
        lambda v, c: not v or not c.get("init_from") or _weights_dir(c.get("init_from")),
        f"needs init_from to be a deit_jax weights directory (its deit_jax.json names the "
        f"teacher's model); convert a file with {_CONVERT}",
        after=("init_from",),
        on_disk=True,
    ),
    *(
        Rule(
            key,
            parses(_layer_list),
            "must be 'even' or a comma list of teacher block indices >= 0, e.g. '0,3,7,11'",
        )
        for key in _LAYERS
    ),
    Rule(
        "init.inherit_text_layers",
        lambda v, c: _layer_list(v) is None or _clip_student(c),
        "applies to a CLIP student's text tower; leave it 'even'",
        after=("model_name", "model"),
    ),
    *(
        Rule(key, _layer_count(key), _layer_count_message(key), after=("model_name", "model"))
        for key in _LAYERS
    ),
    *(
        Rule(
            key,
            lambda v, c: not v or _clip_student(c),
            "applies to a CLIP student (model_name clip_*); for a DeiT use init_from",
            after=("model_name", "model"),
        )
        for key in _TOWER_FROM
    ),
    *(
        Rule(
            key,
            lambda v, c: not v or _weights_dir(v),
            f"must be '' or a deit_jax weights directory; convert a file with {_CONVERT}",
            on_disk=True,
        )
        for key in _TOWER_FROM
    ),
)
