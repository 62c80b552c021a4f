"""A CLIP model as a teacher: zero-shot class logits from its image tower and a fixed text head.

`--config.teacher.framework=clip --config.teacher.name=clip_vit_b32
--config.teacher.checkpoint=WEIGHTS` (a deit_jax weights directory from `python -m
deit_jax.convert`, a transformers CLIP directory or an open_clip / OpenAI file). Before training
the text tower embeds every prompt once (`teacher.prompts` templates x `teacher.class_names`,
`deit_jax.data.labels`) into the zero-shot head W (D, C) (`deit_jax.teacher.clip.head`, open_clip's
`build_zero_shot_classifier`); the text tower never runs in the train step. The
teacher is then an ordinary frozen Flax module, `ZeroShotCLIP`, so the live train step, the eval
step, feature distillation and the cache writer use it as any registry teacher:

    logits = min(exp(logit_scale), 100) * normalise(encode_image(x)) @ W

Its input is the stream's images (the student's normalisation `config.augment.mean/std` and size):
it re-normalises them to CLIP's mean and std (one affine map per channel) and, when the sizes
differ, resizes them to CLIP's `img_size` with `jax.image.resize(..., "bicubic",
antialias=True)`: Keys' cubic with a = -0.5, PIL's bicubic, which CLIP's own preprocessing
uses, antialiased when it shrinks. Its pooled features (`pre_logits`, for feature distillation)
are CLIP's image embedding, projected and not normalised.

The head is saved in the run's workdir (`deit_jax.teacher.clip.head`). A resumed run,
`mode=eval`, the cache writer (its workdir is the cache) and a run reading that cache reuse it;
one whose class names, templates or weights differ from the saved head's is refused, naming what
changed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from deit_jax import data
from deit_jax.config.teacher_rules import cache_paths
from deit_jax.data import labels
from deit_jax.errors import ConfigError
from deit_jax.models import create_model
from deit_jax.models.clip import CLIP_MEAN, CLIP_STD, clip_scale
from deit_jax.models.layers import l2_normalize
from deit_jax.teacher.clip.head import zero_shot_head_for
from deit_jax.teacher.forward import renormalization
from deit_jax.weights.load import load_weights
from deit_jax.weights.state_dict import abstract_variables

INTERPOLATION = "bicubic"  # jax.image.resize: Keys cubic a = -0.5 (PIL's), antialiased


def clip_input(
    images: jax.Array, mean: Sequence[float], std: Sequence[float], size: int
) -> jax.Array:
    """Stream images (B, H, W, 3), normalised by `mean` and `std`, as a CLIP takes them: its
    normalisation, at its `size`."""
    scale, shift = renormalization(tuple(mean), tuple(std), CLIP_MEAN, CLIP_STD)
    x = images.astype(jnp.float32) * jnp.asarray(scale, jnp.float32) + jnp.asarray(
        shift, jnp.float32
    )
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), INTERPOLATION)
    return x


class ZeroShotCLIP(nn.Module):
    """CLIP's image tower and a fixed zero-shot head: class logits for stream images.

    Variables: `{"params": {"clip": <CLIP's params>, "zero_shot_head": W (D, C) float32}}`.
    `img_size` is the size of the images it is given (the stream's); CLIP runs at its own.
    """

    clip: nn.Module
    num_classes: int
    img_size: tuple[int, int]
    input_mean: tuple[float, float, float]
    input_std: tuple[float, float, float]

    def clip_images(self, images: jax.Array) -> jax.Array:
        return clip_input(images, self.input_mean, self.input_std, self.clip.img_size)

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # frozen
        embedding = self.clip(self.clip_images(images), train=False)
        self.sow("intermediates", "pre_logits", embedding)
        head = self.param(
            "zero_shot_head",
            nn.initializers.zeros_init(),
            (embedding.shape[-1], self.num_classes),
            jnp.float32,
        )
        embedding = l2_normalize(embedding.astype(jnp.float32))
        scale = clip_scale(self.clip.logit_scale)
        return scale * embedding @ head


# --------------------------------------------------------------------------- names and prompts


def class_names(config: ml_collections.ConfigDict) -> list[str]:
    """The teacher's classes: `teacher.class_names`, else the data set's own (prompt-ready)."""
    info = data.dataset_info(config)
    given = labels.parse_class_names(config.teacher.class_names)
    if given:
        if info.labelled and len(given) != info.num_classes:
            raise ConfigError(
                f"config.teacher.class_names={config.teacher.class_names!r}: gives {len(given)} "
                f"names but data set {config.data.name!r} has {info.num_classes} classes; give one "
                "name per class, in label order."
            )
        return given
    names = list(info.class_names) if info.class_names else None
    try:
        return labels.dataset_class_names(config.data.name, names)
    except ValueError as e:
        raise ConfigError(f"config.teacher.class_names='': {e}.") from None


def build_clip_teacher(
    config: ml_collections.ConfigDict,
    num_classes: int,
    workdir: str | None = None,
    *,
    shapes: bool = False,
) -> tuple[ZeroShotCLIP, Any]:
    """The zero-shot CLIP teacher of a run and its variables (module docstring).

    `workdir`: where the head is saved and looked for first; a run reading a teacher cache also
    looks in the cache, whose writer saved the head its outputs came from. With `shapes` (a
    plan): the registry's CLIP, its variables and head as shapes, no file read.
    """
    t = config.teacher
    variables, overrides = (None, {}) if shapes else load_weights(t.checkpoint, t.name)
    clip = create_model(t.name, **{**overrides, "dtype": jnp.dtype(config.dtype)})
    if t.img_size and t.img_size != clip.img_size:
        raise ConfigError(
            f"config.teacher.img_size={t.img_size}: a CLIP teacher runs at the resolution of its "
            f"weights ({clip.img_size}; it resizes the student's images to it): remove the key."
        )
    if shapes:
        variables = abstract_variables(clip)
        head = jax.ShapeDtypeStruct((clip.embed_dim, num_classes), jnp.float32)
    else:
        head = _head(config, clip, variables, num_classes, workdir)
    size = config.data.img_size
    teacher = ZeroShotCLIP(
        clip=clip,
        num_classes=num_classes,
        img_size=(size, size) if isinstance(size, int) else tuple(size),
        input_mean=tuple(config.augment.mean),
        input_std=tuple(config.augment.std),
    )
    teacher_variables = {"params": {"clip": variables["params"], "zero_shot_head": head}}
    return teacher, teacher_variables


def _head(config, clip, variables, num_classes: int, workdir: str | None) -> jax.Array:
    """The zero-shot head W (D, C) of the run's class names and prompts: saved, or embedded now."""
    t = config.teacher
    names = class_names(config)
    if len(names) != num_classes:
        raise ConfigError(
            f"config.teacher.class_names={t.class_names!r}: {len(names)} classes, but the run "
            f"has {num_classes}; give one name per class."
        )
    templates = labels.templates(t.prompts)
    directories = [workdir] if workdir else []
    if config.mode != "teacher_cache":
        directories += cache_paths(t.cache)
    return jnp.asarray(zero_shot_head_for(config, clip, variables, names, templates, directories))


def zero_shot_fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The teacher cache manifest's record of the head: class names and templates (hashed)."""
    names = class_names(config)
    templates = labels.templates(config.teacher.prompts)
    digest = lambda items: hashlib.sha256("\n".join(items).encode()).hexdigest()  # noqa: E731
    return {
        "teacher.class_names_sha256": digest(names),
        "teacher.num_class_names": len(names),
        "teacher.prompts": config.teacher.prompts,
        "teacher.templates_sha256": digest(templates),
    }
