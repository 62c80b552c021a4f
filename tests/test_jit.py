"""`deit_jax.jit`: on the CPU deit_jax compiles without YNNPACK fusions, to the same numbers."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from deit_jax.jit import YNN_FLAG, compiler_options, jit
from deit_jax.models import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ynn_fusions(compiled) -> int:
    lines = compiled.as_text().splitlines()
    return sum("ynn_fusion" in line and " fusion(" in line for line in lines)


def test_a_convnet_and_a_deit_compile_without_ynnpack_and_give_the_same_logits():
    teacher = create_model("regnety_002")
    student = create_model("deit_tiny_patch16_224", depth=1)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
    y = jnp.asarray(np.random.default_rng(1).normal(size=(2, 224, 224, 3)), jnp.float32)
    t_vars = teacher.init(jax.random.key(0), x)
    s_vars = student.init(jax.random.key(1), y)

    def forward(t_vars, s_vars, x, y):
        return teacher.apply(t_vars, x), student.apply(s_vars, y, train=False)

    default = jax.jit(forward).lower(t_vars, s_vars, x, y).compile()
    ours = jit(forward).lower(t_vars, s_vars, x, y).compile()
    # XLA's default hands this jaxlib's dots and convolutions to YNNPACK; deit_jax's jit none.
    assert _ynn_fusions(default) > 0
    assert _ynn_fusions(ours) == 0
    # Same math, other kernels: float32 rounding only (relative to each output's scale).
    for a, b in zip(default(t_vars, s_vars, x, y), ours(t_vars, s_vars, x, y), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


def test_options_only_on_the_cpu_and_never_over_the_users_xla_flags():
    assert compiler_options("cpu") == {YNN_FLAG: ""}
    assert compiler_options("gpu") is None and compiler_options("tpu") is None
    # A process whose XLA_FLAGS choose YNNPACK fusions keeps them: jit adds no option.
    code = (
        "from deit_jax.jit import compiler_options, jit\n"
        "import jax.numpy as jnp\n"
        "assert compiler_options() is None, compiler_options()\n"
        "print(float(jit(lambda a: a @ a)(jnp.eye(4)).sum()))\n"
    )
    env = dict(os.environ, XLA_FLAGS=f"--{YNN_FLAG}=individual_dot", JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "4.0"
