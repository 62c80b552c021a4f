"""Eval sets that hold only some of the model's classes, scored on those classes alone.

ImageNet-A and ImageNet-R hold 200 of ImageNet's 1,000 classes, and tfds labels them with all
1,000 names. The standard evaluation (Hendrycks et al.'s code; timm's `validate.py
--valid-labels`) scores only the logits of the classes the set holds; scoring all 1,000 gives
numbers no paper reports. Here the classes to score are the labels that occur in the split, found
by one pass over its labels (images left encoded) and kept beside the data in
`<data_dir>/deit_jax_eval_classes/`, so later runs skip the pass. Any labelled split whose labels
cover only part of the model's classes gets the same treatment, with a log line saying so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os

import numpy as np

from deit_jax.data.sources import FolderSource, Source

log = logging.getLogger(__name__)


def classes_in_split(source: Source, split: str, cache_dir: str) -> list[int]:
    """The sorted labels that occur in `split` of `source` (remembered in `cache_dir`)."""
    if isinstance(source, FolderSource):  # its labels come from the listing: nothing to read
        return np.unique(source.labels(split)).tolist()
    count = source.num_examples(split)
    identity = f"{source.name}\n{source.location()}\n{split}\n{count}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:24]
    path = os.path.join(cache_dir, "deit_jax_eval_classes", f"{key}.json")
    with contextlib.suppress(OSError, ValueError, KeyError):
        with open(path) as f:
            saved = json.load(f)
        if saved["identity"] == identity:
            return saved["classes"]
    log.info(
        "%s %r: reading its %d labels once, for the classes it holds", source.name, split, count
    )
    classes = np.unique(source.labels(split)).tolist()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"identity": identity, "classes": classes}, f)
        os.replace(tmp, path)
    except OSError as e:  # A read-only data_dir only costs the pass next time.
        log.warning("Could not keep the classes of %s %r in %s: %s", source.name, split, path, e)
    return classes


def scored_classes(
    source: Source, split: str, num_classes: int, cache_dir: str
) -> tuple[int, ...] | None:
    """The classes to score on `split`: those its labels use, when they are fewer than the
    model's `num_classes`; None (score every class) otherwise, for label-free data and for
    ImageNet-ReaL, whose reassessed label sets may name any class."""
    if not source.labelled or source.real_labels:
        return None
    classes = classes_in_split(source, split, cache_dir)
    if len(classes) >= num_classes:
        return None
    log.info(
        "%s %r: scoring %d of the model's %d classes (those its labels use)",
        source.name, split, len(classes), num_classes,
    )  # fmt: skip
    return tuple(int(c) for c in classes)
