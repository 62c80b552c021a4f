"""Generic distillation against timm 1.0.31's own tasks (`timm.task`), on random inputs.

Each test builds timm's task (`LogitDistillationTask`, `TokenDistillationTask`,
`FeatureDistillationTask`) on small timm models, runs its forward, and feeds the student's and
teacher's outputs of that same forward to `deit_jax.losses.distillation_loss`: the two totals
must agree to 1e-6 (absolute, float32) at T=1; the soft KL is a float32 sum (both sides) scaled by
T**2, which scales its rounding error too, so at T>1 the tolerance is 1e-6 * T**2 (measured worst
difference at T=4: about 1e-6 on a 0.7 loss). timm's tasks take alpha as complementary weights
(`task_loss_weight = 1 - alpha`). Pooled features of deit_jax models are checked against timm's
`forward_head(..., pre_logits=True)` with converted weights (relative L2 1e-5, as the parity
tests).
"""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from timm.loss import SoftTargetCrossEntropy
from timm.task import FeatureDistillationTask, LogitDistillationTask, TokenDistillationTask

from deit_jax import convert, losses
from deit_jax.models import create_model, feature_width, pooled_features
from deit_jax.train.projection import Projection, project

ATOL = 1e-6


def tolerance(tau: float) -> float:
    return ATOL * max(1.0, tau * tau)


B, C, SIZE = 8, 10, 16
SETTINGS = [(alpha, tau) for alpha in (0.3, 0.5, 1.0) for tau in (1.0, 4.0)]
TINY_DEIT = dict(img_size=SIZE, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=C)


@functools.cache  # models are only read (timm's tasks put the teacher in eval mode)
def _timm(name: str, seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs)
    with torch.no_grad():  # larger weights than timm's init: logits far from uniform
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def _batch(seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Images (NCHW) and mixed, smoothed targets as mixup produces them."""
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.normal(size=(B, 3, SIZE, SIZE)).astype(np.float32))
    one_hot = lambda y: np.eye(C, dtype=np.float32)[y] * 0.9 + 0.1 / C  # noqa: E731
    lam = rng.uniform(size=(B, 1)).astype(np.float32)
    targets = lam * one_hot(rng.integers(0, C, B)) + (1 - lam) * one_hot(rng.integers(0, C, B))
    return images, targets.astype(np.float32)


def _teacher_output(task, images: torch.Tensor, features: bool = False) -> np.ndarray:
    """The teacher's output as the task computes it (re-normalised to the teacher's stats)."""
    with torch.no_grad():
        x = task.teacher.normalize_input(images, task.student_mean, task.student_std)
        return task.teacher(x, return_features=features).numpy()


@pytest.mark.parametrize("alpha, tau", SETTINGS)
def test_single_head_soft_kd_equals_timm_logit_distillation_task(alpha, tau):
    student = _timm("deit_tiny_patch16_224", 0, **TINY_DEIT)
    teacher = _timm("resnet18", 1, num_classes=C)
    task = LogitDistillationTask(
        student,
        teacher,
        criterion=SoftTargetCrossEntropy(),
        task_loss_weight=1.0 - alpha,
        temperature=tau,
        verbose=False,
    )
    images, targets = _batch()
    with torch.no_grad():
        out = task(images, torch.from_numpy(targets))
    student_logits = out["output"].numpy()
    teacher_logits = _teacher_output(task, images)
    kwargs = dict(kind="soft", alpha=alpha, tau=tau)
    total, parts = losses.distillation_loss(
        student_logits, None, teacher_logits, targets, kl_reduction="batchmean", **kwargs
    )
    assert abs(float(total) - out["loss"].item()) <= tolerance(tau)
    assert abs(float(parts["distillation"]) - out["kd_loss"].item()) <= tolerance(tau)
    # The DeiT reference's "numel" divides the same KL by the class count as well.
    _, numel = losses.distillation_loss(student_logits, None, teacher_logits, targets, **kwargs)
    np.testing.assert_allclose(float(numel["distillation"]) * C, float(parts["distillation"]))


class _SingleHeadAsTwo(torch.nn.Module):
    """A single-head timm model presented to `TokenDistillationTask` with both heads being its
    one head: timm's `LogitDistillationTask` has no hard mode, so single-head hard KD is checked
    against the token task's hard loss on that head."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.pretrained_cfg, self.num_classes, self.in_chans = model.pretrained_cfg, C, 3

    def set_distilled_training(self, enable: bool = True) -> None:
        pass

    def forward(self, x):
        logits = self.model(x)
        return logits, logits


@pytest.mark.parametrize("alpha, tau", SETTINGS)
def test_single_head_hard_kd_equals_timm_hard_distillation_on_that_head(alpha, tau):
    student = _SingleHeadAsTwo(_timm("deit_tiny_patch16_224", 0, **TINY_DEIT))
    teacher = _timm("resnet18", 1, num_classes=C)
    task = TokenDistillationTask(
        student,
        teacher,
        criterion=SoftTargetCrossEntropy(),
        distill_type="hard",
        task_loss_weight=1.0 - alpha,
        temperature=tau,
        verbose=False,
    )
    images, targets = _batch(1)
    with torch.no_grad():
        out = task(images, torch.from_numpy(targets))
    total, parts = losses.distillation_loss(
        out["output"].numpy(),
        None,
        _teacher_output(task, images),
        targets,
        kind="hard",
        alpha=alpha,
        tau=tau,
    )
    assert abs(float(total) - out["loss"].item()) <= ATOL
    assert abs(float(parts["distillation"]) - out["distill_loss"].item()) <= ATOL


@pytest.mark.parametrize("kind", ["soft", "hard"])
@pytest.mark.parametrize("alpha, tau", SETTINGS)
def test_token_kd_batchmean_equals_timm_token_distillation_task(kind, alpha, tau):
    student = _timm("deit_tiny_distilled_patch16_224", 0, **TINY_DEIT)
    teacher = _timm("resnet18", 1, num_classes=C)
    task = TokenDistillationTask(
        student,
        teacher,
        criterion=SoftTargetCrossEntropy(),
        distill_type=kind,
        task_loss_weight=1.0 - alpha,
        temperature=tau,
        verbose=False,
    )
    images, targets = _batch(2)
    with torch.no_grad():
        out = task(images, torch.from_numpy(targets))
        cls_logits, dist_logits = task.trainable_module(images)  # deterministic (no dropout)
    np.testing.assert_array_equal(cls_logits.numpy(), out["output"].numpy())
    total, parts = losses.distillation_loss(
        cls_logits.numpy(),
        dist_logits.numpy(),
        _teacher_output(task, images),
        targets,
        kind=kind,
        alpha=alpha,
        tau=tau,
        kl_reduction="batchmean",
    )
    tol = tolerance(tau if kind == "soft" else 1.0)
    assert abs(float(total) - out["loss"].item()) <= tol
    assert abs(float(parts["distillation"]) - out["distill_loss"].item()) <= tol


@pytest.mark.parametrize("alpha", [0.3, 0.5, 1.0])
def test_feature_kd_equals_timm_feature_distillation_task(alpha):
    student = _timm("deit_tiny_patch16_224", 0, **TINY_DEIT)  # 32 features
    teacher = _timm("resnet18", 1, num_classes=C)  # 512 features: timm adds a projection
    task = FeatureDistillationTask(
        student, teacher, criterion=SoftTargetCrossEntropy(), task_loss_weight=1.0 - alpha
    )
    linear = task.trainable_module.projection
    assert linear is not None and (linear.in_features, linear.out_features) == (32, 512)
    images, targets = _batch(3)
    with torch.no_grad():
        out = task(images, torch.from_numpy(targets))
        raw = student.forward_head(student.forward_features(images), pre_logits=True).numpy()
    # The same projection weights in deit_jax's layout: kernel (in, out).
    projection = Projection(32, 512)
    params = {
        "projection": {
            "fc": {"kernel": linear.weight.detach().numpy().T, "bias": linear.bias.detach().numpy()}
        }
    }
    total, parts = losses.distillation_loss(
        out["output"].numpy(),
        None,
        None,
        targets,
        kind="feature",
        alpha=alpha,
        tau=1.0,
        student_features=project(projection, params, jnp.asarray(raw)),
        teacher_features=_teacher_output(task, images, features=True),
    )
    assert abs(float(total) - out["loss"].item()) <= ATOL
    assert abs(float(parts["distillation"]) - out["kd_loss"].item()) <= ATOL


@pytest.mark.parametrize(
    "name, overrides, size",
    [
        ("deit_tiny_patch16_224", TINY_DEIT, SIZE),
        ("deit_tiny_distilled_patch16_224", TINY_DEIT, SIZE),  # mean of class and dist tokens
        ("resnet18", dict(num_classes=C), 32),
        ("regnety_002", dict(num_classes=C), 32),
    ],
)
def test_pooled_features_match_timm_pre_logits(name, overrides, size):
    reference = _timm(name, 2, **overrides).eval()
    images = np.random.default_rng(4).normal(size=(2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        expected = reference.forward_head(reference.forward_features(x), pre_logits=True).numpy()
    overrides = {k: v for k, v in overrides.items() if k != "img_size" or "deit" in name}
    variables = convert.torch_to_flax(reference.state_dict(), name, **overrides)
    model = create_model(name, **overrides)
    _, features, _ = pooled_features(model, variables, images)
    error = np.linalg.norm(np.asarray(features) - expected) / np.linalg.norm(expected)
    assert features.shape == expected.shape and error <= 1e-5, error
    assert feature_width(model) == expected.shape[-1]


def test_unknown_kl_reduction_is_refused():
    logits = np.zeros((2, C), np.float32)
    with pytest.raises(ValueError, match="kl_reduction 'mean'.*'numel'.*'batchmean'"):
        losses.distillation_loss(
            logits, None, logits, logits + 0.1, kind="soft", alpha=0.5, tau=1.0, kl_reduction="mean"
        )
