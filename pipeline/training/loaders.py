"""Training loaders over the uint8 cache: the per-image policy in a chunked DataLoader, or the batched policy
on rows held on the device."""
from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline import augment
from pipeline.core.config import Config
from pipeline.data.dataset import ImageDataset
from pipeline.data.device import DeviceLoader, fits_on_device

log = logging.getLogger(__name__)


class ChunkedLoader:
    """Batches of ``batch_size`` cut from a loader that reads and augments ``chunk`` batches at a time.

    The loader's sampler is a uniform random permutation, so consecutive slices of a big shuffled batch are
    ordinary shuffled batches; augmenting 4× more images per call divides the per-call overhead of the
    augmentation library (which dominates on small images, see ``python -m pipeline.bench``) by 4.
    """

    def __init__(self, loader: DataLoader, batch_size: int, drop_last: bool) -> None:
        self.loader, self.batch_size, self.drop_last = loader, batch_size, drop_last
        self.dataset, self.generator = loader.dataset, loader.generator

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do: the per-image policy does not depend on the epoch (the device loader's flip does)."""

    def __len__(self) -> int:
        n = len(self.loader.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        for images, targets in self.loader:
            for start in range(0, len(targets), self.batch_size):
                if self.drop_last and start + self.batch_size > len(targets):
                    break  # the tail of the epoch, as drop_last would drop it
                yield images[start:start + self.batch_size], targets[start:start + self.batch_size]


def make_train_loader(images: np.ndarray, rows: np.ndarray, labels: np.ndarray, cfg: Config,
                      transform: Optional[Callable] = None, drop_last: bool = True, chunk: int = 4,
                      pin_memory: bool = False):
    """Shuffled uint8 batches of ``rows``, read and augmented ``chunk`` batches at a time (in workers if
    configured), in page-locked memory with ``pin_memory`` (for an asynchronous copy to a GPU).

    On 2 cores ``num_workers: 0`` measured fastest: a worker process, or a prefetch thread, competes with
    torch's own threads for the cores (see ``python -m pipeline.bench``)."""
    dataset = ImageDataset(images, rows, labels, transform)
    workers, batch_size = cfg.data.num_workers, cfg.train.batch_size
    drop_last = drop_last and len(rows) > batch_size
    loader = DataLoader(dataset, batch_size=batch_size * chunk, shuffle=True, drop_last=False,
                        num_workers=workers, persistent_workers=workers > 0,
                        prefetch_factor=4 if workers > 0 else None, pin_memory=pin_memory,
                        generator=torch.Generator().manual_seed(cfg.seed))
    return ChunkedLoader(loader, batch_size, drop_last)


def make_fold_loader(cfg: Config, images: np.ndarray, rows: np.ndarray, targets: np.ndarray, size: int,
                     seed: int, device: torch.device) -> tuple[Callable, object]:
    """(augmentation, loader) training on ``rows``: the per-image policy in a DataLoader, or with
    ``data.loader: device`` the batched policy on the rows held on ``device`` (:mod:`pipeline.data.device`)."""
    if cfg.data.loader == "device":
        if images.shape[1] != size:
            raise ValueError(f"data.loader: device trains on the cached {images.shape[1]} px images as they are; "
                             f"it needs data.crop_pct: 1 (the cache holds {images.shape[1]} px, image_size {size})")
        nbytes = len(rows) * int(np.prod(images.shape[1:])) * images.itemsize
        if fits_on_device(nbytes, device, cfg.data.device_memory_fraction):
            policy = augment.BatchAugment(cfg.augment, size, seed=seed)
            return policy, DeviceLoader(images, rows, targets, cfg.train.batch_size, device, policy, seed=cfg.seed)
        log.warning("data.loader: device: the fold's %d images (%.2f GB) exceed data.device_memory_fraction %.2f "
                    "of %s's free memory; streaming them from pinned host memory with the per-image policy "
                    "(data.num_workers > 0 prefetches)", len(rows), nbytes / 1e9, cfg.data.device_memory_fraction,
                    device)
    policy = augment.build_policy(cfg.augment, size, seed=seed)
    return policy, make_train_loader(images, rows, targets, cfg, policy, pin_memory=device.type == "cuda")
