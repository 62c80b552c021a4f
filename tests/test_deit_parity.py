"""Parity of the Flax DeiT models with timm's PyTorch DeiT, through `deit_jax.convert`.

Tolerance: relative L2 error <= 1e-5 in float32 (the foundation issue's bound). timm's weights are
re-drawn at random (all of them, biases and norms included) so every converted tensor matters.
"""

import numpy as np
import pytest
import timm
import torch

import deit_jax
from deit_jax import convert

REFERENCE_PARAMS = {
    "deit_tiny_patch16_224": 5_717_416,
    "deit_small_patch16_224": 22_050_664,
    "deit_base_patch16_224": 86_567_656,
    "deit_tiny_distilled_patch16_224": 5_910_800,
    "deit_small_distilled_patch16_224": 22_436_432,
    "deit_base_distilled_patch16_224": 87_338_192,
    "deit_base_patch16_384": 86_859_496,
    "deit_base_distilled_patch16_384": 87_630_032,
}
RTOL = 1e-5


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def random_timm_model(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model.eval()


def test_registry_has_the_reference_names():
    assert set(REFERENCE_PARAMS) <= set(deit_jax.list_models("deit_*"))


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_parity_with_timm(name):
    torch_model = random_timm_model(name)
    assert sum(p.numel() for p in torch_model.parameters()) == REFERENCE_PARAMS[name]
    variables = convert.torch_to_flax(torch_model.state_dict(), name)
    model = deit_jax.create_model(name)
    assert sum(x.size for x in __import__("jax").tree.leaves(variables)) == REFERENCE_PARAMS[name]

    size = model.img_size
    images = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    got = model.apply(variables, images, train=False)
    assert rel_l2(got, expected) <= RTOL

    if model.distilled:  # train mode returns both heads (timm: set_distilled_training)
        torch_model.set_distilled_training(True)
        torch_model.train()
        with torch.no_grad():
            exp_cls, exp_dist = torch_model(torch.from_numpy(images).permute(0, 3, 1, 2))
        got_cls, got_dist = model.apply(variables, images, train=True)
        assert rel_l2(got_cls, exp_cls.numpy()) <= RTOL
        assert rel_l2(got_dist, exp_dist.numpy()) <= RTOL
        assert not np.allclose(got_cls, got_dist)


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_small_distilled_patch16_224"])
def test_round_trip_is_exact(name):
    state_dict = random_timm_model(name).state_dict()
    back = convert.flax_to_torch(convert.torch_to_flax(state_dict, name), name)
    assert set(back) == set(state_dict)
    for key, value in state_dict.items():
        assert back[key].dtype == value.dtype, key
        assert torch.equal(back[key], value), key
    timm.create_model(name, pretrained=False).load_state_dict(back, strict=True)


def test_intermediates_match_timm_attention():
    name = "deit_tiny_distilled_patch16_224"
    torch_model = random_timm_model(name)
    variables = convert.torch_to_flax(torch_model.state_dict(), name)
    images = np.random.default_rng(1).normal(size=(1, 224, 224, 3)).astype(np.float32)
    _, inter = deit_jax.forward_with_intermediates(deit_jax.create_model(name), variables, images)
    block_outputs = []
    for block in torch_model.blocks:
        block.register_forward_hook(lambda module, args, out: block_outputs.append(out.numpy()))
    with torch.no_grad():
        tokens = torch_model.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2))
    assert len(inter["block_tokens"]) == 12
    for ours, theirs in zip(inter["block_tokens"], block_outputs, strict=True):
        assert rel_l2(ours, theirs) <= RTOL
    assert len(inter["attention"]) == 12
    assert inter["attention"][0].shape == (1, 3, 198, 198)
    np.testing.assert_allclose(np.asarray(inter["attention"][-1]).sum(-1), 1.0, atol=1e-5)
    assert rel_l2(inter["tokens"], tokens.numpy()) <= RTOL
