"""Losses against torch's reference cross-entropy; focal, soft targets, class weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.core.config import TrainConfig
from pipeline.training.losses import LOSSES, SoftCrossEntropy, build_loss, class_weights, soft_targets

torch.manual_seed(0)
LOGITS = torch.randn(16, 4) * 3
TARGETS = torch.randint(0, 4, (16,))
TARGETS[:4] = torch.arange(4)  # every class present


def loss(name: str, labels=TARGETS, **kwargs) -> torch.nn.Module:
    return build_loss(TrainConfig(loss=name, **kwargs), labels.tolist(), 4)


def test_ce_equals_torch_cross_entropy():
    assert loss("ce")(LOGITS, TARGETS).item() == pytest.approx(F.cross_entropy(LOGITS, TARGETS).item(), rel=1e-6)


@pytest.mark.parametrize("smoothing", [0.05, 0.1, 0.3])
def test_label_smoothing_equals_torch(smoothing):
    ours = loss("label_smoothing", label_smoothing=smoothing)(LOGITS, TARGETS).item()
    ref = F.cross_entropy(LOGITS, TARGETS, label_smoothing=smoothing).item()
    assert ours == pytest.approx(ref, rel=1e-6)
    assert ours != pytest.approx(F.cross_entropy(LOGITS, TARGETS).item(), rel=1e-3)


def test_focal_gamma_zero_is_ce():
    ours = loss("focal", focal_gamma=0.0)(LOGITS, TARGETS).item()
    assert ours == pytest.approx(F.cross_entropy(LOGITS, TARGETS).item(), rel=1e-6)


def test_focal_down_weights_confident_correct_examples():
    confident = torch.tensor([[6.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0]])
    y = torch.tensor([0, 1])
    ce = loss("ce")(confident, y).item()
    focal = loss("focal", focal_gamma=2.0)(confident, y).item()
    assert 0 < focal < ce / 10  # (1 - p)^2 with p close to 1 shrinks the loss a lot
    # the per-example focal term matches the formula -(1 - p)^g log p
    p = confident.softmax(1)[torch.arange(2), y]
    assert focal == pytest.approx((-(1 - p) ** 2 * p.log()).mean().item(), rel=1e-5)
    # on a wrong, confident prediction focal keeps most of the loss
    wrong = torch.tensor([[0.0, 6.0, 0.0, 0.0]])
    assert loss("focal", focal_gamma=2.0)(wrong, torch.tensor([0])).item() > 0.9 * loss("ce")(
        wrong, torch.tensor([0])).item()


@pytest.mark.parametrize("name, kwargs", [("ce", {}), ("label_smoothing", {"label_smoothing": 0.2}),
                                          ("focal", {"focal_gamma": 1.5})])
def test_one_hot_soft_targets_equal_hard_targets(name, kwargs):
    fn = loss(name, **kwargs)
    one_hot = F.one_hot(TARGETS, 4).float()
    assert fn(LOGITS, one_hot).item() == pytest.approx(fn(LOGITS, TARGETS).item(), rel=1e-6)


def test_soft_targets_mix_like_mixup():
    """A 50/50 mixed target costs the mean of the two hard-target losses (CE is linear in the target)."""
    a, b = TARGETS, TARGETS.roll(1)
    mixed = 0.5 * F.one_hot(a, 4).float() + 0.5 * F.one_hot(b, 4).float()
    fn = loss("ce")
    expected = 0.5 * F.cross_entropy(LOGITS, a) + 0.5 * F.cross_entropy(LOGITS, b)
    assert fn(LOGITS, mixed).item() == pytest.approx(expected.item(), rel=1e-6)


def test_soft_targets_helper_smooths_towards_uniform():
    t = soft_targets(torch.tensor([2]), 4, smoothing=0.2)
    assert torch.allclose(t, torch.tensor([[0.05, 0.05, 0.85, 0.05]]))
    assert torch.allclose(t.sum(1), torch.ones(1))


def test_balanced_class_weights_match_sklearn_formula_and_torch_weighted_ce():
    labels = [0] * 10 + [1] * 5 + [2] * 3 + [3] * 2
    w = class_weights("balanced", labels, 4)
    assert torch.allclose(w, torch.tensor([20 / 40, 20 / 20, 20 / 12, 20 / 8]))
    fn = build_loss(TrainConfig(loss="ce", class_weights="balanced"), labels, 4)
    ref = F.cross_entropy(LOGITS, TARGETS, weight=w)
    assert fn(LOGITS, TARGETS).item() == pytest.approx(ref.item(), rel=1e-6)
    assert ref.item() != pytest.approx(F.cross_entropy(LOGITS, TARGETS).item(), rel=1e-3)


def test_explicit_class_weights_match_torch_weighted_ce():
    weights = [1.0, 2.0, 0.5, 3.0]
    fn = loss("ce", class_weights=weights)
    ref = F.cross_entropy(LOGITS, TARGETS, weight=torch.tensor(weights))
    assert fn(LOGITS, TARGETS).item() == pytest.approx(ref.item(), rel=1e-6)
    # focal with gamma=0 and weights is the same weighted CE
    focal = loss("focal", focal_gamma=0.0, class_weights=weights)
    assert focal(LOGITS, TARGETS).item() == pytest.approx(ref.item(), rel=1e-6)


def test_class_weights_length_must_match_classes():
    with pytest.raises(ValueError, match="3 values for 4 classes"):
        loss("ce", class_weights=[1.0, 2.0, 3.0])
    assert class_weights(None, [0, 1], 2) is None


def test_unknown_loss_lists_valid_names():
    with pytest.raises(KeyError) as err:
        loss("hinge")
    message = str(err.value)
    assert "hinge" in message
    for name in ("ce", "focal", "label_smoothing"):
        assert name in message
    assert set(LOSSES.names()) >= {"ce", "focal", "label_smoothing"}


def test_loss_backpropagates():
    logits = LOGITS.clone().requires_grad_(True)
    loss("focal")(logits, TARGETS).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_half_precision_logits_are_scored_in_float32():
    fn = SoftCrossEntropy()
    out = fn(LOGITS.to(torch.bfloat16), TARGETS)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(F.cross_entropy(LOGITS.to(torch.bfloat16).float(), TARGETS).item(), rel=1e-5)
