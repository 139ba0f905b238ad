"""Torch datasets over the uint8 cache. Images stay uint8 until the batch reaches the device."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data.cache import gather


class ImageDataset(Dataset):
    """Rows ``indices`` of a cached N×H×W×3 uint8 array, optionally augmented per image.

    Items are (uint8 C×H×W tensor, label); ``__getitems__`` reads a whole batch from the memory map in
    one sorted slice, which is what the DataLoader calls with automatic batching.
    """

    def __init__(self, images: np.ndarray, indices: Sequence[int], labels: Optional[Sequence[int]] = None,
                 transform: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> None:
        self.images = images
        self.indices = np.asarray(indices, dtype=np.int64)
        # class indices (N,), or soft targets (N, C) such as a teacher's (see pipeline.training.distill)
        self.labels = None if labels is None else np.asarray(labels)
        if self.labels is not None:
            self.labels = self.labels.astype(np.float32 if self.labels.ndim == 2 else np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([i])[0]

    def __getitems__(self, items: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        batch = gather(self.images, self.indices[np.asarray(items)])
        if self.transform is not None:
            batch_fn = getattr(self.transform, "batch", None)  # augment.Policy.batch: whole-batch policies
            batch = batch_fn(batch) if batch_fn is not None else np.stack([self.transform(im) for im in batch])
        tensors = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
        if self.labels is None:
            labels = [-1] * len(items)
        elif self.labels.ndim == 2:
            labels = list(torch.from_numpy(self.labels[np.asarray(items)]))
        else:
            labels = self.labels[np.asarray(items)].tolist()
        return list(zip(tensors, labels))


def to_float(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], device: torch.device,
             channels_last: bool = False) -> torch.Tensor:
    """uint8 N×C×H×W → normalised float32 on ``device`` (the one place normalisation happens)."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0
    return (images.float() - m) / s


def center_crop(images: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    """The centre ``size``×``size`` of an N×C×H×W batch (unchanged when ``size`` is None or not smaller):
    how evaluation reads a cache stored with a margin (``data.crop_pct``)."""
    h, w = images.shape[-2:]
    if size is None or (h <= size and w <= size):
        return images
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top:top + size, left:left + size]


def iter_batches(images: np.ndarray, rows: np.ndarray, batch_size: int, size: Optional[int] = None):
    """uint8 N×C×H×W tensors of ``rows`` in order, each gathered from the memory map in one sorted read;
    the centre ``size`` square when the cache holds a margin (``data.crop_pct``)."""
    for start in range(0, len(rows), batch_size):
        yield center_crop(torch.from_numpy(gather(images, rows[start:start + batch_size])).permute(0, 3, 1, 2), size)
