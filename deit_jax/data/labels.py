"""What the classes are called: a data set's class names, names given in the config, and the
prompt templates a zero-shot CLIP teacher puts them in.

Pure Python (no TensorFlow, no PyTorch), so that the config rules (`deit_jax.config.rules`)
check `teacher.class_names`, `teacher.prompts` and label-free data names with the same parsers
the run uses. The zero-shot teacher itself is `deit_jax.teacher.clip`.

- `teacher.class_names`: "" (the data set's own names, see `dataset_class_names`), "a,b,c" (a
  comma list) or the path of a file with one name per line.
- `teacher.prompts`: "openai" (the 80 templates of CLIP's ImageNet evaluation), "simple"
  (open_clip's 7) or the path of a file with one template per line, each containing `{}`, which
  the class name replaces.
- Label-free data: `data.name="images:/root"`, every image under `root` without labels; its
  class names must come from `teacher.class_names`.

The curated ImageNet names and the templates are open_clip's (`open_clip.zero_shot_metadata`),
read from its installed file without importing open_clip (which would import PyTorch).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from types import SimpleNamespace

from deit_jax.errors import DependencyError

LABEL_FREE_PREFIX = "images:"
CAPTIONS_PREFIX = "captions:"  # image-caption pairs (deit_jax.data.captions): CLIP students
PROMPT_SETS = ("openai", "simple")
# Data sets whose class names are bare indices that are also what the class is (a digit).
DIGIT_DATA_SETS = ("digits", "mnist", "svhn_cropped")
_WNID = re.compile(r"n\d{8}")


def is_label_free(data_name: str) -> bool:
    """True for `images:/root` data: images without labels (distillation only)."""
    return isinstance(data_name, str) and data_name.startswith(LABEL_FREE_PREFIX)


def label_free_root(data_name: str) -> str:
    """The folder of label-free data `images:/root`: `/root`, with `~` expanded."""
    return os.path.expanduser(data_name.removeprefix(LABEL_FREE_PREFIX))


def is_caption_data(data_name: str) -> bool:
    """True for `captions:/root` data: images with caption files, for CLIP students."""
    return isinstance(data_name, str) and data_name.startswith(CAPTIONS_PREFIX)


def _lines(path: str) -> list[str]:
    with open(os.path.expanduser(path), encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def parse_class_names(value: str) -> list[str] | None:
    """The names `teacher.class_names` gives (None for "": the data set's own).

    Raises ValueError, saying what is wrong, for fewer than two names, an empty or a repeated one.
    """
    if not isinstance(value, str):
        raise ValueError("must be a string: '' (the data set's names), 'a,b,c' or a file path")
    if not value:
        return None
    if os.path.isfile(os.path.expanduser(value)):
        names, where = _lines(value), f"the file {value!r}"
    else:
        names, where = [n.strip() for n in value.split(",")], "the comma list"
        if any(not n for n in names):
            raise ValueError(f"{where} has an empty name (a stray comma?)")
    if len(names) < 2:
        raise ValueError(
            f"{where} gives {len(names)} name(s); a classifier needs at least 2 (give 'a,b,...', "
            "or the path of an existing file with one name per line)"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{where} repeats {', '.join(map(repr, repeated[:3]))}")
    return names


@functools.cache
def open_clip_metadata() -> SimpleNamespace:
    """open_clip's `zero_shot_metadata` (templates, curated ImageNet names), read from its file."""
    spec = importlib.util.find_spec("open_clip")
    path = spec and os.path.join(spec.submodule_search_locations[0], "zero_shot_metadata.py")
    if not path or not os.path.isfile(path):
        raise DependencyError(
            "The CLIP teacher's prompt templates and ImageNet class names come from open_clip: "
            "pip install 'deit_jax[torch]' (or give teacher.prompts and teacher.class_names files)."
        )
    namespace: dict = {}
    with open(path, encoding="utf-8") as f:
        exec(compile(f.read(), path, "exec"), namespace)  # a data module: tuples of names/lambdas
    return SimpleNamespace(
        openai=[t("{}") for t in namespace["OPENAI_IMAGENET_TEMPLATES"]],
        simple=[t("{}") for t in namespace["SIMPLE_IMAGENET_TEMPLATES"]],
        imagenet_classnames=list(namespace["IMAGENET_CLASSNAMES"]),
    )


def check_templates(value: str) -> None:
    """Raises ValueError unless `value` is a prompt set or a file of templates with `{}`."""
    if value in PROMPT_SETS:
        return
    if not isinstance(value, str) or not os.path.isfile(os.path.expanduser(value)):
        raise ValueError(
            "must be 'openai' (CLIP's 80 ImageNet templates), 'simple' (open_clip's 7) or an "
            "existing file with one template per line, each containing {}"
        )
    templates = _lines(value)
    if not templates:
        raise ValueError(
            f"the file {value!r} holds no template; write one per line, e.g. 'a photo of a {{}}.'"
        )
    without = [t for t in templates if "{}" not in t]
    if without:
        raise ValueError(
            f"line {templates.index(without[0]) + 1} of {value!r} ({without[0]!r}) has no {{}} "
            "for the class name; every template needs one, e.g. 'a photo of a {}.'"
        )


def templates(value: str) -> list[str]:
    """The templates `teacher.prompts` names (`check_templates` accepts it), as strings in which
    `{}` stands for the class."""
    if value in PROMPT_SETS:
        return list(getattr(open_clip_metadata(), value))
    return _lines(value)


def fill(template: str, name: str) -> str:
    """A prompt: `{}` of `template` replaced by `name` (other braces are kept as they are)."""
    return template.replace("{}", name)


@functools.cache
def _imagenet_wnids() -> tuple[str, ...]:
    """ImageNet-1k's WordNet ids in label order (tfds's imagenet2012 labels file)."""
    spec = importlib.util.find_spec("tensorflow_datasets")
    path = os.path.join(
        spec.submodule_search_locations[0], "datasets", "imagenet2012", "labels.txt"
    )
    return tuple(_lines(path))


def dataset_class_names(data_name: str, names: list[str] | None) -> list[str]:
    """Prompt-ready names from a data set's own label names (tfds ClassLabel, folder names).

    WordNet ids (imagenet2012 and its variants: imagenet_v2, imagenet_a, imagenette, ...) become
    open_clip's curated ImageNet names; underscores become spaces ("golden_retriever"). Names
    that do not say what the class is are refused with a ValueError: none at all (label-free
    data), or bare indices "0", "1", ... (except for digit data sets, where the index is the
    digit).
    """
    if not names:
        raise ValueError(
            f"data set {data_name!r} has no class names (label-free data): give them with "
            "--config.teacher.class_names='cat,dog,...' or a file with one name per line"
        )
    if all(_WNID.fullmatch(n) for n in names):
        index = {w: i for i, w in enumerate(_imagenet_wnids())}
        if all(n in index for n in names):
            curated = open_clip_metadata().imagenet_classnames
            return [curated[index[n]] for n in names]
        raise ValueError(
            f"data set {data_name!r} names its classes by WordNet ids that are not all ImageNet-1k "
            "classes; give prompt-ready names with --config.teacher.class_names (a comma list or "
            "a file, one name per line, in label order)"
        )
    if all(n == str(i) for i, n in enumerate(names)) and data_name not in DIGIT_DATA_SETS:
        raise ValueError(
            f"data set {data_name!r} names its classes only by their indices 0..{len(names) - 1}; "
            "give prompt-ready names with --config.teacher.class_names (a comma list or a file, "
            "one name per line, in label order)"
        )
    return [n.replace("_", " ") for n in names]
