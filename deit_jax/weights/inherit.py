"""Weight inheritance: a smaller transformer starts from a larger one's weights, not at random.

After TinyCLIP's weight inheritance (Wu et al., 2023; microsoft/Cream
`TinyCLIP/src/open_clip/weight_inherit.py`), where the student starts from its teacher's weights:

- **Blocks**: TinyCLIP's `interval_front` rule, `layers="even"`: for a teacher of L blocks and a
  student of l, step = L // l and student block i takes teacher block i * step (12 -> 6: 0, 2,
  4, 6, 8, 10; 12 -> 5: 0, 2, 4, 6, 8). Or the listed teacher blocks, one per student block.
- **Widths**: the leading entries of every axis (TinyCLIP's `prune_param`): the first channels
  of embeddings, LayerNorms, MLPs and projections (CLIP's `proj`, `text_projection`), the first
  tokens of the text vocabulary and context. Attention goes by head: q, k and v each keep the
  first heads of the teacher and, where the head width differs (TinyCLIP keeps it), the first
  channels of each head; the output projection keeps the matching input rows. Scalars
  (`logit_scale`) are copied.
- **Fixed shapes**: image position embeddings need the teacher's token count (the same image and
  patch size) and the patch kernels its patch size; a classifier head of another class count
  stays at the student's initialisation (logged).

`inherit` is the pure function on parameter trees (DeiT / ViT and CLIP, both towers);
`inherit_model` adds the size check with the models' option names; `deit_as_clip_image` lays a
DeiT out as a CLIP image tower; `load` reads what `config.init` names (`config.init_from` as a
teacher, the CLIP tower sources) for the training loop, through `deit_jax.train.state`.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from deit_jax.errors import ConfigError
from deit_jax.models import create_model
from deit_jax.models.clip import CLIP
from deit_jax.models.vit import DeiT
from deit_jax.weights import directory
from deit_jax.weights.surgery import HEADS

log = logging.getLogger(__name__)

EVEN = "even"
IMAGE, TEXT = "image", "text"
Layers = str | Sequence[int]
Path = tuple[str, ...]

_BLOCK = re.compile(r"(res)?blocks_(\d+)$")
# The path above a model's blocks -> the tower they belong to.
_TOWERS: dict[Path, str] = {
    (): IMAGE,
    ("visual", "transformer"): IMAGE,
    ("text", "transformer"): TEXT,
}
_QKV, _OUT = ("qkv", "in_proj"), ("proj", "out_proj")
# The config keys of each tower's layer choice and source.
LAYER_KEYS = {IMAGE: "inherit_layers", TEXT: "inherit_text_layers"}
TOWER_KEYS = {IMAGE: "image_tower_from", TEXT: "text_tower_from"}


class InheritError(ValueError):
    """A student that cannot be inherited from these weights (larger, or of other token shapes)."""


class LayerChoiceError(InheritError):
    """A listed layer choice that does not fit the teacher or the student (`tower` says whose)."""

    def __init__(self, message: str, tower: str):
        super().__init__(message)
        self.tower = tower


def parse_layers(text: str) -> Layers:
    """`"even"` or a comma list such as `"0,3,7,11"` (the config's spelling) -> a layer choice."""
    if text.strip() == EVEN:
        return EVEN
    return [int(part) for part in text.split(",")]


def chosen_layers(choice: Layers, teacher_depth: int, student_depth: int, tower: str) -> list[int]:
    """The teacher block each student block takes: TinyCLIP's `interval_front` for "even"."""
    if student_depth > teacher_depth:
        raise InheritError(
            f"the student's {tower} tower has {student_depth} blocks, the teacher's only "
            f"{teacher_depth}"
        )
    if isinstance(choice, str):
        if choice != EVEN:
            raise LayerChoiceError(f"must be {EVEN!r} or a comma list of block indices", tower)
        step = teacher_depth // max(student_depth, 1)
        return [i * step for i in range(student_depth)]
    chosen = list(choice)
    if len(chosen) != student_depth:
        raise LayerChoiceError(
            f"lists {len(chosen)} blocks for the student's {student_depth}", tower
        )
    for j in chosen:
        if not 0 <= j < teacher_depth:
            raise LayerChoiceError(
                f"block {j} is out of range for the teacher's {teacher_depth} blocks "
                f"(0-{teacher_depth - 1})",
                tower,
            )
    return chosen


def _not_larger(value: np.ndarray, shape: tuple[int, ...], path: Path) -> None:
    if len(shape) != value.ndim or any(s > t for s, t in zip(shape, value.shape, strict=True)):
        raise InheritError(
            f"the student's {'/'.join(path)} {tuple(shape)} is larger than the teacher's "
            f"{tuple(value.shape)}"
        )


def _leading(value: np.ndarray, shape: tuple[int, ...], path: Path) -> np.ndarray:
    _not_larger(value, shape, path)
    return value[tuple(slice(0, s) for s in shape)]


def _heads_slice(value: np.ndarray, shape: tuple[int, ...], heads: tuple[int, int], kind: str):
    """q|k|v (`kind` "qkv": kernel (D, 3D), bias (3D,)) or the output projection ("out": kernel
    (D, D), input rows by head): the first heads, the first channels of each head."""
    h_t, h_s = heads
    if kind == "qkv":
        hd_t, hd_s = value.shape[-1] // (3 * h_t), shape[-1] // (3 * h_s)
    else:
        hd_t, hd_s = value.shape[0] // h_t, shape[0] // h_s
    if h_s > h_t or hd_s > hd_t:
        raise InheritError(
            f"the student's {h_s} heads of width {hd_s} exceed the teacher's {h_t} of {hd_t}"
        )
    if kind == "out":
        split = value.reshape(h_t, hd_t, value.shape[-1])[:h_s, :hd_s, : shape[-1]]
        return split.reshape(shape)
    if value.ndim == 1:
        return value.reshape(3, h_t, hd_t)[:, :h_s, :hd_s].reshape(shape)
    split = value.reshape(value.shape[0], 3, h_t, hd_t)[: shape[0], :, :h_s, :hd_s]
    return split.reshape(shape)


def _block_of(path: Path) -> tuple[int, str, int] | None:
    """(position in `path`, tower, block index) of a parameter inside a block, else None."""
    for k, part in enumerate(path):
        match = _BLOCK.match(part)
        if match and path[:k] in _TOWERS:
            return k, _TOWERS[path[:k]], int(match.group(2))
    return None


def _blocks(flat: Mapping[Path, Any]) -> dict[str, tuple[Path, int]]:
    """tower -> (its blocks' path without the index, e.g. ("visual", "transformer",
    "resblocks_"), their count)."""
    found: dict[str, tuple[Path, set[int]]] = {}
    for path in flat:
        block = _block_of(path)
        if block is not None:
            k, tower, index = block
            stem = (*path[:k], path[k][: -len(str(index))])
            found.setdefault(tower, (stem, set()))[1].add(index)
    return {tower: (stem, len(ids)) for tower, (stem, ids) in found.items()}


def _fixed_axes(path: Path, ndim: int) -> int:
    """How many leading axes must match the teacher's: image position embeddings keep their
    tokens, patch kernels their patch (all but the width); the rest are cut freely."""
    if path[-1] == "pos_embed" or path == ("visual", "positional_embedding"):
        return ndim - 1
    if path[-1] == "conv1" or path[-3:] == ("patch_embed", "proj", "kernel"):
        return ndim - 1
    return 0


def _attention_kind(path: Path) -> str | None:
    """How a block's attention parameter is cut by head: "qkv" (the fused q|k|v kernel and bias),
    "out" (the output projection's kernel, whose input rows are the heads' outputs) or None."""
    if len(path) < 3 or path[-3] != "attn":
        return None
    if path[-2] in _QKV:
        return "qkv"
    return "out" if path[-2] in _OUT and path[-1] == "kernel" else None


def _cut(path: Path, value: np.ndarray, shape: tuple[int, ...], heads: tuple[int, int] | None):
    """The teacher's `value` cut to the student's `shape` (`heads`: inside a block)."""
    _not_larger(value, shape, path)
    kind = _attention_kind(path) if heads is not None else None
    if kind is not None:
        return _heads_slice(value, shape, heads, kind)
    fixed = _fixed_axes(path, value.ndim)
    if value.shape[:fixed] != shape[:fixed]:
        raise InheritError(
            f"the student's {'/'.join(path)} {shape} needs the teacher's {value.shape[:fixed]} "
            "on its leading axes (another image or patch size: inherit at the teacher's, then "
            "fine-tune at yours)"
        )
    return _leading(value, shape, path)


def inherit(
    teacher_params: Any,
    student: Any,
    *,
    heads: Mapping[str, tuple[int, int]],
    layers: Layers | Mapping[str, Layers] = EVEN,
    fresh: Collection[Path] = (),
) -> Any:
    """The student's params taken from a larger teacher's (see the module docstring).

    `student`: the student's params tree, arrays or `jax.ShapeDtypeStruct`s; the result has its
    structure, shapes and dtypes. Its leaves that are not inherited (a head of another class
    count, the paths in `fresh`) are returned as given: pass the student's initialised params
    to keep them. `heads`: per tower ("image": a DeiT's blocks or a CLIP's image tower, "text")
    the teacher's and the student's head counts. `layers`: "even" or the teacher block of each
    student block, for every tower or per tower. Raises `InheritError` (a `ValueError`).
    """
    source = traverse_util.flatten_dict(teacher_params)
    target = traverse_util.flatten_dict(student)
    teacher_blocks = _blocks(source)
    picks: dict[str, list[int]] = {}
    for tower, (_, depth) in _blocks(target).items():
        if tower not in teacher_blocks:
            raise InheritError(f"the teacher has no {tower} tower blocks")
        choice = layers.get(tower, EVEN) if isinstance(layers, Mapping) else layers
        teacher_depth = teacher_blocks[tower][1]
        picks[tower] = chosen_layers(choice, teacher_depth, depth, tower)
        log.info("inherit: %s blocks %s of the teacher's %d", tower, picks[tower], teacher_depth)
    out: dict[Path, Any] = {}
    missing, kept = [], []
    for path, leaf in target.items():
        block, at = _block_of(path), path
        if block is not None:
            k, tower, index = block
            stem = teacher_blocks[tower][0]
            at = (*stem[:-1], f"{stem[-1]}{picks[tower][index]}", *path[k + 1 :])
        if path in fresh:
            out[path] = leaf
        elif at not in source:
            missing.append("/".join(path))
        elif path[0] in HEADS and np.shape(source[at])[-1] != leaf.shape[-1]:
            kept.append("/".join(path))
            out[path] = leaf
        else:
            cut = _cut(path, np.asarray(source[at]), tuple(leaf.shape),
                       heads[block[1]] if block else None)  # fmt: skip
            out[path] = np.asarray(cut, dtype=leaf.dtype)
    if missing:
        raise InheritError(f"the teacher has no {', '.join(missing)}")
    if kept:
        log.warning("inherit: class count differs, %s start at the student's init", ", ".join(kept))
    return traverse_util.unflatten_dict(out)


def tower_sizes(model: Any) -> dict[str, dict[str, tuple[str, int]]]:
    """Per tower, the sizes inheritance compares, named as the model's options name them."""
    if isinstance(model, DeiT):
        d, h = model.embed_dim, model.num_heads
        names = ("embed_dim", "depth", "num_heads")
        return {IMAGE: _sizes(names, d, model.depth, h, model.mlp_ratio)}
    if isinstance(model, CLIP):
        vh = model.vision_heads or max(model.vision_width // 64, 1)
        th = model.text_heads or max(model.text_width // 64, 1)
        return {
            IMAGE: _sizes(
                ("vision_width", "vision_layers", "vision_heads"),
                model.vision_width, model.vision_layers, vh, model.mlp_ratio,
            ),
            TEXT: _sizes(
                ("text_width", "text_layers", "text_heads"),
                model.text_width, model.text_layers, th, model.mlp_ratio,
            ),
        }  # fmt: skip
    raise InheritError(f"{type(model).__name__} is not a DeiT or a CLIP: nothing to inherit by")


def _sizes(names: Sequence[str], width: int, depth: int, heads: int, mlp_ratio: float):
    return {
        "width": (names[0], width),
        "depth": (names[1], depth),
        "heads": (names[2], heads),
        "head width": ("head width", width // heads),
        "mlp": ("MLP width", int(width * mlp_ratio)),
    }


def check_fits(teacher: Mapping, student: Mapping, towers: Collection[str]) -> None:
    """Refuses a student tower larger than the teacher's in any size (`tower_sizes`)."""
    words = {"depth": "deeper", "heads": "more"}
    for tower in towers:
        for size, (name, s) in student[tower].items():
            t = teacher[tower][size][1]
            if s > t:
                word = words.get(size, "wider")
                raise InheritError(f"the student's {name} {s} is {word} than the teacher's {t}")


def inherit_model(
    teacher_params: Any,
    teacher_model: Any,
    student: Any,
    student_model: Any,
    *,
    layers: Layers | Mapping[str, Layers] = EVEN,
    towers: Collection[str] | None = None,
    fresh: Collection[Path] = (),
) -> Any:
    """`inherit` with the heads and the size check read from the two models (`towers`: those
    to take; default the student's)."""
    t_sizes, s_sizes = tower_sizes(teacher_model), tower_sizes(student_model)
    towers = list(s_sizes) if towers is None else list(towers)
    check_fits(t_sizes, s_sizes, towers)
    heads = {t: (t_sizes[t]["heads"][1], s_sizes[t]["heads"][1]) for t in towers}
    return inherit(teacher_params, student, heads=heads, layers=layers, fresh=fresh)


def deit_as_clip_image(params: Any, model: DeiT) -> tuple[dict[str, Any], set[Path]]:
    """A DeiT's params laid out as a CLIP image tower, `{"visual": ...}`, and the CLIP paths it
    has no weights for (`ln_pre`, `proj`: left at the student's init).

    Exact where CLIP has a place for it: the patch conv's bias is added to the patch rows of the
    position embedding (CLIP's conv has none), LayerScale (DeiT III) is folded into the output
    projections; a distillation token and the heads are dropped. Not exact: CLIP's `ln_pre`
    (which DeiT lacks) and LayerNorm eps 1e-5 for DeiT's 1e-6.
    """
    p = jax.tree.map(np.asarray, params)
    prefix = model.num_pos_prefix_tokens
    pos, patch = p["pos_embed"][0], p["patch_embed"]["proj"]
    cls_row = pos[:1] if prefix else np.zeros_like(pos[:1])  # DeiT III: the token has none
    visual = {
        "conv1": patch["kernel"],
        "class_embedding": p["cls_token"].reshape(-1),
        "positional_embedding": np.concatenate([cls_row, pos[prefix:] + patch["bias"]]),
        "transformer": {
            f"resblocks_{i}": _deit_block(p[f"blocks_{i}"]) for i in range(model.depth)
        },
        "ln_post": p["norm"],
    }
    fresh = {("visual", "ln_pre", "scale"), ("visual", "ln_pre", "bias"), ("visual", "proj")}
    return {"visual": visual}, fresh


def _deit_block(block: Mapping[str, Any]) -> dict[str, Any]:
    def scaled(dense: Mapping[str, Any], ls: str) -> dict[str, Any]:
        gamma = block.get(ls, {}).get("gamma")
        if gamma is None:
            return dict(dense)
        return {"kernel": dense["kernel"] * gamma, "bias": dense["bias"] * gamma}

    return {
        "ln_1": block["norm1"],
        "attn": {"in_proj": block["attn"]["qkv"], "out_proj": scaled(block["attn"]["proj"], "ls1")},
        "ln_2": block["norm2"],
        "mlp": {"c_fc": block["mlp"]["fc1"], "c_proj": scaled(block["mlp"]["fc2"], "ls2")},
    }


# --------------------------------------------------------------------------- config.init


def wanted(config: ml_collections.ConfigDict) -> bool:
    """Whether `config.init` asks for inheritance or a CLIP tower's own weights."""
    init = config.get("init")
    return bool(init and (init.inherit or init.image_tower_from or init.text_tower_from))


def _read(path: str) -> tuple[Any, Any]:
    variables, metadata = directory.load_variables(path)
    model = create_model(metadata["model_name"], **metadata["model_overrides"])
    return variables["params"], model


def load(config: ml_collections.ConfigDict, params: Any, model: Any) -> Any:
    """The student's params (`params`, its initialised tree without feature distillation's
    projection) with what `config.init` names: with `init.inherit`, `init_from` is a teacher it
    inherits from; `init.image_tower_from` / `init.text_tower_from` replace a CLIP student's tower
    (inherited, or as they are when `init.inherit` is off: then of the student's sizes).
    `logit_scale` comes with the text tower. Problems are one-line `ConfigError`s."""
    init = config.init
    layers = {t: parse_layers(init[key]) for t, key in LAYER_KEYS.items()}
    if init.inherit and config.init_from:
        teacher, teacher_model = _read(config.init_from)
        if type(teacher_model) is not type(model):
            raise ConfigError(
                f"config.init_from={config.init_from!r}: holds a {type(teacher_model).__name__}, "
                f"the student is a {type(model).__name__}; inherit from the same family (a CLIP "
                "student's image tower from a DeiT: init.image_tower_from)"
            )
        with _said(init, "init_from", config.init_from):
            params = inherit_model(teacher, teacher_model, params, model, layers=layers)
        log.info("inherit: the student inherits from %s", config.init_from)
    for tower, key in TOWER_KEYS.items():
        if init[key]:
            params = {**params, **_tower(init, key, tower, params, model, layers)}
    return params


def _tower(
    init: ml_collections.ConfigDict,
    key: str,
    tower: str,
    params: Any,
    model: Any,
    layers: Mapping[str, Layers],
) -> dict[str, Any]:
    """A CLIP student's `tower` (with `logit_scale` for the text) from the weights at `key`."""
    source, source_model = _read(init[key])
    fresh: set[Path] = set()
    if isinstance(source_model, DeiT) and tower == IMAGE:
        source, fresh = deit_as_clip_image(source, source_model)
    elif not isinstance(source_model, CLIP):
        raise ConfigError(
            f"config.init.{key}={init[key]!r}: holds a {type(source_model).__name__}; give "
            "a CLIP's weights" + (" or a DeiT's" if tower == IMAGE else "")
        )
    names = ("visual",) if tower == IMAGE else ("text", "logit_scale")
    student = {name: params[name] for name in names}
    if not init.inherit:
        theirs, ours = tower_sizes(source_model)[tower], tower_sizes(model)[tower]
        for size, (name, s) in ours.items():
            if theirs[size][1] != s:
                raise ConfigError(
                    f"config.init.{key}={init[key]!r}: its {name} is {theirs[size][1]}, the "
                    f"student's {s}; set init.inherit=True to inherit from a larger tower"
                )
    with _said(init, f"init.{key}", init[key]):
        taken = inherit_model(
            source, source_model, student, model, towers=[tower], fresh=fresh,
            layers=layers if init.inherit else EVEN,
        )  # fmt: skip
    log.info("inherit: the student's %s tower from %s", tower, init[key])
    return taken


@contextlib.contextmanager
def _said(init: ml_collections.ConfigDict, key: str, path: str) -> Iterator[None]:
    """Turns an `InheritError` into the one-line `ConfigError` that names the key to change."""
    try:
        yield
    except LayerChoiceError as e:
        layer_key = LAYER_KEYS[e.tower]
        raise ConfigError(f"config.init.{layer_key}={init[layer_key]!r}: {e}") from e
    except InheritError as e:
        raise ConfigError(
            f"config.init.inherit: {e} in {key}={path!r}; inherit from a larger model, or set "
            "init.inherit=False"
        ) from e
