"""Aspect-aware resizing in the cache (squash / crop / pad), the cache margin and the centre crop at evaluation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import preprocess
from pipeline.data.cache import PAD_FILL, cache_side, decode
from pipeline.rundir import load_split
from pipeline.data.dataset import iter_batches

from conftest import make_cfg


@pytest.fixture
def wide_photo(tmp_path):
    """An 80×40 (4:2) image: dark background, a green 20×20 square in the middle, red left edge."""
    image = np.full((40, 80, 3), 20, np.uint8)
    image[10:30, 30:50] = (0, 255, 0)
    image[:, :4] = (255, 0, 0)
    path = tmp_path / "wide.png"
    Image.fromarray(image).save(path)
    return path


def _green_box(image: np.ndarray) -> tuple[int, int]:
    """Height and width of the green square's bounding box."""
    ys, xs = np.nonzero((image[..., 1] > 160) & (image[..., 0] < 100))
    return ys.max() - ys.min() + 1, xs.max() - xs.min() + 1


def test_resize_modes_keep_the_content_and_the_size(wide_photo):
    squash, crop, pad = (decode(wide_photo, 32, mode) for mode in ("squash", "crop", "pad"))
    assert squash.shape == crop.shape == pad.shape == (32, 32, 3)
    h, w = _green_box(squash)
    assert h >= 1.6 * w  # stretched: the square became tall
    h, w = _green_box(crop)
    assert abs(h - w) <= 1 and h == pytest.approx(16, abs=1)  # short side 40 → 32: the square 20 → 16
    assert crop[:, :3, 0].max() < 100  # the red left edge was cropped away
    h, w = _green_box(pad)
    assert abs(h - w) <= 1 and h == pytest.approx(8, abs=1)  # long side 80 → 32: 20 → 8
    assert (pad[:7] == PAD_FILL).all() and (pad[-7:] == PAD_FILL).all()  # letterbox bars above and below
    assert pad[16, 0, 0] > 200  # the red edge is kept
    with pytest.raises(ValueError, match="data.resize"):
        decode(wide_photo, 32, "stretch")


def test_cache_margin_and_centre_crop(tmp_path, competition):
    assert cache_side(224, 0.875) == 256 and cache_side(32, 1.0) == 32
    cfg = make_cfg(tmp_path, competition, "data.image_size=16", "data.crop_pct=0.8", "data.resize=crop")
    manifest = preprocess.run(cfg)
    assert manifest["cache_size"] == 20 and manifest["resize"] == "crop"
    images, _ = load_split(cfg.run_dir, "train", manifest)
    assert images.shape[1:] == (20, 20, 3)
    (batch,) = iter_batches(images, np.arange(4), 8, size=16)
    assert batch.shape == (4, 3, 16, 16)
    assert torch.equal(batch, torch.from_numpy(np.array(images[:4, 2:18, 2:18])).permute(0, 3, 1, 2))
    # a different resize mode is a different cache
    other = preprocess.run(make_cfg(tmp_path, competition, "data.image_size=16", "data.crop_pct=0.8"))
    assert other["train"]["array"] != manifest["train"]["array"]


def test_training_and_inference_on_a_cache_with_margin(tmp_path, competition):
    from pipeline import folds, infer, train

    cfg = make_cfg(tmp_path, competition, "data.crop_pct=0.8", "augment.policy=resized_crop")
    preprocess.run(cfg)
    folds.run(cfg)
    report = train.run(cfg)
    assert report["scored_rows"] == report["total_rows"]
    probs = infer.run(cfg)
    assert np.allclose(probs.drop(columns="id").sum(axis=1), 1, atol=1e-4)


def test_size_suggestion_weighs_the_hardware(monkeypatch):
    from pipeline.eda import suggest

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    size, why = suggest._hardware_cap(384, "median short side is 400 px")
    assert size == 224 and "2.9×" in why and "2 CPU cores" in why
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert suggest._hardware_cap(384, "x")[0] == 384
