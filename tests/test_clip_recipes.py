"""configs/clip_recipes.py's students (deit_jax/experiments/clip_recipes.py): each candidate
recipe is the quickstart's student with only its losses, inheritance, mixup and schedule
changed, and every one passes the config rules; the steps-to-recall reading."""

import importlib.util
import os

import pytest

from deit_jax.config import rules
from deit_jax.experiments import clip_quickstart as quickstart
from deit_jax.experiments import clip_recipes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def config():
    path = os.path.join(ROOT, "configs", "clip_recipes.py")
    spec = importlib.util.spec_from_file_location("clip_recipes_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("recipes"))


@pytest.fixture(scope="module")
def teacher(config, workdir):
    """The experiment's own teacher, trained for one epoch: the digits with captions, an
    open_clip CLIP trained on them and converted (its sizes are what inheritance checks)."""
    short = config.copy_and_resolve_references()
    short.clip_quickstart.teacher_epochs = 1
    return quickstart.teacher_weights(short, workdir)


@pytest.fixture(scope="module")
def bases(config, teacher, workdir):
    return clip_recipes._bases(config, 0, teacher, os.path.join(workdir, "data", "pairs"))


def _changed(a, b) -> set[str]:
    flat_a, flat_b = _flatten(a.to_dict()), _flatten(b.to_dict())
    return {k for k in flat_a.keys() | flat_b.keys() if flat_a.get(k) != flat_b.get(k)}


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


@pytest.mark.parametrize("losses", list(clip_recipes.LOSSES))
@pytest.mark.parametrize("inherit", [False, True])
def test_each_loss_student_changes_only_its_losses_and_init(bases, teacher, losses, inherit):
    base = bases["clip"]
    cfg = clip_recipes._student(base, losses, inherit=inherit, teacher=teacher)
    assert not rules.problems(cfg, num_devices=1, teacher_from_run=True)
    expected = set()
    if losses == "none":
        assert cfg.distillation.kind == "none"
        expected.add("distillation.kind")
    else:
        weights = clip_recipes.LOSSES[losses]
        assert {k: cfg.distillation.pair_weights[k] for k in weights} == weights
        expected |= {
            f"distillation.pair_weights.{k}" for k in weights if weights[k] or k in "clip kl"
        }
    if inherit:
        assert (cfg.init_from, cfg.init.inherit) == (teacher, True)
        expected |= {"init_from", "init.inherit"}
    assert _changed(base, cfg) <= expected, _changed(base, cfg) - expected


@pytest.mark.parametrize("name", list(clip_recipes.WEAK_RECIPES))
def test_each_weak_teacher_recipe_is_a_valid_run(config, bases, teacher, name):
    reading, _, spec = clip_recipes.WEAK_RECIPES[name]
    spec = {k: v for k, v in spec.items() if k not in ("losses", "inherit", "long")}
    long = clip_recipes.WEAK_RECIPES[name][2].get("long", False)
    cfg = clip_recipes.weak_student(name, bases, teacher, config.clip_recipes.long_factor)
    assert not rules.problems(cfg, num_devices=1, teacher_from_run=True)
    assert cfg.num_epochs == bases[reading].num_epochs * (
        config.clip_recipes.long_factor if long else 1
    )
    for key, value in spec.items():
        assert _flatten(cfg.to_dict())[key] == value
    assert cfg.eval_every_epochs == config.clip_recipes.eval_every_epochs


def test_steps_to_reach_is_the_first_evaluation_at_the_target():
    evals = [
        {"step": 44, "mean_recall": 0.5},
        {"step": 88, "mean_recall": 0.9},
        {"step": 132, "mean_recall": 0.8},
    ]
    assert clip_recipes.steps_to_reach(evals, 0.85) == 88
    assert clip_recipes.steps_to_reach(evals, 0.5) == 44
    assert clip_recipes.steps_to_reach(evals, 0.95) is None
