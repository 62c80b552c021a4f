"""Convnet teachers: parity with timm, conversion round trips, BatchNorm, and a digits teacher."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import timm
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from deit_jax import convert
from deit_jax.models import RegNet, ResNet, create_model, input_size
from deit_jax.models.blocks import BatchNorm
from deit_jax.models.regnet import regnet_stages
from deit_jax.weights.timm_keys import torch_key


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _shapes(model) -> dict:
    h, w = input_size(model)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, h, w, 3))))
    return flax.core.unfreeze(flax.linen.meta.unbox(shapes))


def _timm_with_random_stats(name: str) -> torch.nn.Module:
    """A randomly initialised timm model whose BatchNorms are all non-trivial.

    timm zero-initialises the last BN scale of each residual branch, and fresh running stats are
    (0, 1); randomising them makes every BN parameter and statistic matter for the logits.
    """
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize(
    "name", ["regnety_040", "regnety_080", "regnety_120", "regnety_160", "resnet18", "resnet50"]
)
def test_parameters_match_timm_key_for_key(name):
    """Same parameter count, and every timm tensor has a Flax twin of the right shape."""
    reference = timm.create_model(name, pretrained=False, device="meta")
    expected = {
        k: tuple(v.shape)
        for k, v in reference.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    shapes = _shapes(create_model(name))
    flat = flax.traverse_util.flatten_dict(shapes)
    ours = {}
    for path, spec in flat.items():
        shape = spec.shape
        if path[-1] == "kernel":  # back to PyTorch's layout: (out, in[, kh, kw])
            shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
        ours[torch_key(path[1:])] = tuple(shape)
    assert ours == expected
    assert _count(shapes["params"]) == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize(
    "name, size", [("regnety_160", 128), ("regnety_040", 128), ("resnet50", 128), ("resnet18", 64)]
)
def test_logits_match_timm_and_round_trip(name, size):
    reference = _timm_with_random_stats(name)
    state_dict = {k: v.clone() for k, v in reference.state_dict().items()}
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(images).numpy()

    variables = convert.torch_to_flax(state_dict, name, img_size=size)
    model = create_model(name, img_size=size)
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(
        variables, jnp.asarray(images.numpy().transpose(0, 2, 3, 1))
    )
    assert logits.shape == (2, 1000)
    error = np.linalg.norm(np.asarray(logits) - expected) / np.linalg.norm(expected)
    assert error <= 1e-5, f"{name}: relative L2 error {error:.2e}"

    back = convert.flax_to_torch(variables, name)
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert back[key].dtype == value.dtype, key
        assert torch.equal(back[key], value), key
    reference.load_state_dict(back, strict=True)


def _tiny_regnet():
    cfg = dict(w0=16, wa=24.0, wm=2.0, depth=5, group_size=8)
    reference = timm.models.regnet.RegNet(
        timm.models.regnet.RegNetCfg(**cfg, se_ratio=0.25), num_classes=100
    )
    return reference, RegNet(**regnet_stages(**cfg), num_classes=100)


def _tiny_resnet(block: str):
    timm_block = {
        "basic": timm.models.resnet.BasicBlock,
        "bottleneck": timm.models.resnet.Bottleneck,
    }
    reference = timm.models.resnet.ResNet(timm_block[block], (1, 1, 1, 1), num_classes=100)
    return reference, ResNet(layers=(1, 1, 1, 1), block=block, num_classes=100)


@pytest.mark.parametrize(
    "make",
    [_tiny_regnet, lambda: _tiny_resnet("basic"), lambda: _tiny_resnet("bottleneck")],
    ids=["regnet", "resnet_basic", "resnet_bottleneck"],
)
def test_init_matches_timm(make):
    """Per tensor: the same zeros and ones, and the same spread (kaiming fan_out, head init).

    One-block-per-stage models keep XLA's compile time for the random init short.
    """
    torch.manual_seed(0)
    reference, model = make()
    reference = reference.state_dict()
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    ours = convert.flax_to_torch(variables)
    assert ours.keys() == reference.keys()
    for key, theirs in reference.items():
        mine = ours[key]
        assert mine.shape == theirs.shape, key
        if key.endswith("num_batches_tracked"):
            continue
        for constant in (0.0, 1.0):
            assert bool((mine == constant).all()) == bool((theirs == constant).all()), key
        if theirs.numel() >= 1000 and theirs.std() > 0:
            ratio = float(mine.std() / theirs.std())
            assert 0.9 < ratio < 1.1, f"{key}: std {mine.std():.4f} vs timm {theirs.std():.4f}"


def test_batch_norm_matches_torch_in_train_and_eval_mode():
    torch.manual_seed(0)
    ours = BatchNorm()
    theirs = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-1, 1)
    variables = {
        "params": {
            "scale": jnp.asarray(theirs.weight.detach()),
            "bias": jnp.asarray(theirs.bias.detach()),
        },
        "batch_stats": {"mean": jnp.zeros(3), "var": jnp.ones(3)},
    }
    for step in range(2):
        x = torch.randn(4, 3, 5, 5) * 3 + step
        expected = theirs.train()(x).detach().numpy().transpose(0, 2, 3, 1)
        out, state = ours.apply(
            variables,
            jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),
            train=True,
            mutable=["batch_stats"],
        )
        variables = {**variables, **state}
        np.testing.assert_allclose(out, expected, atol=1e-5)
        np.testing.assert_allclose(state["batch_stats"]["mean"], theirs.running_mean, atol=1e-6)
        np.testing.assert_allclose(state["batch_stats"]["var"], theirs.running_var, rtol=1e-6)
    x = torch.randn(4, 3, 5, 5)
    expected = theirs.eval()(x).detach().numpy().transpose(0, 2, 3, 1)
    out = ours.apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), train=False)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_cnn_small_shapes_and_batch_stats():
    model = create_model("cnn_small")
    assert input_size(model) == (32, 32)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    widths, c_in, expected = (32, 64, 128, 128), 3, 0
    for w in widths:
        expected += 9 * c_in * w + 2 * w  # conv (no bias) + BN scale and bias
        c_in = w
    assert _count(variables["params"]) == expected + 128 * 10 + 10
    assert _count(variables["batch_stats"]) == 2 * sum(widths)

    images = jax.random.normal(jax.random.key(1), (8, 8, 8, 3)) + 1.0  # 8x8 works too
    train = jax.jit(lambda v: model.apply(v, images, train=True, mutable=["batch_stats"]))
    evaluate = jax.jit(lambda v: model.apply(v, images, train=False))
    logits, state = train(variables)
    assert logits.shape == (8, 10)
    for old, new in zip(
        jax.tree.leaves(variables["batch_stats"]),
        jax.tree.leaves(state["batch_stats"]),
        strict=True,
    ):
        assert not np.allclose(old, new)
    # Train mode normalises with the batch: the stored statistics do not matter.
    np.testing.assert_allclose(train({**variables, **state})[0], logits, atol=1e-5)
    # Eval mode uses the stored statistics.
    assert not np.allclose(evaluate(variables), evaluate({**variables, **state}), atol=1e-3)
    with pytest.raises(flax.errors.ModifyScopeVariableError):
        model.apply(variables, images, train=True)  # forgot mutable=['batch_stats']


def test_cnn_small_learns_digits_in_seconds():
    x, y = load_digits(return_X_y=True)
    x = np.repeat(x.reshape(-1, 8, 8, 1).astype(np.float32) / 8.0 - 1.0, 3, axis=-1)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=360, stratify=y, random_state=0
    )
    model = create_model("cnn_small", img_size=8)
    variables = jax.jit(model.init)(jax.random.key(0), x_train[:1])
    params, stats = variables["params"], variables["batch_stats"]
    batch, epochs = 64, 3
    steps = epochs * (len(x_train) // batch)
    tx = optax.adamw(optax.cosine_decay_schedule(3e-3, steps), weight_decay=1e-4)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, stats, opt_state, images, labels):
        def loss_fn(p):
            logits, state = model.apply(
                {"params": p, "batch_stats": stats}, images, train=True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, state["batch_stats"]

        grads, stats = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state

    rng = np.random.default_rng(0)
    for _ in range(epochs):
        order = rng.permutation(len(x_train))
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i : i + batch]
            params, stats, opt_state = train_step(
                params, stats, opt_state, x_train[idx], y_train[idx]
            )
    logits = model.apply({"params": params, "batch_stats": stats}, x_test, train=False)
    accuracy = float((np.asarray(logits).argmax(-1) == y_test).mean())
    assert accuracy >= 0.95, accuracy


def test_bad_input_names_the_fix():
    model = create_model("resnet18")
    with pytest.raises(ValueError, match=r"3 channels, got shape \(1, 3, 32, 32\)\. Transpose"):
        model.apply({"params": {}}, jnp.zeros((1, 3, 32, 32)))
