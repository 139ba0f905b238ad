"""RandAugment (Cubuk et al., 2020; :class:`RandAugment`, every op an albumentations transform, chosen like
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

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import albumentations as A
import numpy as np

from pipeline.core import rng as rngs
from pipeline.core.config import AugmentConfig
from .policies import FILL, POLICIES


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
