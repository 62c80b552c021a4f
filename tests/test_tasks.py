"""The task seam: which task a run is, is decided once, on the config floor
(`deit_jax.config.tasks.task_of`), and every other module asks it."""

import ast
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _optional import require
from _train_config import tiny_config

from deit_jax import data, sharding
from deit_jax.config import base_config, rules, tasks
from deit_jax.train import optim
from deit_jax.train.state import state_and_shardings
from deit_jax.train.tasks import build_task

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "deit_jax"
# What tells image-caption data from any other: only config/ and data/ may look at it.
DATA_NAME_TESTS = {"is_caption_data", "CAPTIONS_PREFIX", "captioned"}


def _names_used(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    used |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    return used


def test_no_module_outside_config_and_data_decides_the_task_from_the_data_name():
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(_names_used(path) & DATA_NAME_TESTS)
        for path in PACKAGE.rglob("*.py")
        if path.relative_to(PACKAGE).parts[0] not in ("config", "data")
    }
    assert not {k: v for k, v in offenders.items() if v}
    # The check sees what it looks for: config/tasks.py uses it.
    assert "is_caption_data" in _names_used(PACKAGE / "config" / "tasks.py")


@pytest.mark.parametrize(
    "name, task",
    [
        ("digits", tasks.CLASSIFIER),
        ("images:/photos", tasks.CLASSIFIER),
        ("folder:/data/labelled", tasks.CLASSIFIER),
        ("captions:/data/pairs", tasks.CLIP_STUDENT),
    ],
)
def test_the_task_is_the_datas(name, task):
    config = base_config()
    config.data.name = name
    assert tasks.task_of(config).name == task


def test_a_tasks_own_rules_apply_to_its_runs_only(tmp_path):
    """The clip_student table refuses repeated images in a batch; a classifier may repeat them
    (DeiT's repeated augmentation)."""
    config = base_config()
    config.data.name = "digits"
    config.data.repeated_aug = 3
    assert not [p for p in rules.problems(config, num_devices=1) if "repeated_aug" in p]
    config.data.name = f"captions:{tmp_path}"
    found = rules.problems(config, num_devices=1)
    assert any(p.startswith("config.data.repeated_aug=3: must be 1 for a CLIP") for p in found)
    assert any(p.startswith("config.model_name=") for p in found)  # a DeiT is no CLIP student


def _spec(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), dict(tree))


def _planned_step_runs(task, config, mesh, batch):
    """The task's train step traced on shapes alone: state, teacher and batch."""
    tx, schedule = optim.create_optimizer(
        config.optim, global_batch_size=batch, steps_per_epoch=10, num_epochs=1
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_rules(mesh)):
        _, state, _ = state_and_shardings(config, task.model, tx, mesh, task.projection)
        step = task.train_step(tx, schedule)
        new_state, metrics = jax.eval_shape(
            step, state, task.teacher_variables, task.batch_shapes(batch)
        )
        eval_step, args = task.planned_eval(state, batch)
        jax.eval_shape(eval_step, *args)
    assert _spec(new_state.params) == _spec(state.params)
    assert metrics["loss"].shape == ()


def test_a_classifier_from_shapes_reads_no_file_and_takes_its_pipelines_batches(tmp_path):
    """Built for a plan with a teacher checkpoint and a data dir that do not exist, the task
    has the teacher's variables as shapes, and its batch shapes are those of the real
    pipelines (built here on real files) key for key, shape for shape, dtype for dtype."""
    missing = str(tmp_path / "nowhere")
    changes = {"distillation.kind": "hard", "teacher.name": "cnn_small"}
    config = tiny_config(missing, **changes, **{"teacher.checkpoint": missing})
    mesh = sharding.create_mesh(config.mesh)
    task = build_task(config, missing, mesh, purpose=tasks.PLAN)
    assert not os.path.exists(missing)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(task.teacher_variables))
    _planned_step_runs(task, config, mesh, 32)

    real = tiny_config(str(tmp_path / "tfds"), **changes)
    train = data.build_train(real, mesh)
    try:
        assert _spec(task.batch_shapes(32)) == _spec(next(train))
    finally:
        train.close()
    _, args = task.planned_eval(_Weights(), 128)
    assert _spec(args[-1]) == _spec(next(iter(data.build_eval(real, mesh))))


def test_a_clip_student_from_shapes_takes_its_pipelines_batches(tmp_path):
    """A CLIP student with a live CLIP teacher (another context length: two token columns)
    from shapes alone, against the real caption pipeline with the real tokenizers."""
    require("open_clip")
    from PIL import Image

    from deit_jax.weights.tokenizer import tokenizer_of

    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"a thing number {i}\n")
    config = base_config()
    config.model_name = "clip_vit_ti16"
    with config.unlocked():
        config.model.update(
            dict(img_size=8, patch_size=4, vision_width=32, vision_layers=1, text_width=32,
                 text_layers=1, embed_dim=16, context_length=12)
        )  # fmt: skip
    config.model.drop_path_rate = 0.0
    config.data.name = f"captions:{tmp_path}"
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.train_split, config.data.eval_split = "train[:8]", "train[8:]"
    config.data.img_size, config.data.repeated_aug = 8, 1
    config.mixup.mixup_alpha = config.mixup.cutmix_alpha = 0.0
    config.augment.randaugment, config.augment.reprob, config.augment.color_jitter = "", 0.0, 0.0
    config.teacher.framework, config.teacher.name = "clip", "clip_vit_b32"
    config.teacher.checkpoint = str(tmp_path / "no_teacher")
    config.distillation.kind = "in_batch"
    mesh = sharding.create_mesh(config.mesh)
    task = build_task(config, str(tmp_path), mesh, purpose=tasks.PLAN)
    assert task.contexts == {"text": 12, "teacher_text": 77}
    _planned_step_runs(task, config, mesh, 8)

    tokenizers = {"text": tokenizer_of(("open_clip", "12")),
                  "teacher_text": tokenizer_of(("open_clip", "77"))}  # fmt: skip
    config.batch_size = config.eval_batch_size = 8
    train = data.build_train(config, mesh, tokenizers=tokenizers)
    try:
        assert _spec(task.batch_shapes(8)) == _spec(next(train))
    finally:
        train.close()
    _, args = task.planned_eval(_Weights(), 8)
    assert _spec(args[-1]) == _spec(
        next(iter(data.build_eval(config, mesh, tokenizers=tokenizers)))
    )


class _Weights:
    params = model_state = ema_params = None
