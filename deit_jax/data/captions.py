"""Image-caption pairs from a folder: each image with a caption file beside it.

The layout img2dataset writes: `0001.jpg` and `0001.txt` (any depth below the root), the caption
file holding one caption a line, several allowed. One caption per image and step is drawn from
the stream's seed (`caption_index`), so a run, its resume and a teacher cache of it see the same
caption. An image without its caption file, or with one that holds no caption, is refused
naming the file: a silent skip would change which pairs the stream holds.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from deit_jax.data.sources import IMAGE_EXTENSIONS
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


def caption_index(num_captions: int, seed: int, epoch: int, example: int) -> int:
    """Which of an example's captions the stream takes at `epoch`: a draw keyed by (seed, epoch,
    example), the same in every run, resume and process of that stream."""
    if num_captions == 1:
        return 0
    rng = np.random.default_rng((seed, epoch, example))
    return int(rng.integers(num_captions))
