"""Exact accumulation for a CLIP student (`optim.grad_accum_steps`, GradCache in the pair step):
4 micro-batches of 8 give the loss and the gradients of one batch of 32, on a 2 x 2 data/FSDP
mesh with the student's parameters sharded as a run shards them, with a live teacher (every
loss on: CLIP, KL, FD, ICL) and from a cache. Tolerance: 1e-5 (float32; the micro-batches only
change the order of sums). The step runs with plain SGD at rate 1, so that the new parameters
are the old minus the gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deit_jax import sharding
from deit_jax.config import base_config, rules, tasks
from deit_jax.models import create_model
from deit_jax.teacher.clip.two_towers import PairTeacher
from deit_jax.train.clip_student import pair_projections
from deit_jax.train.clip_student_steps import PairTeachers, make_pair_train_step
from deit_jax.train.projection import PROJECTION
from deit_jax.train.state import TrainState

ROWS, K = 32, 4
STUDENT = dict(
    img_size=8, patch_size=4, vision_width=32, vision_layers=1, text_width=32, text_layers=1,
    embed_dim=16, context_length=12,
)  # fmt: skip
TEACHER = STUDENT | {"embed_dim": 24, "vision_width": 48, "text_width": 48}


def _config(k: int, cached: bool):
    c = base_config()
    c.model_name = "clip_vit_ti16"
    c.distillation.kind, c.distillation.alpha, c.distillation.tau = "in_batch", 0.7, 2.0
    if not cached:
        c.distillation.pair_weights.fd, c.distillation.pair_weights.icl = 1.0, 0.5
    c.teacher.cache = "/cache" if cached else ""
    c.optim.ema_decay, c.optim.grad_accum_steps = 0.0, k
    return c


@pytest.fixture(scope="module")
def setup():
    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), sharding.DATA_AXES)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(ROWS, 8, 8, 3)).astype(np.float32)
    ids = rng.integers(1, 400, size=(ROWS, 12)).astype(np.int32)
    ids[:, rng.integers(3, 12)] = 49407  # end of text: where the towers pool
    student, teacher = (
        create_model("clip_vit_ti16", **STUDENT),
        PairTeacher(create_model("clip_vit_ti16", **TEACHER), (0.5,) * 3, (0.25,) * 3),
    )
    with nn.logical_axis_rules(sharding.logical_rules(mesh)):
        boxed = jax.jit(student.init)(jax.random.key(0), images[:1])["params"]
        spec = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh)
    teacher_variables = jax.jit(teacher.init)(jax.random.key(1), images[:1], ids[:1])
    t_image, t_text, t_scale = jax.jit(teacher.apply)(teacher_variables, images, ids)
    batch = {"image": images, "text": ids}
    cache = {
        "teacher_image_embedding": np.asarray(t_image),
        "teacher_text_embedding": np.asarray(t_text),
        "teacher_scale": np.full((ROWS,), float(t_scale), np.float32),
    }
    return mesh, student, nn.meta.unbox(boxed), spec, teacher, teacher_variables, batch, cache


def _one_step(setup, k: int, cached: bool, rows=slice(None)):
    mesh, student, params, spec, teacher, teacher_variables, batch, cache = setup
    config = _config(k, cached)
    projections = None if cached else pair_projections(config, student, (24,))
    if projections is not None:
        init = projections.init(jax.random.key(2), jnp.zeros((1, 16)), jnp.zeros((1, 16)))
        params = params | {PROJECTION: nn.meta.unbox(init["params"])}
        spec = spec | {PROJECTION: jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()),
                                                params[PROJECTION])}  # fmt: skip
    tx = optax.sgd(1.0)
    teachers = PairTeachers(
        cached=cached, modules=() if cached else (teacher,), token_keys=("text",)
    )
    step = make_pair_train_step(
        student, tx, lambda s: 1.0, config, teachers=teachers, projections=projections
    )
    data = batch | (cache if cached else {})
    data = jax.tree.map(lambda x: x[rows], data)
    data = jax.device_put(data, NamedSharding(mesh, PartitionSpec(sharding.DATA_AXES)))
    params = jax.device_put(params, spec)
    state = TrainState(
        step=jnp.int32(0), params=params, model_state={}, opt_state=tx.init(params),
        ema_params={}, rng=jax.random.key_data(jax.random.key(3)), nan_step=jnp.int32(-1),
    )  # fmt: skip
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.logical_rules(mesh)):
        new_state, metrics = jax.jit(step)(state, None if cached else teacher_variables, data)
    grads = jax.tree.map(lambda old, new: old - new, params, new_state.params)
    return metrics, grads


@pytest.mark.parametrize("cached", [False, True], ids=["live", "cached"])
def test_four_micro_batches_of_8_are_one_batch_of_32(setup, cached):
    metrics, grads = _one_step(setup, K, cached)
    want_metrics, want_grads = _one_step(setup, 1, cached)
    names = ["loss", "loss_clip", "loss_kl"] + ([] if cached else ["loss_fd", "loss_icl"])
    for name in names:
        np.testing.assert_allclose(metrics[name], want_metrics[name], rtol=1e-5, atol=1e-5)
    flat, want = jax.tree.leaves_with_path(grads), jax.tree.leaves(want_grads)
    largest = max(float(jnp.abs(g).max()) for g in want)
    assert largest > 1e-3  # the gradients are not all ~0: the comparison means something
    for (path, g), w in zip(flat, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))

    if cached:
        return
    # Each micro-batch's loss alone (what accumulating separate steps computes) is not it.
    alone = [float(_one_step(setup, 1, cached, slice(j, None, K))[0]["loss"]) for j in range(K)]
    assert abs(np.mean(alone) - float(want_metrics["loss"])) > 1e-2


def test_a_batch_that_does_not_split_into_the_micro_batches_is_refused():
    config = _config(3, cached=True)
    config.data.name, config.batch_size = "captions:/nonexistent", 32
    with pytest.raises(Exception, match=r"config.optim.grad_accum_steps=3: splits each batch"):
        rules.check_config(config, num_devices=4, planning=True)
    assert tasks.optimizer_config(config).grad_accum_steps == 1  # one update a step
    assert config.optim.grad_accum_steps == 3
