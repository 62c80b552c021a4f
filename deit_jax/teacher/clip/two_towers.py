"""A CLIP as the teacher of a CLIP student on image-caption pairs (`captions:` data).

Both towers run: the teacher embeds the batch's images (the stream's, mapped to its
normalisation and size as the zero-shot teacher does, `zero_shot.clip_input`) and its captions
(tokenized by its own tokenizer, the batch's `teacher_text`, or `text` when the student's
tokenizer is the same), and its in-batch logits are `min(exp(logit_scale), 100) *
normalise(image) @ normalise(text).T` (`deit_jax.losses.in_batch_logits`): the scale clamped at
100 as open_clip clamps it in training.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from deit_jax.config.defaults import TEACHER_CLIP
from deit_jax.models import create_model
from deit_jax.models.clip import clip_scale
from deit_jax.teacher.clip.zero_shot import clip_input
from deit_jax.weights.load import load_weights
from deit_jax.weights.state_dict import abstract_variables


class PairTeacher(nn.Module):
    """A frozen CLIP's image and text embeddings of a batch of pairs, and its logit scale.

    Variables: `{"params": {"clip": <CLIP's params>}}`."""

    clip: nn.Module
    input_mean: tuple[float, float, float]
    input_std: tuple[float, float, float]

    def __call__(self, images: jax.Array, ids: jax.Array) -> tuple[jax.Array, ...]:
        text = self.clip.encode_text(ids).astype(jnp.float32)
        return self.encode_image(images), text, clip_scale(self.clip.logit_scale)

    def encode_image(self, images: jax.Array) -> jax.Array:
        """The image embeddings (float32, not normalised) of stream images."""
        x = clip_input(images, self.input_mean, self.input_std, self.clip.img_size)
        return self.clip.encode_image(x).astype(jnp.float32)


def build_pair_teacher(
    config: ml_collections.ConfigDict, *, shapes: bool = False
) -> tuple[PairTeacher, Any]:
    """The frozen CLIP teacher of a CLIP-student run and its variables; with `shapes` (a plan),
    the registry's CLIP, its variables as shapes, no file read."""
    t = config.teacher
    variables, overrides = (None, {}) if shapes else load_weights(t.checkpoint, t.name)
    clip = create_model(t.name, **{**overrides, "dtype": jnp.dtype(config.dtype)})
    if variables is None:
        variables = abstract_variables(clip)
    teacher = PairTeacher(
        clip=clip, input_mean=tuple(config.augment.mean), input_std=tuple(config.augment.std)
    )
    return teacher, {"params": {"clip": variables["params"]}}


def teacher_runs_here(config: ml_collections.ConfigDict) -> bool:
    """Whether a CLIP-student run builds its CLIP teacher: whenever it names one
    (`teacher.framework="clip"` and a checkpoint), to distil and to report the teacher's recall
    and zero-shot top-1 and the agreement, also when the student trains by CLIP's loss alone or
    from a cache."""
    return config.teacher.framework == TEACHER_CLIP and bool(config.teacher.checkpoint)
