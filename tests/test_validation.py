"""deit_jax.config.rules as library callers meet it: the shipped configs pass, bad values are one
`ConfigError` (a ValueError) listing every problem, raised before any data set is prepared."""

import glob
import importlib.util
import os

import ml_collections
import pytest
from _train_config import tiny_config

from deit_jax import train
from deit_jax.config import base_config, rules
from deit_jax.config.defaults import EXPERIMENTS
from deit_jax.errors import ConfigError
from deit_jax.train.state import student_overrides

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py")))


def load(path):
    spec = importlib.util.spec_from_file_location("config_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_configs_pass_with_the_paths_their_docstrings_give(path, tmp_path):
    config = load(path)
    # Their commands pass a teacher / init_from path; an existing one stands in for it here.
    # The quickstart trains the teacher of its distillation stages (python -m deit_jax.main
    # checks it so).
    quickstart = config.mode == "quickstart"
    if config.distillation.kind != "none" and not quickstart:
        config.teacher.checkpoint = str(tmp_path)
        for member in config.teacher.members.values():  # an ensemble's members' paths too
            member.checkpoint = str(tmp_path)
    prefix, sep, _ = config.data.name.partition(":")
    if sep and config.mode not in EXPERIMENTS:  # a folder of the user's (captions:/data/pairs)
        config.data.name = f"{prefix}:{tmp_path}"
    found = rules.problems(config, num_devices=8, num_processes=2, teacher_from_run=quickstart)
    assert found == []


def test_library_callers_get_every_problem_at_once_before_any_work(tmp_path):
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    config = tiny_config(
        str(data_dir),
        batch_size=0,
        **{"augment.reprob": 2.0, "distillation.tau": 0.0, "data.crop_pct": 1.5},
    )
    for entry in (train.train_and_evaluate, train.evaluate):
        with pytest.raises(ValueError) as e:
            entry(config, str(tmp_path / "w"))
        assert isinstance(e.value, ConfigError)
        keys = [line.split("=", 1)[0] for line in str(e.value).splitlines()]
        assert keys == [
            "config.batch_size",
            "config.distillation.tau",
            "config.data.crop_pct",
            "config.augment.reprob",
        ]
        assert e.value.problems == str(e.value).splitlines()
    assert os.listdir(data_dir) == [] and not (tmp_path / "w").exists()


def test_device_and_process_counts_shape_the_batch_rules():
    config = tiny_config(batch_size=30, eval_batch_size=64, **{"data.num_shares": 4})
    (batch,) = rules.problems(config, num_devices=4, num_processes=2)
    assert batch.startswith("config.batch_size=30: ")
    assert "4 devices of 2 processes" in batch and "use e.g. 32" in batch
    config.batch_size = 32
    assert rules.problems(config, num_devices=4, num_processes=2) == []
    (shares,) = rules.problems(config, num_devices=4, num_processes=8)
    assert shares.startswith("config.data.num_shares=4: ") and "8 processes" in shares
    config.mesh.fsdp = 3
    assert [p.split("=")[0] for p in rules.problems(config, num_devices=4)] == [
        "config.mesh.fsdp"
    ]  # mesh.data depends on mesh.fsdp: not reported on top


def test_a_wrongly_typed_value_is_one_problem_and_its_dependents_are_skipped():
    # Library configs are not type-checked against base_config's types.
    values = base_config().to_dict()
    values["batch_size"] = "32"
    values["data"]["img_size"] = 30  # not a multiple of the patch size 16
    config = ml_collections.ConfigDict(values)
    found = rules.problems(config, num_devices=8)
    assert [p.split("=")[0] for p in found] == ["config.batch_size", "config.data.img_size"]
    assert found[0].startswith("config.batch_size='32': must be a positive integer")
    assert "patch size 16" in found[1] and "use e.g. 16 or 32" in found[1]
    with pytest.raises(ConfigError):
        rules.check_config(config, num_devices=8)


@pytest.mark.parametrize("policy", ["rand-m9-xyz", "rand-mX", "randaug"])
def test_a_bad_randaugment_string_is_refused_by_the_config_check(policy):
    (line,) = rules.problems(tiny_config(**{"augment.randaugment": policy}), num_devices=1)
    assert line.startswith(f"config.augment.randaugment={policy!r}: ")
    assert "RandAugment policy" in line and "rand-m9-mstd0.5-inc1" in line
    # The parser the pipeline applies: the shipped policies pass.
    for good in ("", "rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5", "rand-n2-m10-tweights"):
        assert rules.problems(tiny_config(**{"augment.randaugment": good}), num_devices=1) == []


def test_deit_kernel_options_are_checked_and_other_students_ignore_their_defaults():
    config = base_config()
    config.model.attention, config.model.remat = "cudnn", "all"
    found = rules.problems(config, num_devices=8)
    assert [p.split("=")[0] for p in found] == ["config.model.attention", "config.model.remat"]
    assert "set dtype=bfloat16" in found[0] and "nothing_saveable" in found[1]
    config.dtype, config.model.remat = "bfloat16", "dots_saveable"
    assert rules.problems(config, num_devices=8) == []
    # The defaults (None) reach no student: create_model gets neither option.
    assert {"attention", "remat"}.isdisjoint(student_overrides(base_config(), 10))
    # A ResNet student (its config replaces `model`, as configs/resnet_logit_kd_imagenet.py)
    # takes neither option.
    config = base_config()
    config.model_name = "resnet50"
    with config.unlocked():
        config.model = ml_collections.ConfigDict({"num_classes": None, "attention": "xla"})
    (problem,) = rules.problems(config, num_devices=8)
    assert problem.startswith("config.model=") and "has no option attention" in problem
