"""A CLIP model as a teacher: zero-shot class logits from its image tower and a fixed text head.

`--config.teacher.framework=clip --config.teacher.name=clip_vit_b32
--config.teacher.checkpoint=WEIGHTS` (a deit_jax weights directory from `python -m
deit_jax.convert`, a transformers CLIP directory or an open_clip / OpenAI file). Before training
the text tower embeds every prompt once (`teacher.prompts` templates x `teacher.class_names`,
`deit_jax.prompts`) into the zero-shot head W (D, C) (`deit_jax.teacher.clip.zero_shot_head`,
open_clip's `build_zero_shot_classifier`); the text tower never runs in the train step. The
teacher is then an ordinary frozen Flax module, `ZeroShotCLIP`, so the live train step, the eval
step, feature distillation and the cache writer use it as any registry teacher:

    logits = min(exp(logit_scale), 100) * normalise(encode_image(x)) @ W

Its input is the stream's images (the student's normalisation `config.augment.mean/std` and size):
it re-normalises them to CLIP's mean and std (one affine map per channel) and, when the sizes
differ, resizes them to CLIP's `img_size` with `jax.image.resize(..., "bicubic",
antialias=True)`: Keys' cubic with a = -0.5, PIL's bicubic, which CLIP's own preprocessing
uses, antialiased when it shrinks. Its pooled features (`pre_logits`, for feature distillation)
are CLIP's image embedding, projected and not normalised.

The head is saved in the run's workdir (`zero_shot_head/head.npy`, with `fingerprint.json`:
class names, templates, teacher name, SHA-256 of the weights). A resumed run, `mode=eval`, the
cache writer (its workdir is the cache) and a run reading that cache reuse it; one whose class
names, templates or weights differ from the saved head's is refused, naming what changed.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorstore as ts

from deit_jax import checkpoint, prompts
from deit_jax.errors import CheckpointError, ConfigError
from deit_jax.models import create_model
from deit_jax.models.clip import CLIP_MEAN, CLIP_STD
from deit_jax.teacher import flax_teacher

log = logging.getLogger(__name__)

HEAD_DIR = "zero_shot_head"
INTERPOLATION = "bicubic"  # jax.image.resize: Keys cubic a = -0.5 (PIL's), antialiased


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
        """Stream images (B, H, W, 3) as CLIP takes them: its normalisation, at its size."""
        mean, std = np.asarray(self.input_mean), np.asarray(self.input_std)
        clip_mean, clip_std = np.asarray(CLIP_MEAN), np.asarray(CLIP_STD)
        # (x * std + mean - clip_mean) / clip_std, per channel.
        scale = jnp.asarray(std / clip_std, jnp.float32)
        shift = jnp.asarray((mean - clip_mean) / clip_std, jnp.float32)
        x = images.astype(jnp.float32) * scale + shift
        size = self.clip.img_size
        if x.shape[1:3] != (size, size):
            x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), INTERPOLATION)
        return x

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
        embedding = embedding.astype(jnp.float32)
        embedding = embedding / jnp.linalg.norm(embedding, axis=-1, keepdims=True)
        scale = jnp.minimum(jnp.exp(self.clip.logit_scale), 100.0)
        return scale * embedding @ head


# --------------------------------------------------------------------------- names and prompts


def class_names(config: ml_collections.ConfigDict) -> list[str]:
    """The teacher's classes: `teacher.class_names`, else the data set's own (prompt-ready)."""
    from deit_jax import data  # TensorFlow: only when a teacher is built

    info = data.dataset_info(config)
    given = prompts.parse_class_names(config.teacher.class_names)
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
        return prompts.dataset_class_names(config.data.name, names)
    except ValueError as e:
        raise ConfigError(f"config.teacher.class_names='': {e}.") from None


def _first_difference(kind: str, saved: list[str], now: list[str]) -> str:
    for i, (a, b) in enumerate(zip(saved, now, strict=False)):
        if a != b:
            return f"{kind} {i + 1}: saved {a!r}, now {b!r}"
    longer, extra = (saved, "saved") if len(saved) > len(now) else (now, "now")
    return f"{kind} {min(len(saved), len(now)) + 1}: only {extra} {longer[len(longer) - 1]!r}"


def fingerprint(
    config: ml_collections.ConfigDict, names: list[str], templates: list[str]
) -> dict[str, Any]:
    """What fixes the head: teacher name, SHA-256 of its weights, class names and templates."""
    return {
        "teacher.name": config.teacher.name,
        "teacher.checkpoint": config.teacher.checkpoint,  # informative: moved weights are fine
        "weights_sha256": checkpoint.weights_hash(config.teacher.checkpoint),
        "class_names": list(names),
        "templates": list(templates),
    }


def check_fingerprint(
    saved: dict[str, Any], current: dict[str, Any], config: ml_collections.ConfigDict, where: str
) -> None:
    """Refuses a saved head that another teacher, other weights, names or templates built."""
    t = config.teacher
    reuse = (
        "A resumed run, a teacher cache and the runs that read it keep the teacher they started "
        "with: use the saved value, or another --workdir for a new head."
    )
    problems = []
    if saved["class_names"] != current["class_names"]:
        problems.append(
            f"config.teacher.class_names={t.class_names!r}: the zero-shot head saved in {where} "
            f"was built for other class names ({len(saved['class_names'])} saved, "
            f"{len(current['class_names'])} now; "
            f"{_first_difference('class', saved['class_names'], current['class_names'])}). {reuse}"
        )
    if saved["templates"] != current["templates"]:
        problems.append(
            f"config.teacher.prompts={t.prompts!r}: the zero-shot head saved in {where} was built "
            f"with other prompt templates ({len(saved['templates'])} saved, "
            f"{len(current['templates'])} now; "
            f"{_first_difference('template', saved['templates'], current['templates'])}). {reuse}"
        )
    for key, config_key in (("teacher.name", "name"), ("weights_sha256", "checkpoint")):
        if saved[key] != current[key]:
            problems.append(
                f"config.teacher.{config_key}={t[config_key]!r}: the zero-shot head saved in "
                f"{where} was built from another teacher ({key} {saved[key]!r}, now "
                f"{current[key]!r}). {reuse}"
            )
    if problems:
        raise ConfigError(problems)


# --------------------------------------------------------------------------- storage


def _kvstore(directory: str) -> ts.KvStore:
    path = directory.rstrip("/") + "/" + HEAD_DIR + "/"
    spec = path if "://" in directory else {"driver": "file", "path": os.path.abspath(path) + "/"}
    return ts.KvStore.open(spec).result()


def read_head(directory: str) -> tuple[np.ndarray, dict[str, Any]] | None:
    """(W, fingerprint) saved in `directory`, or None."""
    store = _kvstore(directory)
    meta, values = store.read("fingerprint.json").result(), store.read("head.npy").result()
    if meta.state != "value" or values.state != "value":
        return None
    head = np.load(io.BytesIO(bytes(values.value)), allow_pickle=False)
    return head, json.loads(bytes(meta.value))


def write_head(directory: str, head: np.ndarray, meta: dict[str, Any]) -> None:
    """Saves W and its fingerprint (the fingerprint last: a head without one is not read)."""
    store = _kvstore(directory)
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(head, np.float32), allow_pickle=False)
    store.write("head.npy", buffer.getvalue()).result()
    store.write("fingerprint.json", json.dumps(meta, indent=1)).result()


# --------------------------------------------------------------------------- building


def zero_shot_head_for(
    config: ml_collections.ConfigDict,
    clip: nn.Module,
    variables: Any,
    names: list[str],
    templates: list[str],
    directories: list[str],
) -> np.ndarray:
    """W for this run: the one saved in the first of `directories` that has one (checked
    against this run's fingerprint), else computed by the text tower; saved into
    `directories[0]` (the run's workdir) when it has none."""
    current = fingerprint(config, names, templates)
    head, found_in = None, None
    for directory in directories:
        saved = read_head(directory)
        if saved is not None:
            check_fingerprint(saved[1], current, config, os.path.join(directory, HEAD_DIR))
            head, found_in = saved[0], directory
            log.info("Zero-shot head: reused %s", os.path.join(directory, HEAD_DIR))
            break
    if head is None:
        from deit_jax.teacher.clip import load_tokenizer, zero_shot_head

        start = time.perf_counter()
        tokenize = load_tokenizer(config.teacher.checkpoint)
        fill = [functools.partial(prompts.fill, t) for t in templates]
        # Once, in float32 whatever the run's dtype.
        head = zero_shot_head(clip.clone(dtype=jnp.float32), variables, names, fill, tokenize)
        log.info(
            "Zero-shot head: %d classes x %d templates through the text tower in %.1f s.",
            len(names), len(templates), time.perf_counter() - start,
        )  # fmt: skip
    head = np.asarray(head, np.float32)
    if head.shape != (clip.embed_dim, len(names)):
        raise CheckpointError(
            f"The zero-shot head has shape {head.shape}, expected ({clip.embed_dim}, {len(names)})."
        )
    if directories and found_in != directories[0] and jax.process_index() == 0:
        write_head(directories[0], head, current)
        log.info("Zero-shot head saved in %s", os.path.join(directories[0], HEAD_DIR))
    return head


def build_clip_teacher(
    config: ml_collections.ConfigDict, num_classes: int, workdir: str | None = None
) -> tuple[ZeroShotCLIP, Any]:
    """The zero-shot CLIP teacher of a run and its variables (module docstring).

    `workdir`: where the head is saved and looked for first; a run reading a teacher cache also
    looks in the cache, whose writer saved the head its outputs came from.
    """
    t = config.teacher
    if not t.checkpoint:
        raise ConfigError(
            "config.teacher.checkpoint='': a CLIP teacher needs weights: a deit_jax weights "
            "directory (python -m deit_jax.convert --checkpoint DIR_OR_FILE --model "
            f"{t.name} --output OUT), a transformers CLIP directory or an open_clip file."
        )
    variables, overrides = flax_teacher.load_weights(t.checkpoint, t.name)
    clip = create_model(t.name, **{**overrides, "dtype": flax_teacher.compute_dtype(config.dtype)})
    if t.img_size and t.img_size != clip.img_size:
        raise ConfigError(
            f"config.teacher.img_size={t.img_size}: a CLIP teacher runs at the resolution of its "
            f"weights ({clip.img_size}; it resizes the student's images to it): remove the key."
        )
    names = class_names(config)
    if len(names) != num_classes:
        raise ConfigError(
            f"config.teacher.class_names={t.class_names!r}: {len(names)} classes, but the run "
            f"has {num_classes}; give one name per class."
        )
    templates = prompts.templates(t.prompts)
    directories = [workdir] if workdir else []
    if t.cache and config.mode != "teacher_cache":
        directories.append(t.cache)
    head = zero_shot_head_for(config, clip, variables, names, templates, directories)
    size = config.data.img_size
    teacher = ZeroShotCLIP(
        clip=clip,
        num_classes=len(names),
        img_size=(size, size) if isinstance(size, int) else tuple(size),
        input_mean=tuple(config.augment.mean),
        input_std=tuple(config.augment.std),
    )
    teacher_variables = {
        "params": {"clip": variables["params"], "zero_shot_head": jnp.asarray(head)}
    }
    return teacher, teacher_variables


def zero_shot_fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The teacher cache manifest's record of the head: class names and templates (hashed)."""
    import hashlib

    names = class_names(config)
    templates = prompts.templates(config.teacher.prompts)
    digest = lambda items: hashlib.sha256("\n".join(items).encode()).hexdigest()  # noqa: E731
    return {
        "teacher.class_names_sha256": digest(names),
        "teacher.num_class_names": len(names),
        "teacher.prompts": config.teacher.prompts,
        "teacher.templates_sha256": digest(templates),
    }
