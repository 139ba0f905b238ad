"""Augmentation policies, RandAugment magnitudes, mixup/cutmix targets, progressive resizing, preview."""
from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from pipeline import augment
from pipeline.augment import (POLICIES, RANDAUGMENT_OPS, Mixer, build_mixer, build_policy, preview_grid,
                              randaugment_ops, resize_batch, size_at_epoch)
from pipeline.core.config import AugmentConfig, ConfigError, from_dict

SIZE = 32
MAGNITUDE_FREE = {"Invert", "Equalize", "AutoContrast"}


def smooth_images(n: int = 24, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """Natural-looking test images: colour waves of under half a cycle per image plus a bright square, so
    that geometric ops change pixels more the further they move them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        chans = []
        for _ in range(3):
            fx, fy = rng.uniform(0.2, 0.5, size=2) * rng.choice([-1, 1], size=2)
            phase = rng.uniform(0, 2 * np.pi)
            chans.append(0.5 + 0.35 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase))
        image = np.stack(chans, -1) * 255
        y, x = rng.integers(4, size // 2, size=2)
        image[y:y + size // 3, x:x + size // 3] = rng.uniform(200, 255, size=3)
        out[i] = image.clip(0, 255).astype(np.uint8)
    return out


IMAGES = smooth_images()


def apply(cfg: AugmentConfig, images: np.ndarray = IMAGES, seed: int = 0) -> np.ndarray:
    policy = build_policy(cfg, SIZE, seed=seed)
    return np.stack([policy(image) for image in images])


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


# --------------------------------------------------------------------------- policies


@pytest.mark.parametrize("name", POLICIES.names())
def test_policy_shapes_dtype_and_determinism(name):
    cfg = AugmentConfig(policy=name)
    first = apply(cfg, seed=3)
    assert first.shape == IMAGES.shape and first.dtype == np.uint8
    np.testing.assert_array_equal(first, apply(cfg, seed=3))
    if name != "none":
        assert not np.array_equal(first, IMAGES)
        assert not np.array_equal(first, apply(cfg, seed=4))


def test_pil_policies_leave_global_random_state_alone():
    random.seed(1)
    np.random.seed(1)
    expected = (random.random(), np.random.random())
    random.seed(1)
    np.random.seed(1)
    apply(AugmentConfig(policy="trivialaugment"))
    assert (random.random(), np.random.random()) == expected


def test_unknown_policy_and_op_list_valid_names():
    with pytest.raises(KeyError, match="randaugment"):
        build_policy(AugmentConfig(policy="nope"), SIZE)
    with pytest.raises(KeyError, match="ShearX"):
        build_policy(AugmentConfig(policy="randaugment", ops=["Shear"]), SIZE)
    with pytest.raises(ValueError, match="n_select"):
        build_policy(AugmentConfig(policy="randaugment", ops=["Rotate"], n_select=2), SIZE)


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="augment.level"):
        from_dict({"augment": {"level": 31, "n_level": 30}})
    with pytest.raises(ConfigError, match="augment.size_epochs"):
        from_dict({"augment": {"sizes": [24, 32], "size_epochs": [0]}})


def test_randaugment_table_covers_the_seed_ops():
    assert set(RANDAUGMENT_OPS) == {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Contrast", "Invert",
                                    "Equalize", "AutoContrast", "Solarize", "Posterize", "Color", "Brightness",
                                    "Sharpness", "Cutout"}
    for name, op in randaugment_ops(SIZE).items():
        assert op.has_magnitude == (name not in MAGNITUDE_FREE), name
        assert name in augment.randaugment.__doc__  # every op is in the documented table


def op_diffs(op: str, levels, random_magnitude: bool = False) -> list[float]:
    diffs = []
    for level in levels:
        cfg = AugmentConfig(policy="randaugment", ops=[op], n_select=1, level=level, n_level=30,
                            random_magnitude=random_magnitude)
        diffs.append(mean_abs_diff(apply(cfg, seed=7), IMAGES))
    return diffs


@pytest.mark.parametrize("op", [o for o in RANDAUGMENT_OPS if o not in MAGNITUDE_FREE])
def test_randaugment_magnitude_is_monotone(op):
    levels = [0, 5, 10, 15, 20, 25, 30]
    diffs = op_diffs(op, levels)
    assert diffs[0] < 0.5, f"{op}: level 0 should leave the image unchanged, got {diffs}"
    assert diffs[-1] > diffs[0] + 3.0, f"{op}: the strongest level barely changes the image: {diffs}"
    for lower, higher in zip(diffs, diffs[1:]):
        assert higher >= lower - 0.25, f"{op}: change does not grow with level: {diffs}"
    assert max(diffs) <= diffs[-1] + 0.25  # level n_level is the strongest


@pytest.mark.parametrize("op", sorted(MAGNITUDE_FREE))
def test_magnitude_free_ops_ignore_level(op):
    low, high = op_diffs(op, [0, 30])
    assert low == high and low > 1.0


def test_random_magnitude_stays_below_the_level():
    constant = op_diffs("Rotate", [20])[0]
    random_level = op_diffs("Rotate", [20], random_magnitude=True)[0]
    assert 0.5 < random_level < constant
    assert op_diffs("Rotate", [0], random_magnitude=True)[0] == 0.0


def test_randaugment_applies_n_select_ops():
    one = apply(AugmentConfig(policy="randaugment", ops=["Brightness", "Posterize"], n_select=1, level=30))
    two = apply(AugmentConfig(policy="randaugment", ops=["Brightness", "Posterize"], n_select=2, level=30))
    zero = apply(AugmentConfig(policy="randaugment", n_select=0, level=30))
    np.testing.assert_array_equal(zero, IMAGES)
    assert mean_abs_diff(two, IMAGES) > mean_abs_diff(one, IMAGES)


@pytest.mark.parametrize("name", POLICIES.names())
def test_policy_batch_matches_shapes(name):
    policy = build_policy(AugmentConfig(policy=name), SIZE, seed=0)
    out = policy.batch(IMAGES[:6])
    assert out.shape == (6, SIZE, SIZE, 3) and out.dtype == np.uint8


def test_randaugment_batch_equals_per_image_ops():
    """Grouping a batch by (op, level, sign) gives what applying each image's draws one by one gives."""
    ops = [o for o in RANDAUGMENT_OPS if o != "Cutout"]  # Cutout's hole position is its own randomness
    cfg = AugmentConfig(policy="randaugment", ops=ops, n_select=2, level=12, random_magnitude=True)
    ra = build_policy(cfg, SIZE, seed=0).transform
    rng = copy.deepcopy(ra.rng)
    batch = ra.apply_batch(IMAGES)
    ra.rng = rng
    draws = ra.draw(len(IMAGES))
    for i, image in enumerate(IMAGES):
        for op, level, sign in zip(*(d[i] for d in draws)):
            transform = ra.variant(int(op), int(level), int(sign))
            image = image if transform is None else transform(image=image)["image"]
        np.testing.assert_array_equal(batch[i], image)
    assert (draws[0][:, 0] < draws[0][:, 1]).all()  # two distinct ops, in table order


def test_invert_batch_is_exact():
    out = build_policy(AugmentConfig(policy="randaugment", ops=["Invert"], n_select=1), SIZE).batch(IMAGES)
    np.testing.assert_array_equal(out, 255 - IMAGES)


def test_policy_reseeds_in_each_dataloader_worker():
    policy = build_policy(AugmentConfig(policy="randaugment", level=20), SIZE, seed=0)

    class Same(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.from_numpy(policy(IMAGES[0]))

    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(Same(), batch_size=2, num_workers=2, multiprocessing_context="fork")
    first, second = [b.numpy() for b in loader]  # one batch of two from each worker
    assert not np.array_equal(first, second)  # forked copies of one random state would repeat each other


# --------------------------------------------------------------------------- mixup / cutmix


def distinct_batch(n: int = 8, c: int = 3, size: int = 16) -> torch.Tensor:
    """Image i is constant i + 1, so every pixel tells where it came from."""
    return torch.arange(1, n + 1, dtype=torch.float32).view(n, 1, 1, 1).expand(n, c, size, size).clone()


def test_no_mixing_configured_means_no_mixer():
    assert build_mixer(AugmentConfig(), 10) is None
    assert build_mixer(AugmentConfig(mixup_alpha=1.0, mix_prob=0.0), 10) is None


def test_mixup_targets_match_lambda():
    mixer = build_mixer(AugmentConfig(mixup_alpha=0.4), 5, seed=0)
    x, y = distinct_batch(), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    for _ in range(5):
        out, soft = mixer(x, y)
        lam, perm = mixer.last["lam"], mixer.last["perm"]
        assert mixer.last["mode"] == "mixup" and 0 <= lam <= 1
        torch.testing.assert_close(out, lam * x + (1 - lam) * x[perm])
        assert soft.shape == (8, 5) and soft.dtype == torch.float32
        torch.testing.assert_close(soft.sum(1), torch.ones(8))
        expected = lam * torch.eye(5)[y] + (1 - lam) * torch.eye(5)[y[perm]]
        torch.testing.assert_close(soft, expected)


def test_cutmix_targets_match_the_pasted_area():
    mixer = Mixer(10, cutmix_alpha=1.0, seed=1)
    x, y = distinct_batch(), torch.arange(8)
    for _ in range(5):
        out, soft = mixer(x, y)
        lam, perm = mixer.last["lam"], mixer.last["perm"]
        assert mixer.last["mode"] == "cutmix"
        for i in range(8):
            kept = (out[i] == x[i, 0, 0, 0]).float().mean().item()
            if perm[i] != i:
                assert kept == pytest.approx(lam)
                assert soft[i, y[i]] == pytest.approx(lam) and soft[i, y[perm[i]]] == pytest.approx(1 - lam)
        torch.testing.assert_close(soft.sum(1), torch.ones(8))


@pytest.mark.parametrize("switch, mode", [(1.0, "cutmix"), (0.0, "mixup")])
def test_switch_prob_chooses_cutmix_or_mixup(switch, mode):
    mixer = build_mixer(AugmentConfig(mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=switch), 3, seed=0)
    mixer(distinct_batch(4), torch.tensor([0, 1, 2, 0]))
    assert mixer.last["mode"] == mode


def test_mix_prob_leaves_some_batches_one_hot_and_odd_batches_work():
    mixer = build_mixer(AugmentConfig(mixup_alpha=1.0, mix_prob=0.5), 4, seed=0)
    x, y = distinct_batch(5), torch.tensor([0, 1, 2, 3, 0])
    modes = []
    for _ in range(20):
        out, soft = mixer(x, y)
        modes.append(mixer.last["mode"])
        if mixer.last["mode"] is None:
            assert torch.equal(out, x) and torch.equal(soft, torch.eye(4)[y])
        torch.testing.assert_close(soft.sum(1), torch.ones(5))
    assert None in modes and "mixup" in modes


def test_mixer_is_deterministic_under_a_seed():
    cfg = AugmentConfig(mixup_alpha=0.5, cutmix_alpha=1.0)
    x, y = distinct_batch(), torch.arange(8) % 3
    a = [build_mixer(cfg, 3, seed=5)(x, y) for _ in range(1)][0]
    b = build_mixer(cfg, 3, seed=5)(x, y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------- progressive resizing


def test_size_at_epoch():
    cfg = AugmentConfig(sizes=[24, 32], size_epochs=[0, 3])
    assert [size_at_epoch(cfg, e, 32) for e in range(5)] == [24, 24, 24, 32, 32]
    assert size_at_epoch(AugmentConfig(), 7, 48) == 48
    three = AugmentConfig(sizes=[128, 160, 224], size_epochs=[0, 2, 4])
    assert [size_at_epoch(three, e, 224) for e in range(6)] == [128, 128, 160, 160, 224, 224]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_resize_batch(dtype):
    images = torch.from_numpy(IMAGES[:4]).permute(0, 3, 1, 2).to(dtype)
    small = resize_batch(images, 24)
    assert small.shape == (4, 3, 24, 24) and small.dtype == dtype
    assert resize_batch(images, 32) is images
    flat = torch.full((2, 3, 32, 32), 77, dtype=dtype)
    assert torch.allclose(resize_batch(flat, 20).float(), torch.tensor(77.0))
    big = resize_batch(images.contiguous(memory_format=torch.channels_last), 48)
    assert big.shape == (4, 3, 48, 48)
    assert abs(big.float().mean().item() - images.float().mean().item()) < 2.0


# --------------------------------------------------------------------------- preview


def test_preview_grid():
    cfg = AugmentConfig(policy="randaugment", mixup_alpha=0.2)
    grid = preview_grid(IMAGES, cfg, SIZE, n=10, seed=0)
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    cell = SIZE * 3  # upscaled to at least 96 px; 10 images on a 4×3 grid with 2 px gaps
    assert grid.shape[:2] == (3 * (cell + 2) + 2, 4 * (cell + 2) + 2)
    np.testing.assert_array_equal(grid, preview_grid(IMAGES, cfg, SIZE, n=10, seed=0))


def test_preview_cli_writes_png(tmp_path, monkeypatch):
    from PIL import Image

    from pipeline import preprocess
    from pipeline.data.demo import build

    monkeypatch.chdir(tmp_path)
    build(tmp_path / "demo")
    overrides = [f"data.root={tmp_path / 'demo'}", f"runs_dir={tmp_path / 'runs'}", "experiment=aug",
                 f"data.cache_dir={tmp_path / 'cache'}", "augment.policy=randaugment"]
    preprocess.run(from_dict({}, overrides))
    args = ["--preview", "--out", str(tmp_path / "grid.png"), "-n", "8"]
    assert augment.main(args + [a for o in overrides for a in ("--set", o)]) == 0
    with Image.open(tmp_path / "grid.png") as image:
        assert image.mode == "RGB" and image.size[0] > 96
