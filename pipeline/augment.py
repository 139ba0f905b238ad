"""Augmentation policies, chosen in YAML by name and built through a registry.

A policy works on one uint8 HWC image (what the cache stores) and returns a uint8 HWC image of the same
size; normalisation happens later, on the whole batch. Batch-level mixing (mixup/cutmix) and progressive
resizing also live here, as does ``python -m pipeline.augment --config CFG --preview [--out PNG]``, which
writes a grid of augmented training images from the cache.

Interface used by the train stage (keep it stable):

* ``build_policy(cfg: AugmentConfig, image_size: int, seed=None) -> Policy`` (uint8 HWC → uint8 HWC);
  ``policy.batch(images NHWC uint8)`` augments a whole batch at once: a loader should call it on the
  batch it has gathered, since RandAugment then costs a fraction of the per-image calls (see the bench)
* ``build_mixer(cfg: AugmentConfig, num_classes: int, seed=None) -> Mixer | None`` where
  ``mixer(images: Tensor[N,C,H,W] float, targets: LongTensor[N]) -> (images, soft_targets[N, num_classes])``
* ``size_at_epoch(cfg: AugmentConfig, epoch: int, default: int) -> int`` and
  ``resize_batch(images NCHW, size) -> images`` (progressive resizing from the one cached size)
* ``preview_grid(images NHWC uint8, cfg, image_size, n=32, seed=0) -> HWC uint8``

Policies (``augment.policy``): ``none``; ``basic`` (flip, shift/scale/rotate, pad-and-crop); ``resized_crop``
(random-resized crop + flip, for photos cached with a margin);
``randaugment`` (below); ``autoaugment`` (timm's AutoAugment, ``augment.autoaugment_policy`` picks
``original``/``v0``/``3a``…) and ``trivialaugment`` (timm's RandAugment with one op per image at a magnitude
drawn uniformly up to the maximum, applied always: TrivialAugment's recipe). Albumentations 2.0 has neither
of the last two; timm's operate on PIL images and are wrapped to take and return uint8 HWC arrays.

RandAugment (seed notes; :class:`RandAugment`, every op an albumentations transform, chosen like
``A.SomeOf(ops, n=n_select)``): ``magnitude = level / n_level`` ∈ [0, 1] maps linearly from the "level 0"
to the "level n_level" column. With ``random_magnitude`` each op call draws its level uniformly from
{0, …, level} instead. Signed ops (±) pick the sign at random per call.

============  ==========================================  =========  ==============  ====
op            albumentations transform and parameter      level 0    level n_level   sign
============  ==========================================  =========  ==============  ====
ShearX        Affine(shear x) degrees                     0°         16.7° (0.3)     ±
ShearY        Affine(shear y) degrees                     0°         16.7° (0.3)     ±
TranslateX    Affine(translate_percent x) of the side     0          0.45            ±
TranslateY    Affine(translate_percent y) of the side     0          0.45            ±
Rotate        Affine(rotate) degrees                      0°         30°             ±
Contrast      ColorJitter(contrast) factor                1          1 ± 0.9         ±
Color         ColorJitter(saturation) factor              1          1 ± 0.9         ±
Brightness    ColorJitter(brightness) factor              1          1 ± 0.9         ±
Sharpness     Sharpen(alpha), blend with sharpened        0          1.0
Solarize      Solarize(threshold), fraction of 255        1 (none)   0 (all pixels)
Posterize     Posterize(num_bits) bits kept               8          4
Cutout        CoarseDropout, 1 square hole, side/size     0          0.5
Invert        InvertImg                                   (no magnitude: as in the paper)
Equalize      Equalize                                    (no magnitude)
AutoContrast  AutoContrast                                (no magnitude)
============  ==========================================  =========  ==============  ====

Geometric ops and Cutout fill with grey (128). At level 0 every op with a magnitude is the identity.
"""
from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F

from . import rng as rngs
from .config import AugmentConfig, Config
from .registry import Registry

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- RandAugment


@dataclass(frozen=True)
class Op:
    """A RandAugment op: ``make(lo, hi)`` builds its transform for parameter values in [lo, hi].

    ``start``/``end`` are the parameter at level 0 and at level n_level; ``signed`` ops also use the
    mirrored range (-hi..-lo); ``integer`` parameters are rounded. ``batched`` is False where
    albumentations' batch call would differ from per-image calls (AutoContrast takes its histogram over the
    whole batch; Cutout would put the hole at one place for all). ``mirror``: flipping the image along
    this axis before and after the op gives the op with the opposite sign, exactly; a batch then needs one
    call for both signs.
    """

    make: Callable[[float, float], A.BasicTransform]
    start: float = 0.0
    end: float = 0.0
    signed: bool = False
    integer: bool = False
    batched: bool = True
    mirror: Optional[int] = None  # image axis whose flip turns the op into its mirrored (-sign) self

    @property
    def has_magnitude(self) -> bool:
        return self.start != self.end


def _affine(**kwargs: Any) -> A.Affine:
    return A.Affine(border_mode=0, fill=FILL, p=1.0, **kwargs)


def _jitter(kind: str) -> Callable[[float, float], A.ColorJitter]:
    """ColorJitter changing only ``kind`` by a factor 1 + d, d ∈ [lo, hi]."""
    def make(lo: float, hi: float) -> A.ColorJitter:
        factors = {"brightness": (1.0, 1.0), "contrast": (1.0, 1.0), "saturation": (1.0, 1.0)}
        factors[kind] = (1.0 + lo, 1.0 + hi)
        return A.ColorJitter(hue=(0.0, 0.0), p=1.0, **factors)
    return make


def _cutout(size: int) -> Callable[[float, float], A.CoarseDropout]:
    def make(lo: float, hi: float) -> A.CoarseDropout:
        side = (max(1, round(lo * size)), max(1, round(hi * size)))
        return A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=side, hole_width_range=side,
                               fill=FILL, p=1.0)
    return make


def randaugment_ops(size: int) -> dict[str, Op]:
    """The RandAugment op table (see the module docstring) for ``size``×``size`` images."""
    shear = math.degrees(math.atan(0.3))
    return {
        "ShearX": Op(lambda lo, hi: _affine(shear={"x": (lo, hi), "y": (0, 0)}), 0.0, shear, signed=True,
                     mirror=1),
        "ShearY": Op(lambda lo, hi: _affine(shear={"x": (0, 0), "y": (lo, hi)}), 0.0, shear, signed=True,
                     mirror=1),
        "TranslateX": Op(lambda lo, hi: _affine(translate_percent={"x": (lo, hi), "y": (0, 0)}), 0.0, 0.45,
                         signed=True, mirror=1),
        "TranslateY": Op(lambda lo, hi: _affine(translate_percent={"x": (0, 0), "y": (lo, hi)}), 0.0, 0.45,
                         signed=True, mirror=0),
        "Rotate": Op(lambda lo, hi: _affine(rotate=(lo, hi)), 0.0, 30.0, signed=True, mirror=1),
        "Contrast": Op(_jitter("contrast"), 0.0, 0.9, signed=True),
        "Color": Op(_jitter("saturation"), 0.0, 0.9, signed=True),
        "Brightness": Op(_jitter("brightness"), 0.0, 0.9, signed=True),
        "Sharpness": Op(lambda lo, hi: A.Sharpen(alpha=(lo, hi), lightness=(1.0, 1.0), p=1.0), 0.0, 1.0),
        "Solarize": Op(lambda lo, hi: A.Solarize(threshold_range=(lo, hi), p=1.0), 1.0, 0.0),
        "Posterize": Op(lambda lo, hi: A.Posterize(num_bits=(int(lo), int(hi)), p=1.0), 8, 4, integer=True),
        "Cutout": Op(_cutout(size), 0.0, 0.5, batched=False),
        "Invert": Op(lambda lo, hi: A.InvertImg(p=1.0)),
        "Equalize": Op(lambda lo, hi: A.Equalize(p=1.0)),
        "AutoContrast": Op(lambda lo, hi: A.AutoContrast(p=1.0), batched=False),
    }


RANDAUGMENT_OPS: tuple[str, ...] = tuple(randaugment_ops(32))


def build_op(op: Op, magnitude: float, sign: int = 1) -> Optional[A.BasicTransform]:
    """``op`` at ``magnitude`` ∈ [0, 1] (``sign`` -1 mirrors signed ops); None where it is the identity."""
    if not op.has_magnitude:
        return op.make(0.0, 0.0)
    value = op.start + magnitude * (op.end - op.start)
    if op.integer:
        value = round(value)
    if value == op.start:
        return None
    value = -value if op.signed and sign < 0 else value
    return op.make(value, value)


class RandAugment:
    """RandAugment on one image or a whole batch: ``n_select`` distinct ops per image, applied in table order
    (as ``A.SomeOf`` does), each an albumentations transform at level ``level`` of ``n_level``.

    With ``random_magnitude`` every op call draws its level uniformly from {0, …, level}. A batch is
    augmented op by op: the images that drew the same (op, level, sign) go through that transform together
    (albumentations' ``images=`` target): each variant's parameters are fixed, so this is what per-image
    calls would give, at a fraction of the per-call overhead that dominates on 32 px images. Ops whose
    batch call would differ from per-image calls (``Op.batched`` False) run image by image.
    """

    def __init__(self, ops: dict[str, Op], n_select: int, level: int, n_level: int,
                 random_magnitude: bool = False, seed: Optional[int] = None) -> None:
        self.names, self.ops = list(ops), list(ops.values())
        self.n_select, self.level, self.n_level = n_select, level, n_level
        self.random_magnitude = random_magnitude
        self._signed = np.array([op.signed for op in self.ops], dtype=bool)
        self._has_magnitude = np.array([op.has_magnitude for op in self.ops], dtype=bool)
        self._mirrored = np.array([op.signed and op.mirror is not None for op in self.ops], dtype=bool)
        self.set_random_seed(seed)

    def set_random_seed(self, seed: Optional[int]) -> None:
        self.seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
        self.rng = np.random.default_rng(self.seed)
        self._variants: dict[tuple[int, int, int], Optional[A.BasicTransform]] = {}

    def rng_state(self) -> dict:
        """The op-choice generator and every variant's generators (variants are created lazily)."""
        return {"rng": rngs.generator_state(self.rng),
                "variants": {f"{op},{level},{sign}": rngs.collect(t) for (op, level, sign), t in self._variants.items()
                             if t is not None}}

    def load_rng_state(self, state: dict) -> None:
        rngs.set_generator_state(self.rng, state["rng"])
        for key, states in state["variants"].items():
            rngs.restore(self.variant(*map(int, key.split(","))), states)

    def variant(self, op: int, level: int, sign: int) -> Optional[A.BasicTransform]:
        """The (cached, seeded) transform for one op at one level and sign; None for the identity."""
        key = (op, level, sign)
        if key not in self._variants:
            transform = build_op(self.ops[op], level / self.n_level, sign)
            seed = int(np.random.SeedSequence([self.seed, op, level, sign + 1]).generate_state(1)[0])
            if transform is not None:
                transform.set_random_seed(seed)
            self._variants[key] = transform
        return self._variants[key]

    def draw(self, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per image and step: op index (sorted per image), level and sign."""
        n = min(self.n_select, len(self.ops))
        ops = np.sort(np.argsort(self.rng.random((count, len(self.ops))), axis=1)[:, :n], axis=1)
        if self.random_magnitude:
            levels = self.rng.integers(0, self.level + 1, size=(count, n))
        else:
            levels = np.full((count, n), self.level)
        signs = self.rng.integers(0, 2, size=(count, n)) * 2 - 1
        signs = np.where(self._signed[ops], signs, 1)  # unsigned and magnitude-free ops: one variant
        levels = np.where(self._has_magnitude[ops], levels, 0)
        return ops, levels, signs

    def apply_batch(self, images: np.ndarray) -> np.ndarray:
        """Augment an N×H×W×C uint8 batch (a new array; the input is left alone)."""
        out = np.array(images, copy=True)
        ops, levels, signs = self.draw(len(out))
        merged = np.where(self._mirrored[ops], 1, signs)  # mirrored ops: one call serves both signs
        keys = (ops * (self.n_level + 1) + levels) * 2 + (merged > 0)  # one integer per call
        for step in range(ops.shape[1]):
            order = np.argsort(keys[:, step], kind="stable")
            for rows in np.split(order, np.flatnonzero(np.diff(keys[order, step])) + 1):
                i = rows[0]
                self._apply(out, rows, int(ops[i, step]), int(levels[i, step]), int(merged[i, step]),
                            signs[rows, step] < 0)
        return out

    def _apply(self, out: np.ndarray, rows: np.ndarray, op: int, level: int, sign: int, flip: np.ndarray) -> None:
        """Apply one variant to ``out[rows]`` in place (``flip``: rows to mirror around it for the -sign)."""
        transform = self.variant(op, level, sign)
        if transform is None:
            return
        axis = self.ops[op].mirror
        flipped = rows[flip] if axis is not None else rows[:0]
        if len(flipped):
            out[flipped] = np.flip(out[flipped], axis + 1)
        if len(rows) > 1 and self.ops[op].batched:
            out[rows] = transform(images=out[rows])["images"]
        else:
            for r in rows:
                out[r] = transform(image=out[r])["image"]
        if len(flipped):
            out[flipped] = np.flip(out[flipped], axis + 1)

    def __call__(self, *, image: np.ndarray) -> dict[str, np.ndarray]:
        for op, level, sign in zip(*(d[0] for d in self.draw(1))):
            transform = self.variant(int(op), int(level), int(sign))
            image = image if transform is None else transform(image=image)["image"]
        return {"image": image}

    def __repr__(self) -> str:
        return (f"RandAugment(n_select={self.n_select}, level={self.level}/{self.n_level}, "
                f"random_magnitude={self.random_magnitude}, ops={self.names})")


@POLICIES.register("randaugment")
def _randaugment(cfg: AugmentConfig, size: int) -> RandAugment:
    """RandAugment: ``n_select`` of ``ops`` per image at magnitude ``level / n_level``."""
    table = randaugment_ops(size)
    names = list(cfg.ops) if cfg.ops else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise KeyError(f"augment.ops: unknown RandAugment op(s) {unknown}; valid names: {', '.join(table)}")
    if not 0 <= cfg.n_select <= len(names):
        raise ValueError(f"augment.n_select={cfg.n_select} must be between 0 and the {len(names)} ops")
    return RandAugment({n: table[n] for n in names}, cfg.n_select, cfg.level, cfg.n_level, cfg.random_magnitude)


# --------------------------------------------------------------------------- mixup / cutmix


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


# --------------------------------------------------------------------------- progressive resizing


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


# --------------------------------------------------------------------------- preview


def preview_grid(images: np.ndarray, cfg: AugmentConfig, image_size: int, n: int = 32, seed: int = 0,
                 mix: bool = True, min_cell: int = 96) -> np.ndarray:
    """A grid (HWC uint8) of ``n`` random training images after the policy (and the mixer when ``mix``).

    Cells are upscaled (nearest) to at least ``min_cell`` pixels so small images stay visible.
    """
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(images), size=min(n, len(images)), replace=False))
    policy = build_policy(cfg, image_size, seed=seed)
    batch = np.stack([policy(np.ascontiguousarray(images[i])) for i in picks])
    mixer = build_mixer(cfg, 1, seed=seed) if mix else None
    if mixer is not None:
        tensor = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
        mixed, _ = mixer(tensor, torch.zeros(len(batch), dtype=torch.long))
        batch = mixed.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return _tile(batch, max(1, math.ceil(min_cell / batch.shape[1])))


def _tile(batch: np.ndarray, scale: int, pad: int = 2) -> np.ndarray:
    """Lay an NHWC uint8 batch out on a near-square grid, each cell upscaled ``scale``×."""
    batch = batch.repeat(scale, axis=1).repeat(scale, axis=2)
    if batch.shape[-1] == 1:
        batch = batch.repeat(3, axis=-1)
    count, h, w, c = batch.shape
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for k, image in enumerate(batch):
        r, q = divmod(k, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = image
    return grid


def run(cfg: Config, out: Optional[str | Path] = None, n: int = 32) -> Path:
    """Write the preview grid of augmented training images (from the uint8 cache) to a PNG."""
    from PIL import Image

    from .data.cache import load_split

    images, _ = load_split(cfg.run_dir, "train")
    grid = preview_grid(images, cfg.augment, cfg.data.image_size, n=n, seed=cfg.seed)
    out = Path(out) if out else cfg.run_dir / "augment_preview.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out)
    log.info("augmentation preview (%s, %d images) written to %s", cfg.augment.policy, n, out)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .cli import build_parser, stage_main

    parser = build_parser("Preview the augmentation policy on training images from the cache.")
    parser.add_argument("--preview", action="store_true", help="write a PNG grid of augmented samples")
    parser.add_argument("--out", default=None, help="PNG path (default runs/<experiment>/augment_preview.png)")
    parser.add_argument("-n", type=int, default=32, help="number of images in the grid")
    args, _ = parser.parse_known_args(argv)

    def preview(cfg: Config) -> Any:
        if not args.preview:
            log.info("policy %s: %r (pass --preview to write a grid)", cfg.augment.policy,
                     build_policy(cfg.augment, cfg.data.image_size).transform)
            return None
        return run(cfg, args.out, args.n)

    preview.__module__ = __name__
    return stage_main(preview, "augment preview", argv, parser)


if __name__ == "__main__":
    raise SystemExit(main())
