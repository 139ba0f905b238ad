"""Augmentation policies by name (``augment.policy``): the registry, the per-image :class:`Policy` wrapper
and the simple policies; RandAugment registers itself from :mod:`pipeline.augment.randaugment`.

A policy works on one uint8 HWC image (what the cache stores) and returns a uint8 HWC image of the same
size; normalisation happens later, on the whole batch.
"""
from __future__ import annotations

import os
import random
from typing import Any, Callable, Optional

import albumentations as A
import cv2
import numpy as np
import torch

from pipeline.core.config import AugmentConfig
from pipeline.core.registry import Registry

FILL = 128  # grey: what geometric ops and Cutout leave behind
POLICIES: Registry[Callable[[AugmentConfig, int], Any]] = Registry("augment policy")


# --------------------------------------------------------------------------- the policy wrapper


class Policy:
    """One image in, one image out (uint8 HWC), with its own random state; :meth:`batch` does a whole batch.

    The state is reseeded once in each DataLoader worker from ``torch.initial_seed()`` (different per worker
    and per epoch, reproducible under ``torch.manual_seed``), so forked workers never repeat each other.
    """

    def __init__(self, transform: Any, name: str, seed: Optional[int] = None) -> None:
        self.transform = transform
        self.name = name
        self._pid = os.getpid()
        if seed is not None:
            self.set_random_seed(seed)

    def set_random_seed(self, seed: int) -> None:
        self.transform.set_random_seed(int(seed) % 2**32)

    def _reseed_in_worker(self) -> None:
        if self._pid != os.getpid():  # first call in a new (worker) process
            self._pid = os.getpid()
            if torch.utils.data.get_worker_info() is not None:
                self.set_random_seed(torch.initial_seed())

    def __call__(self, image: np.ndarray) -> np.ndarray:
        self._reseed_in_worker()
        return self.transform(image=image)["image"]

    def batch(self, images: np.ndarray) -> np.ndarray:
        """Augment an N×H×W×C uint8 batch: in one go where the policy can (RandAugment), else per image."""
        self._reseed_in_worker()
        apply_batch = getattr(self.transform, "apply_batch", None)
        if apply_batch is not None:
            return apply_batch(images)
        if isinstance(self.transform, A.Compose) and not self.transform.transforms:  # policy "none"
            return images
        return np.stack([self.transform(image=image)["image"] for image in images]) if len(images) else images

    def __repr__(self) -> str:
        return f"Policy({self.name}: {self.transform!r})"


class PilTransform:
    """Wraps a PIL-image transform (timm's AutoAugment/RandAugment) for uint8 HWC arrays.

    timm draws from the global ``random`` and ``np.random``; their states are swapped for private ones around
    each call so that a seeded policy is reproducible and the caller's global streams are left untouched.
    """

    def __init__(self, transform: Callable[[Any], Any]) -> None:
        self.transform = transform
        self.set_random_seed(None)

    def set_random_seed(self, seed: Optional[int]) -> None:
        self._py = random.Random(seed)
        self._np = np.random.RandomState(seed if seed is None else seed % 2**32)

    def __call__(self, *, image: np.ndarray) -> dict[str, np.ndarray]:
        from PIL import Image

        saved_py, saved_np = random.getstate(), np.random.get_state()
        random.setstate(self._py.getstate())
        np.random.set_state(self._np.get_state())
        try:
            out = self.transform(Image.fromarray(image))
        finally:
            self._py.setstate(random.getstate())
            self._np.set_state(np.random.get_state())
            random.setstate(saved_py)
            np.random.set_state(saved_np)
        return {"image": np.asarray(out, dtype=np.uint8)}

    def __repr__(self) -> str:
        return f"PilTransform({self.transform!r})"


def build_policy(cfg: AugmentConfig, image_size: int, seed: Optional[int] = None) -> Policy:
    """The named policy as a function of one uint8 HWC image (seeded when ``seed`` is given).

    OpenCV's own thread pool is switched off in this process: on small images its threads cost more than
    they save, and they compete with torch's threads for the cores (albumentations' advice for loaders).
    """
    cv2.setNumThreads(0)
    return Policy(POLICIES.build(cfg.policy, cfg, image_size), cfg.policy, seed)


# --------------------------------------------------------------------------- simple policies


@POLICIES.register("none")
def _none(cfg: AugmentConfig, size: int) -> A.Compose:
    return A.Compose([])


@POLICIES.register("basic")
def _basic(cfg: AugmentConfig, size: int) -> A.Compose:
    """Flip, a small shift/scale/rotate, and pad-and-crop (the CIFAR classic)."""
    pad = max(2, size // 8)
    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.0625, 0.0625), rotate=(-10, 10), p=0.5),
        A.PadIfNeeded(size + 2 * pad, size + 2 * pad, border_mode=0),
        A.RandomCrop(size, size),
    ])


@POLICIES.register("flip_crop")
def _flip_crop(cfg: AugmentConfig, size: int) -> A.Compose:
    """Flip and a translation by up to size/16 pixels with mirrored borders (airbench's CIFAR recipe)."""
    pad = max(1, size // 16)
    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.PadIfNeeded(size + 2 * pad, size + 2 * pad, border_mode=cv2.BORDER_REFLECT_101),
        A.RandomCrop(size, size),
    ])


@POLICIES.register("resized_crop")
def _resized_crop(cfg: AugmentConfig, size: int) -> A.Compose:
    """Random-resized crop to ``size`` (area 35–100 %, aspect 3/4–4/3) and a horizontal flip: the photo
    fine-tuning recipe (fastai's min_scale 0.35; timm's 0.08 suits long training from scratch). It reads the
    whole cached square, so it uses the margin of ``data.crop_pct`` < 1."""
    return A.Compose([A.RandomResizedCrop((size, size), scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)),
                      A.HorizontalFlip(p=0.5)])


def _timm_hparams(size: int) -> dict:
    return {"translate_const": int(size * 0.45), "img_mean": (FILL, FILL, FILL)}


@POLICIES.register("autoaugment")
def _autoaugment(cfg: AugmentConfig, size: int) -> PilTransform:
    """timm's AutoAugment (``augment.autoaugment_policy``: original, originalr, v0, v0r, 3a)."""
    from timm.data.auto_augment import auto_augment_transform

    return PilTransform(auto_augment_transform(cfg.autoaugment_policy, _timm_hparams(size)))


@POLICIES.register("trivialaugment")
def _trivialaugment(cfg: AugmentConfig, size: int) -> PilTransform:
    """TrivialAugment via timm: one op per image, magnitude uniform in [0, max], always applied."""
    from timm.data.auto_augment import rand_augment_transform

    return PilTransform(rand_augment_transform("rand-n1-m10-mstd101-inc1-p1.0", _timm_hparams(size)))
