"""The device-resident training loader (``data.loader: device``): airbench's input pipeline.

The fold's training rows of the uint8 cache go to the training device once (N×C×H×W uint8: 50,000 CIFAR
images are 150 MB); each epoch a seeded permutation cuts the batches there, and each batch is augmented in
one call by :class:`pipeline.augment.BatchAugment`. No workers, no per-image Python, no host-to-device copy
per batch. It yields what :func:`pipeline.training.loaders.make_train_loader` yields (uint8 images, targets),
already on the device, so the training step is unchanged. Resuming needs its generator's state and the epoch,
which the caller sets with :meth:`set_epoch` (the alternating flip depends on it).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from .dataset import gather


def fits_on_device(nbytes: int, device: torch.device, fraction: float, free: Optional[int] = None) -> bool:
    """True when ``nbytes`` of images take at most ``fraction`` of the device's free memory (``free``, else
    measured: ``torch.cuda.mem_get_info``); a CPU "device" is the host's own memory, where the cache already is."""
    if free is None:
        if device.type != "cuda":
            return True
        free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= fraction * free


class DeviceLoader:
    """Shuffled, augmented batches of ``rows`` of ``images`` (a cached N×H×W×C uint8 array) on ``device``."""

    def __init__(self, images: np.ndarray, rows: np.ndarray, targets: np.ndarray, batch_size: int,
                 device: torch.device, augment: Optional[Callable] = None, seed: int = 0,
                 drop_last: bool = True) -> None:
        self.images = torch.from_numpy(gather(images, rows)).permute(0, 3, 1, 2).contiguous().to(device)
        self.rows = torch.as_tensor(np.asarray(rows), dtype=torch.int64)  # cache row ids: the alternating flip
        targets = np.asarray(targets)  # class indices, or soft targets (N, C) as ImageDataset keeps them
        self.targets = torch.from_numpy(targets.astype(np.float32 if targets.ndim == 2 else np.int64)).to(device)
        self.batch_size, self.device, self.augment = batch_size, device, augment
        self.drop_last = drop_last and len(rows) > batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.rows)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.rows), generator=self.generator)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            pick = order[start:start + self.batch_size]
            on_device = pick.to(self.device)
            images = self.images[on_device]
            if self.augment is not None:
                images = self.augment(images, self.rows[pick], self.epoch)
            yield images, self.targets[on_device]
