"""Batched tensor augmentation against its per-image definitions: op magnitudes, flips, crops, determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core import rng as rngs
from pipeline.augment import (BATCHED_OPS, RANDAUGMENT_OPS, BatchAugment, BatchedRandAugment, build_op,
                              build_policy, randaugment_ops)
from pipeline.augment.batched import alternate_flip_mask, cutout, hflip, pad_crop
from pipeline.core.config import AugmentConfig, ConfigError, from_dict
from test_augment import IMAGES, SIZE, mean_abs_diff

GEOMETRIC = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}
NCHW = torch.from_numpy(IMAGES).permute(0, 3, 1, 2).contiguous()


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def per_image(name: str, level: int, sign: int) -> np.ndarray:
    transform = build_op(randaugment_ops(SIZE)[name], level / 30, sign)
    transform.set_random_seed(0)
    return np.stack([transform(image=im)["image"] for im in IMAGES])


def batched(name: str, level: int, sign: int) -> np.ndarray:
    op = randaugment_ops(SIZE)[name]
    v = op.start + level / 30 * (op.end - op.start)
    v = round(v) if op.integer else v
    v = -v if op.signed and sign < 0 else v
    out = BATCHED_OPS[name](NCHW.float(), torch.full((len(NCHW),), float(v)), torch.Generator().manual_seed(0))
    return nhwc(out)


@pytest.mark.parametrize("name", [o for o in RANDAUGMENT_OPS if o != "Cutout"])
def test_batched_op_matches_the_albumentations_op(name):
    """Same parameter, same effect: colour and LUT ops to within rounding, geometric ones to within
    interpolation (either sign convention: a signed op draws both)."""
    for level in (10, 30):
        for sign in (1, -1):
            expected = per_image(name, level, sign)
            effect = mean_abs_diff(expected, IMAGES)
            if name in GEOMETRIC:
                got = min(mean_abs_diff(batched(name, level, s), expected) for s in (1, -1))
                assert got < max(0.15 * effect, 1.0), (name, level, sign, got, effect)
            else:
                diff = np.abs(batched(name, level, sign).astype(int) - expected.astype(int))
                assert diff.mean() < 0.6 and np.quantile(diff, 0.99) <= 2, (name, level, sign, diff.mean())


def test_batched_cutout_is_one_square_of_the_op_size():
    sides = torch.tensor([1, 5, 16, 32] * 6)
    out = cutout(torch.full((24, 3, SIZE, SIZE), 7.0), sides, torch.Generator().manual_seed(0), fill=128)
    holes = (out[:, 0] == 128)
    assert (holes.sum((1, 2)) == sides ** 2).all()
    assert (holes == out[:, 1:].eq(128).all(1)).all()  # the same square in every channel


def test_flip_is_exact_and_crop_stays_inside_the_padding():
    mask = torch.arange(24) % 3 == 0
    flipped = hflip(NCHW, mask)
    assert torch.equal(flipped[mask], NCHW[mask].flip(-1)) and torch.equal(flipped[~mask], NCHW[~mask])
    pad = 4
    out = pad_crop(NCHW.float(), pad, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(NCHW.float(), (pad,) * 4)
    offsets = set()
    for i in range(len(out)):
        found = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if torch.equal(padded[i, :, dy:dy + SIZE, dx:dx + SIZE], out[i])]
        assert found, f"image {i} is not a window of its padded self"
        offsets.add(found[0])
    assert len(offsets) > 5  # the windows move


def test_alternating_flip_flips_each_image_once_per_two_epochs():
    rows = torch.arange(1000)
    for epoch in range(4):
        even, odd = alternate_flip_mask(rows, epoch, seed=3), alternate_flip_mask(rows, epoch + 1, seed=3)
        assert torch.equal(even, ~odd)
        assert 400 < int(even.sum()) < 600  # a random half
    assert not torch.equal(alternate_flip_mask(rows, 0, 3), alternate_flip_mask(rows, 0, 4))
    aug = BatchAugment(AugmentConfig(policy="flip_crop", flip="alternate"), SIZE, seed=5)
    aug.pad = 0  # no crop: pure flips, compared exactly
    perm = torch.randperm(24)
    seen = [aug(NCHW[perm], perm, epoch) for epoch in (6, 7)]
    flips = [(s == NCHW[perm].flip(-1)).flatten(1).all(1) for s in seen]
    assert torch.equal(flips[0], ~flips[1])


@pytest.mark.parametrize("policy", ["basic", "flip_crop", "randaugment"])
def test_batch_augment_is_seeded_resumable_and_keeps_dtype(policy):
    cfg = AugmentConfig(policy=policy, level=20)
    first = BatchAugment(cfg, SIZE, seed=0)
    a = first(NCHW)
    assert a.dtype == torch.uint8 and a.shape == NCHW.shape and not torch.equal(a, NCHW)
    assert torch.equal(a, BatchAugment(cfg, SIZE, seed=0)(NCHW))
    assert not torch.equal(a, BatchAugment(cfg, SIZE, seed=1)(NCHW))
    state = rngs.collect(first)
    b = first(NCHW)
    again = BatchAugment(cfg, SIZE, seed=9)
    rngs.restore(again, state)
    assert torch.equal(again(NCHW), b)
    f = BatchAugment(cfg, SIZE, seed=0)(NCHW.float())
    assert f.dtype == torch.float32 and (f - a.float()).abs().max() <= 1


def test_batched_randaugment_draws_like_the_per_image_one():
    ra = BatchedRandAugment(list(RANDAUGMENT_OPS), 2, 30, 30, True, SIZE)
    ops, levels, signs = ra.draw(5000, torch.Generator().manual_seed(0))
    assert (ops[:, 0] < ops[:, 1]).all()  # distinct, table order
    counts = torch.bincount(ops.flatten(), minlength=len(RANDAUGMENT_OPS)).float() / ops.numel()
    assert (counts - 1 / len(RANDAUGMENT_OPS)).abs().max() < 0.015
    assert levels.min() == 0 and levels.max() == 30 and set(signs.unique().tolist()) == {-1, 1}
    identity = BatchAugment(AugmentConfig(policy="randaugment", level=0, ops=["Rotate", "Brightness"]), SIZE)
    assert torch.equal(identity(NCHW), NCHW)


@pytest.mark.parametrize("level", [8, 20])
def test_batched_randaugment_changes_images_as_much_as_the_per_image_one(level):
    ops = [o for o in RANDAUGMENT_OPS if o not in ("Equalize", "AutoContrast")]  # strong, image-dependent
    cfg = AugmentConfig(policy="randaugment", ops=ops, n_select=2, level=level)
    reference = build_policy(cfg, SIZE, seed=0)
    per = np.mean([mean_abs_diff(reference.batch(IMAGES), IMAGES) for _ in range(8)])
    aug = BatchAugment(cfg, SIZE, seed=0)
    bat = np.mean([mean_abs_diff(nhwc(aug(NCHW)), IMAGES) for _ in range(8)])
    assert abs(bat - per) < 0.15 * per, (per, bat)


def test_unsupported_policies_and_flip_say_what_is_supported():
    with pytest.raises(ValueError, match="flip_crop, randaugment"):
        BatchAugment(AugmentConfig(policy="autoaugment"), SIZE)
    with pytest.raises(ValueError, match="ShearX"):
        BatchedRandAugment(["Shear"], 1, 5, 30, False, SIZE)
    with pytest.raises(ValueError, match="basic, flip_crop"):
        BatchAugment(AugmentConfig(policy="randaugment", flip="alternate"), SIZE)
    with pytest.raises(ConfigError, match="data.loader: device"):
        from_dict({"augment": {"flip": "alternate"}})
