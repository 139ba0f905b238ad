"""Batched augmentation of whole N×C×H×W tensors on any device: one call per batch, no per-image loop.

The device-resident loader (``data.loader: device``) keeps a fold's uint8 cache on the training device and
augments each batch here, as airbench does on a GPU; on the CPU this path can also beat per-image
albumentations (``python -m pipeline.bench``). Images are uint8, or float on the 0–255 scale; the result has
the input's dtype and device. Every random draw comes from one seeded CPU ``torch.Generator`` (so a batch
is augmented the same on any device, and the generator's state is what a checkpoint saves), then moves to
the device as a few small parameter tensors.

:class:`BatchAugment` mirrors the per-image policies (``augment.policy``) that have a batched form:
``none``; ``basic`` (flip, Affine p=0.5 with scale 0.9–1.1, translate ±6.25 %, rotate ±10°, black fill,
then pad-and-crop); ``flip_crop`` (flip, reflect-pad-and-crop: airbench's); ``randaugment`` over every op
of :mod:`pipeline.augment.randaugment` with the same table, ``level / n_level`` magnitudes, signs,
``n_select`` distinct ops per image in table order, and ``random_magnitude``. The flip is ``random``
(p = 0.5 per image) or, with ``augment.flip: alternate``, airbench's alternating flip: a fixed random half
of the rows (a hash of the row index and the seed) is flipped in even epochs, the other half in odd ones,
so every image is seen flipped exactly once per two epochs.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from pipeline.core.config import AugmentConfig
from .policies import FILL
from .randaugment import randaugment_ops

BATCHED_POLICIES = ("none", "basic", "flip_crop", "randaugment")
GRAY = (0.299, 0.587, 0.114)  # cv2's RGB→gray weights, as albumentations' ColorJitter uses


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (hi - lo) + lo


# --------------------------------------------------------------------------- geometry


def hflip(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the images where ``mask`` (N bools) is set, left-right; exact."""
    return torch.where(mask.to(images.device).view(-1, 1, 1, 1), images.flip(-1), images)


def alternate_flip_mask(rows: torch.Tensor, epoch: int, seed: int) -> torch.Tensor:
    """airbench's alternating flip: row r is flipped in epoch e iff hash(r, seed) + e is odd.

    The hash (a 32-bit integer mix, no generator state) fixes which half of the rows starts flipped, so each
    row is flipped in exactly one of any two consecutive epochs, whatever order the batches come in.
    """
    x = (rows.to(torch.int64).cpu() + (seed & 0xFFFFFFFF) * 0x632BE5AB) & 0xFFFFFFFF
    for _ in range(3):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return (((x >> 16) ^ x) + epoch) % 2 == 1


def pad_crop(images: torch.Tensor, pad: int, gen: torch.Generator, mode: str = "constant",
             fill: float = 0.0) -> torch.Tensor:
    """Pad by ``pad`` on every side (``mode`` as ``F.pad``: constant or reflect) and cut a random window of
    the original size per image: a translation by up to ``pad`` pixels, the crop always inside the padding."""
    if pad <= 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode=mode, **({"value": fill} if mode == "constant" else {}))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(images.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(images.device)
    ys = (dy[:, None] + torch.arange(h, device=images.device))[:, :, None]
    xs = (dx[:, None] + torch.arange(w, device=images.device))[:, None, :]
    idx = torch.arange(n, device=images.device)[:, None, None]
    return padded[idx, :, ys, xs].permute(0, 3, 1, 2)


def warp(images: torch.Tensor, matrices: torch.Tensor, fill: float) -> torch.Tensor:
    """Apply per-image 2×3 affine maps (output = M · input, in coordinates centred on the image with
    half-side 1, so a translation of 2·t moves by the fraction t of the side), bilinear, ``fill`` outside."""
    m = matrices.to(images.device, torch.float32)
    linear_inv = torch.linalg.inv(m[:, :, :2])
    theta = torch.cat([linear_inv, -(linear_inv @ m[:, :, 2:])], dim=2)  # input = M⁻¹ · output
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def affine_matrices(n: int, rotate: Optional[torch.Tensor] = None, shear_x: Optional[torch.Tensor] = None,
                    shear_y: Optional[torch.Tensor] = None, tx: Optional[torch.Tensor] = None,
                    ty: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """N×2×3 maps: scale, then shear and rotation (degrees), then translation (fractions of the side)."""
    zero = torch.zeros(n)
    m = torch.eye(3).repeat(n, 1, 1)
    if scale is not None:
        m[:, 0, 0], m[:, 1, 1] = scale, scale
    if shear_x is not None or shear_y is not None:
        sh = torch.eye(3).repeat(n, 1, 1)
        sh[:, 0, 1] = torch.tan(torch.deg2rad(zero if shear_x is None else shear_x))
        sh[:, 1, 0] = torch.tan(torch.deg2rad(zero if shear_y is None else shear_y))
        m = sh @ m
    if rotate is not None:
        a = torch.deg2rad(rotate)
        rot = torch.eye(3).repeat(n, 1, 1)
        rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
        m = rot @ m
    m[:, 0, 2] = 2 * (zero if tx is None else tx)
    m[:, 1, 2] = 2 * (zero if ty is None else ty)
    return m[:, :2]


def cutout(images: torch.Tensor, sides: torch.Tensor, gen: torch.Generator, fill: float = FILL) -> torch.Tensor:
    """One square hole of side ``sides[i]`` pixels per image, placed uniformly inside it, filled with ``fill``."""
    n, _, h, w = images.shape
    sides = sides.to(torch.int64).clamp(1, min(h, w))
    top = (torch.rand(n, generator=gen) * (h - sides + 1)).floor().to(torch.int64)
    left = (torch.rand(n, generator=gen) * (w - sides + 1)).floor().to(torch.int64)
    y = torch.arange(h)[None, :]
    x = torch.arange(w)[None, :]
    rows = (y >= top[:, None]) & (y < (top + sides)[:, None])
    cols = (x >= left[:, None]) & (x < (left + sides)[:, None])
    hole = (rows[:, :, None] & cols[:, None, :])[:, None].to(images.device)
    return images.masked_fill(hole, fill)


# --------------------------------------------------------------------------- colour (float, 0–255)


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``x·f + other·(1 - f)`` per image (torchvision's and albumentations' ColorJitter), clipped."""
    f = factor.to(x.device, x.dtype).view(-1, 1, 1, 1)
    return (x * f + other * (1 - f)).clamp(0, 255)


def _sharpen(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """albumentations' Sharpen(alpha, lightness=1): x + alpha·Laplacian(x), reflect-101 border."""
    c = x.shape[1]
    kernel = -torch.ones(3, 3, device=x.device, dtype=x.dtype)
    kernel[1, 1] = 8
    lap = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), kernel.expand(c, 1, 3, 3), groups=c)
    return (x + alpha.to(x.device, x.dtype).view(-1, 1, 1, 1) * lap).clamp(0, 255)


def _posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the ``bits`` high bits of every value (per image), as albumentations' Posterize."""
    step = (2.0 ** (8 - bits)).to(x.device, x.dtype).view(-1, 1, 1, 1)
    return torch.div(x, step, rounding_mode="floor") * step


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Per image and channel histogram equalisation (cv2.equalizeHist's formula; also albumentations'
    AutoContrast with cutoff 0, method cdf, which reduces to the same map). A constant channel is kept."""
    n, c, h, w = x.shape
    flat = x.round().clamp(0, 255).to(torch.int64).reshape(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device).scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    cdf = hist.cumsum(1)
    first = hist.gather(1, (hist > 0).to(torch.int64).argmax(1, keepdim=True))  # count of the darkest value
    denom = (h * w - first).clamp(min=1)
    lut = ((cdf - first) * 255 / denom).round().clamp(0, 255)
    out = lut.gather(1, flat).to(x.dtype)
    constant = (first == h * w).expand(-1, h * w)
    return torch.where(constant, flat.to(x.dtype), out).reshape(n, c, h, w)


# --------------------------------------------------------------------------- RandAugment ops
# each: (images float N×C×H×W 0–255, signed parameter per image (N,), generator) -> images


def _geometric(key: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]:
    def op(x: torch.Tensor, v: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if key in ("tx", "ty"):  # albumentations moves by whole pixels: int(fraction · side)
            side = x.shape[-1] if key == "tx" else x.shape[-2]
            v = torch.trunc(v * side) / side
        return warp(x, affine_matrices(len(x), **{key: v}), FILL)
    return op


BATCHED_OPS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]] = {
    "ShearX": _geometric("shear_x"),
    "ShearY": _geometric("shear_y"),
    "TranslateX": _geometric("tx"),
    "TranslateY": _geometric("ty"),
    "Rotate": _geometric("rotate"),
    "Contrast": lambda x, v, g: _blend(x, _gray(x).mean((2, 3), keepdim=True), 1 + v),
    "Color": lambda x, v, g: _blend(x, _gray(x), 1 + v),
    "Brightness": lambda x, v, g: (x * (1 + v).to(x.device, x.dtype).view(-1, 1, 1, 1)).clamp(0, 255),
    "Sharpness": lambda x, v, g: _sharpen(x, v),
    "Solarize": lambda x, v, g: torch.where(x >= (v * 255).to(x.device, x.dtype).view(-1, 1, 1, 1), 255 - x, x),
    "Posterize": lambda x, v, g: _posterize(x, v),
    "Cutout": lambda x, v, g: cutout(x, (v * x.shape[-1]).round().clamp(min=1), g),
    "Invert": lambda x, v, g: 255 - x,
    "Equalize": lambda x, v, g: equalize(x),
    "AutoContrast": lambda x, v, g: equalize(x),
}


class BatchedRandAugment:
    """RandAugment on a whole batch, drawn as :class:`pipeline.augment.randaugment.RandAugment` draws: per
    image ``n_select`` distinct ops applied in table order, level ``level`` (or uniform in {0…level} with
    ``random_magnitude``), a random sign for signed ops, parameter ``start + level/n_level·(end - start)``."""

    def __init__(self, names: list[str], n_select: int, level: int, n_level: int, random_magnitude: bool,
                 size: int) -> None:
        unsupported = [n for n in names if n not in BATCHED_OPS]
        if unsupported:
            raise ValueError(f"augment.ops: {unsupported} have no batched form; the batched RandAugment "
                             f"supports {', '.join(BATCHED_OPS)}")
        table = randaugment_ops(size)
        self.names, self.ops = names, [table[n] for n in names]
        self.n_select, self.level, self.n_level = min(n_select, len(names)), level, n_level
        self.random_magnitude = random_magnitude

    def draw(self, count: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image and step: op index (ascending per image), level, sign (±1)."""
        n = self.n_select
        ops = torch.rand(count, len(self.ops), generator=gen).argsort(1)[:, :n].sort(1).values
        if self.random_magnitude:
            levels = torch.randint(0, self.level + 1, (count, n), generator=gen)
        else:
            levels = torch.full((count, n), self.level)
        signs = torch.randint(0, 2, (count, n), generator=gen) * 2 - 1
        return ops, levels, signs

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        ops, levels, signs = self.draw(len(x), gen)
        for step in range(ops.shape[1]):
            for k in ops[:, step].unique().tolist():
                op = self.ops[k]
                rows = (ops[:, step] == k).nonzero().flatten()
                v = op.start + levels[rows, step].double() / self.n_level * (op.end - op.start)
                v = v.round() if op.integer else v
                keep = (v != op.start) | (not op.has_magnitude)
                v = torch.where(signs[rows, step] < 0, -v, v) if op.signed else v
                rows, v = rows[keep], v[keep].float()
                if len(rows):
                    dev_rows = rows.to(x.device)
                    x[dev_rows] = BATCHED_OPS[self.names[k]](x[dev_rows], v, gen).round().clamp(0, 255)
        return x


# --------------------------------------------------------------------------- the batched policy


class BatchAugment:
    """The batched counterpart of ``build_policy(cfg)``: ``aug(images, rows, epoch)`` augments an N×C×H×W
    batch (uint8, or float 0–255) on its device; ``rows`` (the batch's row indices) and ``epoch`` are used by
    the alternating flip only. Seeded and resumable through its one ``torch.Generator``."""

    def __init__(self, cfg: AugmentConfig, image_size: int, seed: int = 0) -> None:
        if cfg.policy not in BATCHED_POLICIES:
            raise ValueError(f"augment.policy={cfg.policy!r} has no batched form (data.loader: device); "
                             f"batched policies: {', '.join(BATCHED_POLICIES)}")
        if cfg.flip == "alternate" and cfg.policy not in ("basic", "flip_crop"):
            raise ValueError(f"augment.flip: alternate needs a policy with a flip (basic, flip_crop), "
                             f"not {cfg.policy!r}")
        self.policy, self.flip, self.size, self.seed = cfg.policy, cfg.flip, image_size, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.pad = max(2, image_size // 8) if cfg.policy == "basic" else max(1, image_size // 16)  # as per image
        self.randaugment = None
        if cfg.policy == "randaugment":
            names = list(cfg.ops) if cfg.ops else list(randaugment_ops(image_size))
            self.randaugment = BatchedRandAugment(names, cfg.n_select, cfg.level, cfg.n_level,
                                                  cfg.random_magnitude, image_size)

    def _flip(self, x: torch.Tensor, rows: Optional[torch.Tensor], epoch: int) -> torch.Tensor:
        if self.flip == "alternate":
            if rows is None:
                raise ValueError("augment.flip: alternate needs the batch's row indices")
            return hflip(x, alternate_flip_mask(rows, epoch, self.seed))
        return hflip(x, torch.rand(len(x), generator=self.generator) < 0.5)

    def __call__(self, images: torch.Tensor, rows: Optional[torch.Tensor] = None, epoch: int = 0) -> torch.Tensor:
        if self.policy == "none" or not len(images):
            return images
        x = images.float()
        g = self.generator
        if self.policy == "randaugment":
            x = self.randaugment(x.clone() if x is images else x, g)
        elif self.policy == "basic":
            x = self._flip(x, rows, epoch)
            n = len(x)
            apply = torch.rand(n, generator=g) < 0.5
            m = affine_matrices(n, rotate=_uniform(g, n, -10, 10), tx=_uniform(g, n, -0.0625, 0.0625),
                                ty=_uniform(g, n, -0.0625, 0.0625), scale=_uniform(g, n, 0.9, 1.1))
            rows_on = apply.nonzero().flatten().to(x.device)
            x[rows_on] = warp(x[rows_on], m[apply], 0.0)
            x = pad_crop(x, self.pad, g)
        else:  # flip_crop
            x = pad_crop(self._flip(x, rows, epoch), self.pad, g, mode="reflect")
        if images.is_floating_point():
            return x.to(images.dtype)
        return x.round().clamp(0, 255).to(images.dtype)

    def __repr__(self) -> str:
        return f"BatchAugment({self.policy}, flip={self.flip}, seed={self.seed})"
