"""Progressive resizing (``augment.sizes``, ``augment.size_epochs``) from the one cached size."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.core.config import AugmentConfig


def size_at_epoch(cfg: AugmentConfig, epoch: int, default: int) -> int:
    """The image size to train at in ``epoch`` under progressive resizing (``default`` without it)."""
    if not cfg.sizes:
        return default
    starts = cfg.size_epochs or [0] * len(cfg.sizes)
    size = cfg.sizes[0]
    for start, s in zip(starts, cfg.sizes):
        if epoch >= start:
            size = s
    return size


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize an NCHW batch (uint8 or float) to ``size``×``size``, antialiased; the dtype is kept.

    This is how progressive resizing serves every size from the one uint8 cache without re-decoding.
    """
    if tuple(images.shape[-2:]) == (size, size):
        return images
    if images.is_floating_point():
        return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(images.dtype)
