"""The training loop end to end on the offline digits data: meshes, resume, errors.

Tolerances: runs on different meshes reduce in different orders, so losses agree to a relative
1e-4 and parameters to an absolute 1e-4 after 8 steps (float32); the same mesh is bitwise
deterministic, so resumed runs must match an uninterrupted run to 1e-6.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from _train_config import tiny_config

from deit_jax import train
from deit_jax.train.metrics import read_jsonl
from deit_jax.weights.directory import load_variables


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def final_params(workdir):
    variables, _ = load_variables(os.path.join(workdir, "weights"))
    return variables["params"]


def losses(workdir):
    return [
        r["train/loss"]
        for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        if "train/loss" in r
    ]


def assert_trees_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def test_one_device_and_eight_device_meshes_agree(data_dir, tmp_path):
    config = tiny_config(data_dir)
    metrics_1 = train.train_and_evaluate(config, str(tmp_path / "one"), devices=jax.devices()[:1])
    reference_loss, reference_params = losses(tmp_path / "one"), final_params(tmp_path / "one")
    assert len(reference_loss) == 8 and metrics_1["count"] == 360
    # Parameters sharded 8 ways, and both axes at once. Pure data parallelism over 8 is the
    # default mesh every other training test runs, and data2_fsdp4 splits the batch as well.
    for name, mesh in {"fsdp8": (1, 8), "data2_fsdp4": (2, 4)}.items():
        cfg = tiny_config(data_dir, **{"mesh.data": mesh[0], "mesh.fsdp": mesh[1]})
        metrics = train.train_and_evaluate(cfg, str(tmp_path / name))
        np.testing.assert_allclose(losses(tmp_path / name), reference_loss, rtol=1e-4)
        assert_trees_close(final_params(tmp_path / name), reference_params, atol=1e-4)
        assert metrics["count"] == 360
        assert abs(metrics["top1"] - metrics_1["top1"]) <= 1 / 360


def test_eval_reports_every_head_ema_and_teacher(data_dir, tmp_path):
    teacher_cfg = tiny_config(data_dir, model_name="deit_tiny_patch16_224")
    train.train_and_evaluate(teacher_cfg, str(tmp_path / "teacher"))
    config = tiny_config(data_dir, **{"distillation.kind": "hard"})
    config.teacher.name = "deit_tiny_patch16_224"
    config.teacher.checkpoint = str(tmp_path / "teacher" / "weights")
    metrics = train.train_and_evaluate(config, str(tmp_path / "student"))
    for key in ("top1", "top5", "cls_top1", "dist_top1", "ema_top1", "teacher_top1", "agreement"):
        assert 0.0 <= metrics[key] <= 1.0, key
    records = read_jsonl(tmp_path / "student" / "metrics.jsonl")
    assert any("train/loss_distillation" in r for r in records)
    assert json.loads((tmp_path / "student" / "weights" / "deit_jax.json").read_text())


def test_distillation_without_teacher_checkpoint_is_refused(data_dir, tmp_path):
    config = tiny_config(data_dir, **{"distillation.kind": "soft"})
    with pytest.raises(ValueError, match="needs a trained teacher"):
        train.train_and_evaluate(config, str(tmp_path))


def test_class_count_mismatch_is_refused(data_dir, tmp_path):
    config = tiny_config(data_dir, **{"model.num_classes": 5})
    with pytest.raises(ValueError, match="has 10 classes"):
        train.train_and_evaluate(config, str(tmp_path))


def test_unknown_config_key_names_the_closest_keys(tmp_path):
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "from deit_jax.config import base_config\n\ndef get_config():\n    return base_config()\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "deit_jax.main",
        f"--config={config_file}",
        f"--workdir={tmp_path / 'w'}",
        "--config.optim.lrr=0.1",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "unknown config key --config.optim.lrr" in result.stderr
    assert "Did you mean --config.optim.lr" in result.stderr
    assert not (tmp_path / "w").exists()
