"""Image-caption pairs from a folder: each image with a caption file beside it.

`config.data.name = "captions:/root"`: the layout img2dataset writes, `0001.jpg` and `0001.txt`
(any depth below the root), the caption file holding one caption a line, several allowed. Like
`images:` data it has one split, `train`, in sorted path order, and no labels: slice it for
held-out pairs (`train[:90%]`, `train[90%:]`). An image without its caption file, or with one
that holds no caption, is refused naming the file: a silent skip would change which pairs the
stream holds.

The pipeline (`deit_jax.data.pipeline`) tokenizes every caption once on the host, with the
tokenizers the run gives it (the student's and, when it differs, the teacher's), and draws one
caption per example and epoch from the stream's seed inside the tf.data graph, so a run, its
resume and a teacher cache of it see the same caption. Evaluation takes each image's first
caption.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np

from deit_jax.data import labels
from deit_jax.data.sources import IMAGE_EXTENSIONS, ImagesSource
from deit_jax.errors import DataError, DataNotFoundError

LAYOUT = "<root>/**/<name>.jpg|jpeg|png, each with <name>.txt beside it (one caption a line)"


@dataclasses.dataclass(frozen=True)
class CaptionPair:
    image: str  # the image file's path
    captions: tuple[str, ...]  # one or more, in the caption file's order


def read_caption_pairs(root: str) -> list[CaptionPair]:
    """Every image below `root` with its captions, in sorted path order."""
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise DataNotFoundError(f"No caption folder at {root!r}; expected {LAYOUT}.")
    images = sorted(
        os.path.join(d, f)
        for d, _, files in os.walk(root)
        for f in files
        if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
    )
    if not images:
        raise DataNotFoundError(f"No images in the caption folder {root!r}; expected {LAYOUT}.")
    pairs = []
    for image in images:
        caption_file = os.path.splitext(image)[0] + ".txt"
        if not os.path.isfile(caption_file):
            raise DataError(
                f"The image {image!r} has no caption file: write {caption_file!r} (one caption a "
                "line), or move the image out of the folder."
            )
        with open(caption_file, encoding="utf-8") as f:
            captions = tuple(line.strip() for line in f if line.strip())
        if not captions:
            raise DataError(
                f"The caption file {caption_file!r} holds no caption: write one caption a line, "
                "or move its image out of the folder."
            )
        pairs.append(CaptionPair(image, captions))
    return pairs


class CaptionsSource(ImagesSource):
    """`captions:/root`: every image under `root` with its captions; one split, `train`."""

    PREFIX = labels.CAPTIONS_PREFIX
    MISSING = f"Caption folder {{root}} does not exist; expected {LAYOUT}."
    captioned = True

    def _listing(self, split: str) -> tuple[list[str], list[int]]:
        pairs = read_caption_pairs(self.root)
        self._captions = {p.image: p.captions for p in pairs}
        return [p.image for p in pairs], [-1] * len(pairs)

    def captions(self, split: str) -> list[tuple[str, ...]]:
        """The captions of every example of the named `split`, by position (its `id`)."""
        paths = self._examples(split)[0]
        return [self._captions[p] for p in paths]


def token_table(
    captions: list[tuple[str, ...]], tokenize: Callable[[list[str]], np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(tokens, first, count)`: every caption tokenized, (total, context) int32, in example
    order; example i's captions are rows `first[i]` to `first[i] + count[i] - 1`."""
    count = np.array([len(c) for c in captions], np.int32)
    first = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int32)
    tokens = np.asarray(tokenize([c for example in captions for c in example]), np.int32)
    return tokens, first, count
