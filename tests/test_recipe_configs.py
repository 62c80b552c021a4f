"""The distillation recipe configs load, pass the training loop's checks and say what they do."""

import importlib.util
import os

import pytest

from deit_jax.models import model_options
from deit_jax.train import state

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load(name: str, *args: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.get_config(*args)


@pytest.mark.parametrize("student", ["resnet50", "resnet18"])
def test_resnet_logit_kd_recipe(student, tmp_path):
    module, config = load("resnet_logit_kd_imagenet", student)
    config.teacher.checkpoint = str(tmp_path)  # the check wants an existing teacher path
    state.check_config(config, None)
    assert config.model_name == student and config.teacher.name == "regnety_160"
    assert (config.distillation.kind, config.distillation.kl_reduction) == ("soft", "batchmean")
    # Only overrides the ResNet accepts: `create_model` refuses unknown ones.
    assert set(config.model.to_dict()) <= {"num_classes"} | set(model_options(student))
    for words in ("python -m deit_jax.main", "Hardware and time", "Expected ImageNet top-1"):
        assert words in module.__doc__
    with pytest.raises(ValueError, match="Unknown student"):
        module.get_config("vgg16")


def test_function_matching_recipe(tmp_path):
    module, config = load("deit_function_matching_imagenet", "4800")
    config.teacher.checkpoint = str(tmp_path)
    state.check_config(config, None)
    assert config.num_epochs == 4800
    assert not model_options(config.model_name).get("distilled", False)  # a plain DeiT-S
    assert (config.distillation.kind, config.distillation.alpha) == ("soft", 1.0)  # KL only
    assert config.distillation.kl_reduction == "batchmean" and config.mixup.mixup_alpha > 0
    for words in ("python -m deit_jax.main", "Hardware and time", "Expected ImageNet top-1"):
        assert words in module.__doc__


def test_clip_zero_shot_recipe_is_the_kl_only_loop(tmp_path):
    module, config = load("clip_zero_shot_distill", "10")
    config.teacher.checkpoint = str(tmp_path)
    state.check_config(config, None)
    assert (config.teacher.framework, config.teacher.name) == ("clip", "clip_vit_b32")
    assert (config.distillation.kind, config.distillation.kl_reduction) == ("soft", "batchmean")
    assert (config.distillation.alpha, config.distillation.tau) == (1.0, 1.0)
    assert not config.distillation.tau_squared  # the loop's F.kl_div for any T
    assert (config.optim.lr, config.batch_size, config.optim.weight_decay) == (1e-5, 32, 0.0)
    assert not model_options(config.model_name).get("distilled", False)
    for words in (
        "huggingface-cli download openai/clip-vit-base-patch32",
        "python -m deit_jax.convert",
        "python -m deit_jax.main",
        "Hardware and time",
        "Expected ImageNet top-1",
        "63.3%",
    ):
        assert words in module.__doc__


def test_clip_kd_captions_recipe_is_clip_kds_script(tmp_path):
    """CLIP-KD's ViT-L/14 -> ViT-B/16 script (winycg/CLIP-KD ViT_L_14_KD_Laion/ViT_B_16_kd.sh):
    its loss weights, batch, learning rate, epochs and warmup steps, on a caption folder."""
    from deit_jax.config import rules

    module, config = load("clip_kd_captions")
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    config.teacher.checkpoint, config.data.name = str(tmp_path), f"captions:{pairs}"
    assert rules.problems(config, num_devices=8) == []  # 1,024 over 8 devices
    assert (config.model_name, config.teacher.name) == ("clip_vit_b16", "clip_vit_l14")
    weights = config.distillation.pair_weights.to_dict()
    assert weights == {"clip": 1.0, "kl": 1.0, "icl": 1.0, "fd": 2000.0}
    assert (config.batch_size, config.optim.lr, config.num_epochs) == (1024, 1e-3, 32)
    assert config.optim.lr_batch_base == config.batch_size  # 1e-3 is the peak, as in the script
    steps_per_epoch = config.plan.num_examples * 0.999 / config.batch_size
    assert round(config.optim.warmup_epochs * steps_per_epoch) == 10_000
    for words in ("python -m deit_jax.main", "Hardware and time", "57.5%", "--config.mode=plan",
                  "--config.data.extra_eval=imagenet2012:validation"):  # fmt: skip
        assert words in module.__doc__
