"""Extra eval sets (`config.data.extra_eval`): parsing, metric prefixes and an on-disk pre-check.

`config.data.extra_eval` lists data sets evaluated beside the main eval split, as a list or a
comma-separated string of `name[:split]` entries, e.g.

  "imagenet2012_real, imagenet_v2/matched-frequency:test, digits:train[:200]"

`name` is anything `config.data.name` accepts (a tfds name, optionally `name/config`, `digits`,
`folder:/root`); `split` (tfds slicing allowed) defaults to the set's only split, else to
`config.data.eval_split`. Each set is logged under its own prefix, `eval_<name>` (plus
`_<split>` when a split is given), in metrics.jsonl and TensorBoard; the best checkpoint is still
chosen by the main eval split (`eval/top1`).

The sets papers report, by their tfds names: `imagenet2012_real`, `imagenet_v2/matched-frequency`
(and `/threshold-0.7`, `/topimages`), `imagenet_a`, `imagenet_r` and `imagenet_sketch`. A split
whose labels use only some of the model's classes (ImageNet-A and -R: 200 of 1,000) is scored on
those classes only (deit_jax/data/class_subsets.py).

ImageNet-ReaL (tfds `imagenet2012_real`) additionally reports `real_top1` / `real_top5`: a
prediction counts as correct when it is in the image's set of reassessed labels, and images
without any are left out (timm's `RealLabelsImagenet` rule).

Import-light (no TensorFlow): `deit_jax.config.rules` uses `problem` to refuse a missing or empty
set before anything is built, by reading the `dataset_info.json` tfds writes.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from collections.abc import Sequence

_DEFAULT_TFDS_DIR = "~/tensorflow_datasets"
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# A folder source's split names are any folder; digits has these two.
_DIGITS_SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class EvalSet:
    name: str  # a `config.data.name`
    split: str | None  # None: the set's only split, else config.data.eval_split

    @property
    def prefix(self) -> str:
        """The metrics prefix, e.g. `eval_imagenet2012_real`, `eval_digits_train`."""
        parts = [self.name.removeprefix("folder:").strip("/")]
        if self.split:
            parts.append(self.split.split("[", 1)[0])
        return "eval_" + "_".join(re.sub(r"[^A-Za-z0-9.-]+", "_", p).strip("_") for p in parts)

    def __str__(self) -> str:
        return self.name + (f":{self.split}" if self.split else "")


def parse(value: str | Sequence[str] | None) -> list[EvalSet]:
    """`"a, b:test"` or `["a", "b:test"]` -> EvalSets; raises ValueError on an empty entry."""
    if value is None or value == "":
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    sets = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"empty entry {item!r}")
        item = item.strip()
        # `folder:/root[:split]`: the first colon belongs to the name.
        head, rest = ("folder:", item[7:]) if item.startswith("folder:") else ("", item)
        name, sep, split = rest.partition(":")
        if not name.strip() or (sep and not split.strip()):
            raise ValueError(f"entry {item!r} is not name[:split]")
        sets.append(EvalSet(head + name.strip(), split.strip() or None))
    return sets


def _tfds_info(name: str, data_dir: str) -> dict | None:
    """The newest `dataset_info.json` of tfds data set `name` (`builder` or `builder/config`)."""
    root = os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR", _DEFAULT_TFDS_DIR))
    base = os.path.join(root, *name.split("/"))
    # builder/version/ or builder/config/version/ (a builder name alone: its first config).
    found = sorted(glob.glob(os.path.join(base, "*", "dataset_info.json")))
    if not found and "/" not in name:
        # A builder with configs: tfds's default is its first, e.g. imagenet_v2's
        # matched-frequency (the first in sorted order too for the ImageNet sets).
        nested = sorted(glob.glob(os.path.join(base, "*", "*", "dataset_info.json")))
        first = nested[0].split(os.sep)[-3] if nested else None
        found = [p for p in nested if p.split(os.sep)[-3] == first]
    for path in reversed(found):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            continue
    return None


def _folder_split_sizes(root: str) -> dict[str, int]:
    sizes = {}
    for split in sorted(os.listdir(root)):
        d = os.path.join(root, split)
        if os.path.isdir(d):
            sizes[split] = sum(
                f.lower().endswith(_IMAGE_EXTENSIONS)
                for c in os.listdir(d)
                if os.path.isdir(os.path.join(d, c))
                for f in os.listdir(os.path.join(d, c))
            )
    return sizes


def split_sizes(name: str, data_dir: str) -> dict[str, int] | None:
    """Examples per split of data set `name` as prepared on disk; None if it is not there."""
    if name == "digits":  # Prepared on first use (a second's work), always available.
        return dict.fromkeys(_DIGITS_SPLITS, 1)
    if name.startswith("folder:"):
        root = os.path.expanduser(name[7:])
        return _folder_split_sizes(root) if os.path.isdir(root) else None
    info = _tfds_info(name, data_dir)
    if info is None:
        return None
    return {
        s["name"]: sum(int(n) for n in s.get("shardLengths", [])) for s in info.get("splits", [])
    }


def resolve_split(eval_set: EvalSet, splits: Sequence[str], main_eval_split: str) -> str:
    """The split an entry evaluates: its own, the set's only one, or the main eval split."""
    if eval_set.split:
        return eval_set.split
    return splits[0] if len(splits) == 1 else main_eval_split


def problem(eval_set: EvalSet, data_dir: str, main_eval_split: str) -> str | None:
    """Why `eval_set` cannot be evaluated (missing, no such split, empty), or None."""
    sizes = split_sizes(eval_set.name, data_dir)
    where = data_dir or os.environ.get("TFDS_DATA_DIR", _DEFAULT_TFDS_DIR)
    if sizes is None:
        manual = (
            " --manual_dir=<dir with ILSVRC2012_img_val.tar>"
            if eval_set.name.startswith("imagenet2012")
            else ""
        )
        return (
            f"extra eval set {str(eval_set)!r} does not exist (not prepared in {where}); prepare "
            f"it once with `tfds build {eval_set.name} --data_dir={where}{manual}` or remove it"
        )
    split = resolve_split(eval_set, list(sizes), main_eval_split)
    base = split.split("[", 1)[0].strip()
    if base not in sizes:
        return (
            f"extra eval set {str(eval_set)!r} has no split {base!r} (splits: {sorted(sizes)}); "
            "write it as name:split"
        )
    if sizes[base] == 0:
        return f"extra eval set {str(eval_set)!r} is empty (split {base!r} has no examples)"
    return None
