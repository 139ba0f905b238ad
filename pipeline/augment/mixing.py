"""Batch-level mixup/cutmix with soft targets (``augment.mixup_alpha``, ``cutmix_alpha``, ``mix_prob``)."""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.config import AugmentConfig


class Mixer:
    """Batch-level mixup/cutmix with soft targets (rows sum to 1), any batch size.

    Per batch, with probability ``mix_prob``: cutmix (probability ``switch_prob`` when both are on) or
    mixup, pairing each image with a random other one. ``lam ~ Beta(alpha, alpha)``; for cutmix it is then
    corrected to the exact kept area. Without mixing the targets are plain one-hot rows. Label smoothing is
    left to the loss.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 mix_prob: float = 1.0, switch_prob: float = 0.5, seed: Optional[int] = None) -> None:
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.mix_prob, self.switch_prob = mix_prob, switch_prob
        self.rng = np.random.default_rng(seed)
        self.last: dict[str, Any] = {}  # what the last call did (mode, lam, perm, box): for tests and logs

    def _mode(self) -> Optional[str]:
        if self.rng.random() >= self.mix_prob:
            return None
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            return "cutmix" if self.rng.random() < self.switch_prob else "mixup"
        return "cutmix" if self.cutmix_alpha > 0 else ("mixup" if self.mixup_alpha > 0 else None)

    def _box(self, lam: float, h: int, w: int) -> tuple[int, int, int, int]:
        """A box of area ≈ (1 - lam)·h·w centred uniformly, clipped to the image: (y0, y1, x0, x1)."""
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(self.rng.integers(h)), int(self.rng.integers(w))
        return max(cy - ch // 2, 0), min(cy + ch // 2 + ch % 2, h), max(cx - cw // 2, 0), min(cx + cw // 2 + cw % 2, w)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # class indices, or soft targets already (distillation)
        one_hot = targets.float() if targets.ndim == 2 else F.one_hot(targets.long(), self.num_classes).float()
        mode = self._mode()
        self.last = {"mode": mode, "lam": 1.0}
        if mode is None or len(images) < 2:
            return images, one_hot
        perm = torch.from_numpy(self.rng.permutation(len(images))).to(images.device)
        if mode == "mixup":
            lam = float(self.rng.beta(self.mixup_alpha, self.mixup_alpha))
            images = images.float() if not images.is_floating_point() else images
            images = images.mul(lam).add_(images[perm], alpha=1.0 - lam)
        else:
            lam = float(self.rng.beta(self.cutmix_alpha, self.cutmix_alpha))
            h, w = images.shape[-2:]
            y0, y1, x0, x1 = box = self._box(lam, h, w)
            images = images.clone()
            images[..., y0:y1, x0:x1] = images[perm, ..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
            self.last["box"] = box
        self.last.update(lam=lam, perm=perm)
        return images, one_hot.mul(lam).add_(one_hot[perm], alpha=1.0 - lam)


def build_mixer(cfg: AugmentConfig, num_classes: int, seed: Optional[int] = None) -> Optional[Mixer]:
    """None when no mixing is configured."""
    if (cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0) or cfg.mix_prob <= 0:
        return None
    return Mixer(num_classes, cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob, cfg.switch_prob, seed)
