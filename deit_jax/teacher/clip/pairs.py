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

from deit_jax.models import create_model, model_options
from deit_jax.teacher.clip.tokenizer import tokenizer_spec
from deit_jax.teacher.clip.zero_shot import clip_input
from deit_jax.weights.load import load_weights

MAX_SCALE = 100.0  # open_clip clamps logit_scale at ln(100)


def clip_scale(logit_scale: jax.Array) -> jax.Array:
    """A CLIP's logit multiplier from its (log) `logit_scale`, clamped at 100."""
    return jnp.minimum(jnp.exp(logit_scale.astype(jnp.float32)), MAX_SCALE)


class PairTeacher(nn.Module):
    """A frozen CLIP's image and text embeddings of a batch of pairs, and its logit scale.

    Variables: `{"params": {"clip": <CLIP's params>}}`."""

    clip: nn.Module
    input_mean: tuple[float, float, float]
    input_std: tuple[float, float, float]

    @nn.compact
    def __call__(self, images: jax.Array, ids: jax.Array) -> tuple[jax.Array, ...]:
        x = clip_input(images, self.input_mean, self.input_std, self.clip.img_size)
        image = self.clip.encode_image(x).astype(jnp.float32)
        text = self.clip.encode_text(ids).astype(jnp.float32)
        return image, text, clip_scale(self.clip.logit_scale)


def build_pair_teacher(config: ml_collections.ConfigDict) -> tuple[PairTeacher, Any]:
    """The frozen CLIP teacher of a CLIP-student run and its variables."""
    t = config.teacher
    variables, overrides = load_weights(t.checkpoint, t.name)
    clip = create_model(t.name, **{**overrides, "dtype": jnp.dtype(config.dtype)})
    teacher = PairTeacher(
        clip=clip, input_mean=tuple(config.augment.mean), input_std=tuple(config.augment.std)
    )
    return teacher, {"params": {"clip": variables["params"]}}


def teacher_runs_here(config: ml_collections.ConfigDict) -> bool:
    """Whether a CLIP-student run builds its CLIP teacher: whenever it names one
    (`teacher.framework="clip"` and a checkpoint), to distil and to report the teacher's recall
    and zero-shot top-1 and the agreement, also when the student trains by CLIP's loss alone or
    from a cache."""
    return config.teacher.framework == "clip" and bool(config.teacher.checkpoint)


def tokenizer_specs(config: ml_collections.ConfigDict) -> dict[str, tuple[str, ...]]:
    """The batch keys of the captions' ids and the tokenizer of each (`tokenizer_spec`): `text`
    (the student's: that of `config.init_from`'s CLIP weights, or open_clip's BPE at the
    student's context length), and `teacher_text` when a teacher runs here with another."""
    if config.init_from:
        student = tokenizer_spec(config.init_from)
    else:
        length = config.model.to_dict().get("context_length")
        student = ("open_clip", str(length or model_options(config.model_name)["context_length"]))
    specs = {"text": student}
    if teacher_runs_here(config):
        teacher = tokenizer_spec(config.teacher.checkpoint)
        if teacher != student:
            specs["teacher_text"] = teacher
    return specs
