"""DeiT's GPU-ready options: `attention="xla"` (jax.nn.dot_product_attention) and `remat`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import meta

from deit_jax.models import create_model, forward_with_intermediates

# A small DeiT: 4 heads of width 16, one block, 32x32 images in 16x16 patches.
SMALL = dict(img_size=32, embed_dim=64, depth=1, num_heads=4, num_classes=10)


@pytest.fixture(scope="module")
def setup():
    model = create_model("deit_tiny_distilled_patch16_224", **SMALL)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    # Random parameters of the right shapes (initialising through model.init compiles slowly).
    shapes = meta.unbox(jax.eval_shape(model.init, jax.random.key(0), images[:1])["params"])
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.normal(size=s.shape), s.dtype), shapes)
    return model, params, images


def test_xla_attention_kernel_gives_todays_logits_and_keeps_attention_maps(setup):
    model, params, images = setup
    fused = model.clone(attention="xla")
    apply = jax.jit(lambda m, p, x: m.apply({"params": p}, x), static_argnums=0)
    np.testing.assert_allclose(apply(fused, params, images), apply(model, params, images),
                               atol=1e-6, rtol=0)  # fmt: skip
    # The fused path really differs in its program: it calls dot_product_attention's softmax
    # on (B, N, H, D) operands rather than the written-out einsums.
    assert "bhqk" not in str(jax.make_jaxpr(lambda p: fused.apply({"params": p}, images))(params))
    _, inter = jax.jit(lambda p: forward_with_intermediates(fused, {"params": p}, images))(params)
    assert len(inter["attention"]) == 1 and inter["attention"][0].shape == (2, 4, 6, 6)
    np.testing.assert_allclose(inter["attention"][0].sum(-1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="Unknown attention kernel 'flash'"):
        model.clone(attention="flash").apply({"params": params}, images)


def test_remat_gives_the_same_loss_and_gradients(setup):
    model, params, images = setup
    labels = jnp.asarray([1, 7])

    def loss(model, params):
        cls, dist = model.apply({"params": params}, images, train=True,
                                rngs={"dropout": jax.random.key(3)})  # fmt: skip
        ce = optax.softmax_cross_entropy_with_integer_labels
        return (ce(cls, labels) + ce(dist, labels)).mean()

    grad = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
    # Drop path on: the rematerialised blocks must redraw the same masks.
    base = model.clone(drop_path_rate=0.5)
    value, grads = grad(base, params)
    remat = base.clone(remat="nothing_saveable", attention="xla")
    lowered = grad.lower(remat, params)
    assert "optimization_barrier" in lowered.as_text()  # the backward pass recomputes the blocks
    value_r, grads_r = lowered.compile()(params)
    np.testing.assert_allclose(value_r, value, atol=1e-6, rtol=0)
    for a, b in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="Unknown remat policy 'all'"):
        model.clone(remat="all").apply({"params": params}, images)
