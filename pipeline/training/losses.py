"""Losses by name. Every loss takes logits and either class indices (N,) or soft targets (N, C).

Soft targets come from mixup/cutmix; label smoothing is applied on top of either kind, so focal loss,
label smoothing and mixing combine freely. Optional class weights (a list, or ``"balanced"``) counter
imbalance.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.config import TrainConfig
from pipeline.core.registry import Registry

LOSSES: Registry = Registry("loss")


def soft_targets(targets: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Class indices or soft targets → soft targets, smoothed towards uniform by ``smoothing``."""
    if targets.ndim == 1:
        targets = F.one_hot(targets.long(), num_classes).float()
    targets = targets.float()
    if smoothing > 0:
        targets = targets * (1.0 - smoothing) + smoothing / num_classes
    return targets


class SoftCrossEntropy(nn.Module):
    """Cross-entropy against soft targets; with ``gamma`` > 0 it is the focal loss (Lin et al., 2017)."""

    def __init__(self, smoothing: float = 0.0, gamma: float = 0.0, weight: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.smoothing = smoothing
        self.gamma = gamma
        self.register_buffer("weight", weight if weight is not None else None, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        target = soft_targets(targets, logits.shape[1], self.smoothing)
        log_p = F.log_softmax(logits, dim=1)
        per_class = -target * log_p
        if self.gamma > 0:
            per_class = per_class * (1.0 - log_p.exp()).pow(self.gamma)
        if self.weight is None:
            return per_class.sum(1).mean()
        sample_weight = (target * self.weight).sum(1)  # torch's CE convention: weighted mean
        return (per_class * self.weight).sum(1).sum() / sample_weight.sum().clamp_min(1e-12)


@LOSSES.register("ce")
def _ce(cfg: TrainConfig, weight: Optional[torch.Tensor]) -> nn.Module:
    return SoftCrossEntropy(weight=weight)


@LOSSES.register("label_smoothing")
def _label_smoothing(cfg: TrainConfig, weight: Optional[torch.Tensor]) -> nn.Module:
    return SoftCrossEntropy(smoothing=cfg.label_smoothing, weight=weight)


@LOSSES.register("focal")
def _focal(cfg: TrainConfig, weight: Optional[torch.Tensor]) -> nn.Module:
    return SoftCrossEntropy(gamma=cfg.focal_gamma, weight=weight)


def class_weights(spec, labels: Sequence[int], num_classes: int) -> Optional[torch.Tensor]:
    """``None``, an explicit list, or ``"balanced"`` (n_samples / (n_classes * count), as scikit-learn)."""
    if spec is None:
        return None
    if spec == "balanced":
        counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
        return torch.tensor(len(labels) / (num_classes * np.maximum(counts, 1)), dtype=torch.float32)
    if len(spec) != num_classes:
        raise ValueError(f"train.class_weights has {len(spec)} values for {num_classes} classes")
    return torch.tensor(spec, dtype=torch.float32)


def build_loss(cfg: TrainConfig, labels: Sequence[int], num_classes: int) -> nn.Module:
    return LOSSES.build(cfg.loss, cfg, class_weights(cfg.class_weights, labels, num_classes))
