"""RandAugment policy strings (timm's `rand-m9-mstd0.5-inc1`), parsed without TensorFlow.

`parse_policy` is what `deit_jax.data.randaugment` applies and what the config check
(`deit_jax.config.rules`) runs up front, so that a bad string is refused before any data is read.
"""

from __future__ import annotations

import dataclasses
import math
import re

_LEVEL_DENOM = 10.0  # timm: magnitude M maps to the fractional level M / 10

# timm's op sets (timm/data/auto_augment.py); 'Cutout' is random erasing, done separately.
RAND_TRANSFORMS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
# timm's experimental `tweights` selection (ops drawn without replacement by these weights).
RAND_WEIGHTED_0 = {
    "Rotate": 3,
    "ShearX": 2,
    "ShearY": 2,
    "TranslateXRel": 1,
    "TranslateYRel": 1,
    "ColorIncreasing": 0.25,
    "SharpnessIncreasing": 0.25,
    "AutoContrast": 0.25,
    "SolarizeIncreasing": 0.05,
    "SolarizeAdd": 0.05,
    "ContrastIncreasing": 0.05,
    "BrightnessIncreasing": 0.05,
    "Equalize": 0.05,
    "PosterizeIncreasing": 0.05,
    "Invert": 0.05,
}


@dataclasses.dataclass(frozen=True)
class Policy:
    """A parsed RandAugment policy string (see `parse_policy`)."""

    num_layers: int = 2
    magnitude: float = 10.0
    magnitude_std: float = 0.0  # inf: magnitude ~ U(0, magnitude) instead of a Gaussian
    magnitude_max: float = _LEVEL_DENOM
    prob: float = 0.5
    ops: tuple[str, ...] = RAND_TRANSFORMS
    weights: tuple[float, ...] | None = None  # None: uniform choice with replacement


_POLICY_HELP = (
    "A RandAugment policy is 'rand' followed by '-'-separated sections: m<int> magnitude, "
    "n<int> ops per image, mstd<float> magnitude noise, mmax<int> magnitude ceiling, "
    "inc<0|1> increasing-severity op set, p<float> per-op probability, tweights weighted "
    "op choice; e.g. 'rand-m9-mstd0.5-inc1'. Use '' to disable RandAugment."
)


# timm's numeric sections and their types.
_NUMERIC_KEYS = {"m": int, "n": int, "p": float, "mstd": float, "mmax": int, "inc": int}


def parse_policy(policy: str) -> Policy:
    """Parses a timm RandAugment string such as 'rand-m9-mstd0.5-inc1' (same keys as timm)."""
    sections = policy.split("-")
    if sections[0] != "rand":
        raise ValueError(
            f"Bad RandAugment policy {policy!r}: it must start with 'rand'. " + _POLICY_HELP
        )
    kw: dict = {}
    increasing, transforms = False, None
    for section in sections[1:]:
        if section.startswith("t"):
            transforms = section[1:]
            continue
        match = re.fullmatch(r"([a-z]+)(\d.*)", section)
        if match is None:
            raise ValueError(
                f"Bad section {section!r} in RandAugment policy {policy!r}. " + _POLICY_HELP
            )
        key, value = match.groups()
        if key == "w":
            raise ValueError(
                f"RandAugment policy {policy!r}: the old 'w' key was removed from timm and is not "
                "supported; use 'tweights' for the weighted op choice."
            )
        if key not in _NUMERIC_KEYS:
            raise ValueError(
                f"Unknown key {key!r} in RandAugment policy {policy!r}. " + _POLICY_HELP
            )
        try:
            number = _NUMERIC_KEYS[key](value)
        except ValueError as e:
            raise ValueError(
                f"Bad value in section {section!r} of {policy!r}. " + _POLICY_HELP
            ) from e
        if key == "inc":
            increasing = bool(number)
        elif key == "mstd":
            kw["magnitude_std"] = math.inf if number > 100 else number  # timm: > 100 is uniform
        else:
            kw[{"m": "magnitude", "n": "num_layers", "p": "prob", "mmax": "magnitude_max"}[key]] = (
                number
            )
    if transforms in (None, ""):
        kw["ops"] = RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS
    elif transforms == "weights":
        kw["ops"] = tuple(RAND_WEIGHTED_0)
        total = sum(RAND_WEIGHTED_0.values())
        kw["weights"] = tuple(w / total for w in RAND_WEIGHTED_0.values())
    else:
        raise ValueError(
            f"RandAugment policy {policy!r}: transform set {transforms!r} is not implemented "
            "(timm's '3a'/'3aw' need Desaturate and GaussianBlur); supported: 'tweights' or none."
        )
    parsed = Policy(**kw)
    if parsed.num_layers < 0 or not 0.0 <= parsed.prob <= 1.0 or parsed.magnitude < 0:
        raise ValueError(f"RandAugment policy {policy!r} needs n >= 0, 0 <= p <= 1 and m >= 0.")
    if parsed.weights is not None and parsed.num_layers > len(parsed.ops):
        raise ValueError(
            f"RandAugment policy {policy!r}: weighted choice draws without replacement, so n must "
            f"be <= {len(parsed.ops)}."
        )
    return parsed
