"""Losses against the reference PyTorch DeiT `DistillationLoss` and timm's criteria (float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from deit_jax import losses

ATOL = 1e-6  # absolute, float32
B, C = 16, 10


def reference_distillation_loss(outputs, outputs_kd, teacher_outputs, labels, kind, alpha, tau):
    """The reference DistillationLoss.forward with SoftTargetCrossEntropy as base criterion."""
    base_loss = SoftTargetCrossEntropy()(outputs, labels)
    if kind == "none":
        return base_loss, None
    if kind == "soft":
        T = tau
        distillation_loss = (
            F.kl_div(
                F.log_softmax(outputs_kd / T, dim=1),
                F.log_softmax(teacher_outputs / T, dim=1),
                reduction="sum",
                log_target=True,
            )
            * (T * T)
            / outputs_kd.numel()
        )
    else:
        distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
    return base_loss * (1 - alpha) + distillation_loss * alpha, distillation_loss


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    cls_logits = rng.normal(size=(B, C)).astype(np.float32) * 3
    dist_logits = rng.normal(size=(B, C)).astype(np.float32) * 3
    teacher_logits = rng.normal(size=(B, C)).astype(np.float32) * 3
    # Mixed + smoothed targets, as mixup produces them: a convex mix of two smoothed one-hots.
    labels_a, labels_b = rng.integers(0, C, B), rng.integers(0, C, B)
    lam = rng.uniform(size=(B, 1)).astype(np.float32)
    eps = 0.1
    one_hot = lambda y: np.eye(C, dtype=np.float32)[y] * (1 - eps) + eps / C
    targets = (lam * one_hot(labels_a) + (1 - lam) * one_hot(labels_b)).astype(np.float32)
    return cls_logits, dist_logits, teacher_logits, targets


@pytest.mark.parametrize("kind", ["none", "soft", "hard"])
def test_distillation_loss_matches_reference(kind):
    cls_logits, dist_logits, teacher_logits, targets = _inputs()
    t = dict(
        cls_logits=torch.from_numpy(cls_logits),
        dist_logits=torch.from_numpy(dist_logits),
        teacher_logits=torch.from_numpy(teacher_logits),
        targets=torch.from_numpy(targets),
    )
    # alpha and tau traced: one compilation per kind, and checks that they may be jit arguments.
    fn = jax.jit(losses.distillation_loss, static_argnames="kind")
    worst = 0.0
    for alpha in (0.0, 0.1, 0.5, 1.0):
        for tau in (1.0, 3.0):
            want, want_distill = reference_distillation_loss(
                t["cls_logits"],
                t["dist_logits"],
                t["teacher_logits"],
                t["targets"],
                kind,
                alpha,
                tau,
            )
            total, parts = fn(
                cls_logits, dist_logits, teacher_logits, targets, kind=kind, alpha=alpha, tau=tau
            )
            assert total.dtype == jnp.float32
            err = abs(float(total) - want.item())
            worst = max(worst, err)
            assert err <= ATOL, (kind, alpha, tau, float(total), want.item())
            if want_distill is not None:
                assert abs(float(parts["distillation"]) - want_distill.item()) <= ATOL
            assert (
                abs(
                    float(parts["base"])
                    - SoftTargetCrossEntropy()(t["cls_logits"], t["targets"]).item()
                )
                <= ATOL
            )
    print(f"kind={kind}: max |jax - torch| = {worst:.2e}")


def test_none_ignores_distillation_inputs():
    cls_logits, _, _, targets = _inputs(1)
    total, parts = losses.distillation_loss(
        cls_logits, None, None, targets, kind="none", alpha=0.5, tau=1.0
    )
    np.testing.assert_allclose(total, parts["base"])
    assert float(parts["distillation"]) == 0.0


def test_soft_target_cross_entropy_matches_timm():
    cls_logits, _, _, targets = _inputs(2)
    want = SoftTargetCrossEntropy()(torch.from_numpy(cls_logits), torch.from_numpy(targets))
    got = losses.soft_target_cross_entropy(cls_logits, targets)
    assert abs(float(got) - want.item()) <= ATOL


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_label_smoothing_cross_entropy_matches_timm(smoothing):
    cls_logits, *_ = _inputs(3)
    labels = np.random.default_rng(3).integers(0, C, B)
    want = LabelSmoothingCrossEntropy(smoothing)(
        torch.from_numpy(cls_logits), torch.from_numpy(labels)
    ).item()
    got = losses.label_smoothing_cross_entropy(cls_logits, jnp.asarray(labels), smoothing)
    assert abs(float(got) - want) <= ATOL
    # The same loss as soft-target CE on smoothed one-hots (mixup's label smoothing).
    targets = losses.smooth_one_hot(jnp.asarray(labels), C, smoothing)
    assert abs(float(losses.soft_target_cross_entropy(cls_logits, targets)) - want) <= ATOL


def test_bfloat16_logits_computed_in_float32():
    cls_logits, dist_logits, teacher_logits, targets = _inputs(4)
    as_bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    total, _ = losses.distillation_loss(
        as_bf16(cls_logits),
        as_bf16(dist_logits),
        as_bf16(teacher_logits),
        targets,
        kind="soft",
        alpha=0.5,
        tau=3.0,
    )
    assert total.dtype == jnp.float32
    # Same value as float32 math on the bf16-rounded logits.
    rounded = [
        np.asarray(as_bf16(x), np.float32) for x in (cls_logits, dist_logits, teacher_logits)
    ]
    want, _ = losses.distillation_loss(*rounded, targets, kind="soft", alpha=0.5, tau=3.0)
    assert abs(float(total) - float(want)) <= ATOL


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_no_gradient_to_teacher(kind):
    cls_logits, dist_logits, teacher_logits, targets = _inputs(5)

    def loss(c, d, t):
        return losses.distillation_loss(c, d, t, targets, kind=kind, alpha=0.5, tau=2.0)[0]

    g_cls, g_dist, g_teacher = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(
        cls_logits, dist_logits, teacher_logits
    )
    assert np.all(np.asarray(g_teacher) == 0)
    assert np.abs(g_cls).sum() > 0 and np.abs(g_dist).sum() > 0
    # Student gradients equal torch's autograd of the reference.
    c, d = (torch.from_numpy(x).requires_grad_() for x in (cls_logits, dist_logits))
    want, _ = reference_distillation_loss(
        c, d, torch.from_numpy(teacher_logits), torch.from_numpy(targets), kind, 0.5, 2.0
    )
    want.backward()
    np.testing.assert_allclose(g_cls, c.grad.numpy(), atol=ATOL)
    np.testing.assert_allclose(g_dist, d.grad.numpy(), atol=ATOL)


def test_bad_inputs_raise_clear_errors():
    cls_logits, dist_logits, teacher_logits, targets = _inputs(6)
    with pytest.raises(ValueError, match="Unknown distillation kind 'sof'"):
        losses.distillation_loss(
            cls_logits, dist_logits, teacher_logits, targets, kind="sof", alpha=0.5, tau=1.0
        )
    with pytest.raises(ValueError, match="needs the teacher's logits"):
        losses.distillation_loss(cls_logits, None, None, targets, kind="hard", alpha=0.5, tau=1.0)
    with pytest.raises(ValueError, match="pooled pre-logit features"):
        losses.distillation_loss(cls_logits, None, None, targets, kind="feature", alpha=0.5, tau=1)
    with pytest.raises(ValueError, match="alpha"):
        losses.distillation_loss(
            cls_logits, dist_logits, teacher_logits, targets, kind="soft", alpha=1.5, tau=1.0
        )
    with pytest.raises(ValueError, match="smooth_one_hot"):
        losses.soft_target_cross_entropy(cls_logits, np.zeros(B, np.int32))
    with pytest.raises(ValueError, match="classes"):
        losses.distillation_loss(
            cls_logits, dist_logits, teacher_logits[:, :5], targets, kind="soft", alpha=0.5, tau=1.0
        )


def test_topk_correct():
    logits = jnp.array([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]])
    labels = jnp.array([1, 2, 1])
    hits = jax.jit(losses.topk_correct, static_argnames="ks")(logits, labels, ks=(1, 2, 5))
    np.testing.assert_array_equal(hits["top1"], [1, 0, 0])
    np.testing.assert_array_equal(hits["top2"], [1, 1, 1])
    np.testing.assert_array_equal(hits["top5"], [1, 1, 1])  # k above the class count: all hits
    # Against torch.topk on random logits (no ties).
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(64, 20)).astype(np.float32)
    labels = rng.integers(0, 20, 64)
    hits = losses.topk_correct(logits, jnp.asarray(labels))
    top5 = torch.from_numpy(logits).topk(5, dim=1).indices.numpy()
    np.testing.assert_array_equal(hits["top1"], top5[:, 0] == labels)
    np.testing.assert_array_equal(hits["top5"], (top5 == labels[:, None]).any(1))


def test_binary_cross_entropy_matches_torch_on_binarised_mixed_targets():
    cls_logits, _, _, targets = _inputs(3)
    targets[targets < 0.02] = 0.0  # mixed targets without smoothing: zeros off the two classes
    targets[0] = np.eye(C, dtype=np.float32)[2]  # an unmixed row too
    expected = torch.nn.BCEWithLogitsLoss()(
        torch.from_numpy(cls_logits * 4), torch.from_numpy(targets).gt(0.0).float()
    )
    got = losses.binary_cross_entropy(jnp.asarray(cls_logits * 4), jnp.asarray(targets))
    assert abs(float(got) - expected.item()) <= ATOL
    # Binarised: the weights of the mix do not matter, only which classes have any.
    same = losses.binary_cross_entropy(jnp.asarray(cls_logits * 4), jnp.asarray(targets > 0))
    assert float(got) == float(same)
    assert abs(float(got) - float(losses.soft_target_cross_entropy(cls_logits, targets))) > 0.1


@pytest.mark.parametrize("kind", ["none", "soft", "hard"])
def test_bce_is_the_base_term_of_every_distillation_kind(kind):
    cls_logits, dist_logits, teacher_logits, targets = _inputs(4)
    targets[targets < 0.02] = 0.0
    total, parts = losses.distillation_loss(
        cls_logits,
        dist_logits,
        teacher_logits,
        targets,
        kind=kind,
        alpha=0.5,
        tau=2.0,
        base_criterion="bce",
    )
    base = torch.nn.BCEWithLogitsLoss()(
        torch.from_numpy(cls_logits), torch.from_numpy(targets).gt(0.0).float()
    ).item()
    assert abs(float(parts["base"]) - base) <= ATOL
    _, ce_parts = losses.distillation_loss(
        cls_logits, dist_logits, teacher_logits, targets, kind=kind, alpha=0.5, tau=2.0
    )
    distill = float(ce_parts["distillation"])
    expected = base if kind == "none" else 0.5 * base + 0.5 * distill
    assert abs(float(total) - expected) <= ATOL
    with pytest.raises(ValueError, match="Unknown config.loss 'mse'"):
        losses.distillation_loss(
            cls_logits,
            dist_logits,
            teacher_logits,
            targets,
            kind=kind,
            alpha=0.5,
            tau=2.0,
            base_criterion="mse",
        )
