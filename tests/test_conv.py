"""Grouped convolutions: the CPU's per-group split equals XLA's `feature_group_count` conv."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from deit_jax.models.conv import Conv, conv_general

DIMS = ("NHWC", "HWIO", "NHWC")


def _reference(x, kernel, stride, groups):
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=DIMS,
        feature_group_count=groups,
    )  # fmt: skip


# bf16: both sides round inputs and outputs to bf16 (8 bits of mantissa) but may accumulate in a
# different order; 2e-2 relative to the output scale is a few bf16 ulps.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("groups", [2, 3, 8])
@pytest.mark.parametrize("stride", [1, 2])
def test_grouped_conv_equals_feature_group_count(groups, stride, dtype):
    rng = np.random.default_rng(groups * 10 + stride)
    cin, cout = 4 * groups, 6 * groups
    x = jnp.asarray(rng.normal(size=(2, 9, 9, cin)), dtype)
    kernel = jnp.asarray(rng.normal(size=(3, 3, cin // groups, cout)) / 6, dtype)
    expected = np.asarray(_reference(x, kernel, stride, groups), np.float32)
    scale = np.abs(expected).max()
    impls = ("auto", "split", "native")
    outs = jax.jit(lambda x, k: [conv_general(x, k, (stride,) * 2, ((1, 1),) * 2, groups, impl)
                                 for impl in impls])(x, kernel)  # fmt: skip
    for impl, out in zip(impls, outs, strict=True):
        assert out.dtype == dtype and out.shape == expected.shape
        err = np.abs(np.asarray(out, np.float32) - expected).max()
        assert err <= TOLERANCE[dtype] * scale, (impl, err, scale)


@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_conv_equals_xla_conv(stride):
    rng = np.random.default_rng(stride)
    x = jnp.asarray(rng.normal(size=(2, 7, 7, 12)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(1, 1, 12, 20)) / 4, jnp.float32)
    expected = lax.conv_general_dilated(x, kernel, (stride,) * 2, ((0, 0),) * 2,
                                        dimension_numbers=DIMS)  # fmt: skip
    fn = jax.jit(lambda x, k: conv_general(x, k, (stride,) * 2, ((0, 0),) * 2))
    if jax.default_backend() == "cpu":
        assert "stablehlo.convolution" not in fn.lower(x, kernel).as_text()  # a matmul
    np.testing.assert_allclose(fn(x, kernel), expected, atol=1e-5, rtol=0)


def test_cpu_lowers_grouped_conv_as_dense_convs_and_gradients_agree():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 6, 6, 8)), jnp.float32)
    kernel = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 2, 8)), jnp.float32)

    def loss(x, k, impl):
        return jnp.sum(conv_general(x, k, (1, 1), ((1, 1),) * 2, 4, impl) ** 2)

    hlo = jax.jit(lambda x, k: loss(x, k, "auto")).lower(x, kernel).as_text()
    if jax.default_backend() == "cpu":  # the split: four dense convs, no feature groups
        assert hlo.count("stablehlo.convolution") == 4 and "feature_group_count = 4" not in hlo
    grads = jax.grad(loss, argnums=(0, 1))
    for a, b in zip(grads(x, kernel, "auto"), grads(x, kernel, "native"), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_conv_module_keeps_flax_conv_parameters():
    x = jnp.ones((1, 8, 8, 6))
    ours = Conv(12, 3, stride=2, padding=1, groups=3, use_bias=True)
    flax_conv = nn.Conv(12, (3, 3), strides=2, padding=((1, 1), (1, 1)), feature_group_count=3)
    shapes = jax.eval_shape(ours.init, jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(
        jnp.shape, jax.eval_shape(flax_conv.init, jax.random.key(0), x)
    )
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)
    np.testing.assert_allclose(ours.apply(params, x), flax_conv.apply(params, x), atol=1e-5)
    with pytest.raises(ValueError, match="not divisible by 4 groups"):
        jax.eval_shape(Conv(8, 3, groups=4).init, jax.random.key(0), x)
