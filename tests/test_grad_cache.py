"""GradCache (deit_jax.train.grad_cache): k micro-batches give the loss and the gradients of the
whole batch, for a loss that couples every row with every other (CLIP's), on a 2 x 2 mesh.
Tolerance: 1e-5 (float32; only the summation order differs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deit_jax import losses
from deit_jax.train import grad_cache


def _towers(params, batch, rng):
    """Two small towers with dropout: the key must be the same in both passes."""
    image = jnp.tanh(batch["image"] @ params["image"])
    keep = jax.random.bernoulli(rng, 0.9, image.shape)
    image = jnp.where(keep, image / 0.9, 0.0)
    text = jnp.tanh(params["embed"][batch["text"]].mean(1) @ params["text"])
    return {"image": image, "text": text}


def _clip_loss(params, embeddings):
    logits = losses.in_batch_logits(embeddings["image"], embeddings["text"], params["scale"])
    return losses.clip_contrastive_loss(logits), logits


def _setup(seed=0, rows=32):
    rng = np.random.default_rng(seed)
    params = {
        "image": jnp.asarray(rng.normal(size=(12, 16)), jnp.float32),
        "text": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
        "embed": jnp.asarray(rng.normal(size=(50, 8)), jnp.float32),
        "scale": jnp.float32(10.0),
    }
    batch = {
        "image": jnp.asarray(rng.normal(size=(rows, 12)), jnp.float32),
        "text": jnp.asarray(rng.integers(0, 50, size=(rows, 5)), jnp.int32),
    }
    return params, batch


def _take(stacked, j):
    return jax.tree.map(lambda x: x[j], stacked)


def _whole_batch(params, batch, rng, k):
    """The reference: every micro-batch's embeddings at once (the same keys), one loss."""
    keys = [jax.random.fold_in(rng, j) for j in range(k)]
    micro = grad_cache.split(batch, k)

    def loss(p):
        parts = [_towers(p, _take(micro, j), keys[j]) for j in range(k)]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *parts)
        return _clip_loss(p, grad_cache.merge(stacked))

    return jax.value_and_grad(loss, has_aux=True)(params)


def test_split_and_merge_are_inverse_and_strided():
    batch = {"x": jnp.arange(12)}
    micro = grad_cache.split(batch, 4)
    np.testing.assert_array_equal(micro["x"][1], [1, 5, 9])
    np.testing.assert_array_equal(grad_cache.merge(micro)["x"], batch["x"])
    with pytest.raises(ValueError, match="a batch of 12 does not split into 5"):
        grad_cache.split(batch, 5)


def test_four_micro_batches_of_8_are_one_batch_of_32_on_a_2x2_mesh():
    params, batch = _setup()
    rng = jax.random.key(3)
    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    batch = jax.device_put(batch, rows)
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    step = jax.jit(grad_cache.value_and_grad, static_argnums=(0, 1, 5))
    (loss, logits), grads = step(_towers, _clip_loss, params, batch, rng, 4)
    (want, want_logits), want_grads = _whole_batch(params, batch, rng, 4)
    assert logits.shape == (32, 32)  # the whole batch's in-batch logits, not 4 of 8 x 8
    np.testing.assert_allclose(loss, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=1e-5)
    for name in params:
        np.testing.assert_allclose(grads[name], want_grads[name], atol=1e-5, rtol=1e-5)

    # Each micro-batch's loss alone, averaged (what accumulating separate steps computes): not it.
    keys = [jax.random.fold_in(rng, j) for j in range(4)]
    micro = grad_cache.split(batch, 4)
    alone = np.mean([
        _clip_loss(params, _towers(params, _take(micro, j), keys[j]))[0]
        for j in range(4)
    ])  # fmt: skip
    assert abs(alone - float(want)) > 1e-2


def test_one_micro_batch_is_plain_value_and_grad():
    params, batch = _setup(rows=8)
    rng = jax.random.key(0)
    (loss, _), grads = grad_cache.value_and_grad(_towers, _clip_loss, params, batch, rng, 1)
    (want, _), want_grads = _whole_batch(params, batch, rng, 1)
    assert float(loss) == float(want)
    for name in params:
        np.testing.assert_array_equal(grads[name], want_grads[name])
