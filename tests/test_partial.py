"""train.mode=partial: the frozen front cached once per view, the last blocks trained per fold on the cache;
crop views cached and reused like the TTA views."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from pipeline import ensemble, folds, preprocess, submit
from pipeline.core.config import ConfigError
from pipeline.data.dataset import iter_batches, to_float
from pipeline.models.weights import normalization
from pipeline.rundir import load_manifest, load_split, read_cv, read_folds
from pipeline.training import features, partial

from conftest import chain, make_cfg


def _files(tmp_path, kind):
    return {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache" / kind).glob("*.npy")}


def _base(tiny_weights, *more):
    return ["train.mode=partial", "train.tune_blocks=2", "train.epochs=2", "train.batch_size=8",
            "model.name=test_efficientnet", f"model.weights={tiny_weights}", "infer.tta=[identity,hflip]",
            "train.optimizer=adamw", "train.lr=0.01", *more]


def test_partial_mode_end_to_end_and_its_cache(tmp_path, competition, tiny_weights, caplog):
    caplog.set_level(logging.INFO)
    cfg = make_cfg(tmp_path, competition, *_base(tiny_weights))
    report = chain(cfg)
    assert report["scored_rows"] == report["total_rows"] == 36
    assert read_cv(cfg.run_dir)["oof_tta"]["tta"] == ["identity", "hflip"]
    for fold in range(3):
        assert np.load(cfg.run_dir / f"fold{fold}" / "test.npy").shape == (6, 3)
    ensemble.run(cfg)
    assert submit.run(cfg).is_file()
    cached = _files(tmp_path, "activations")
    assert len(cached) == 4  # train and test × identity and hflip

    # another schedule: retrained from the cached activations, nothing recomputed
    caplog.clear()
    chain(make_cfg(tmp_path, competition, *_base(tiny_weights, "train.lr=0.001")))
    assert _files(tmp_path, "activations") == cached and "frozen front" not in caplog.text
    assert "fold 0 already trained" not in caplog.text  # the new settings retrain every fold

    # another cut: its own activations, the first ones untouched
    chain(make_cfg(tmp_path, competition, *_base(tiny_weights, "train.tune_blocks=1")))
    after = _files(tmp_path, "activations")
    assert len(after) == 8 and all(after[name] == t for name, t in cached.items())


def test_partial_trains_only_the_last_blocks(tmp_path, competition, tiny_weights):
    """Every tensor of the frozen front (weights and batch-norm statistics) is the pretrained one after
    training; the tuned blocks and the classifier moved."""
    cfg = make_cfg(tmp_path, competition, *_base(tiny_weights, "train.bn=frozen"))
    chain(cfg)
    start = load_file(str(tiny_weights))
    trained = load_file(str(cfg.run_dir / "fold0" / "best.safetensors"))
    model = timm.create_model("test_efficientnet", num_classes=3)
    front, back = partial.split_backbone(model, 2)
    names = {id(t): n for n, t in model.state_dict(keep_vars=True).items()}
    front_keys = [names[id(t)] for t in front.state_dict(keep_vars=True).values()]
    back_keys = [names[id(t)] for t in back.state_dict(keep_vars=True).values()]
    assert front_keys and all(torch.equal(trained[k], start[k]) for k in front_keys)
    moved = [k for k in back_keys if k in start and start[k].shape == trained[k].shape
             and not torch.equal(trained[k], start[k])]
    assert any(k.startswith("blocks.") for k in moved) and any(k.startswith("conv_head") for k in moved)
    assert "classifier.weight" in back_keys


def test_cached_activations_equal_a_fresh_forward(tmp_path, competition, tiny_weights):
    cfg = make_cfg(tmp_path, competition, *_base(tiny_weights))
    preprocess.run(cfg)
    manifest = load_manifest(cfg.run_dir)
    acts = partial.activations(cfg, manifest, "train", ["identity", "hflip"], torch.device("cpu"))
    images, _ = load_split(cfg.run_dir, "train", manifest)
    model = timm.create_model("test_efficientnet", num_classes=3)
    model.load_state_dict({k: v for k, v in load_file(str(tiny_weights)).items()
                           if not k.startswith("classifier")}, strict=False)
    front, _ = partial.split_backbone(model.eval(), 2)
    mean, std = normalization(cfg.model, manifest)
    x = torch.cat([to_float(b, mean, std, torch.device("cpu")) for b in
                   iter_batches(images, np.arange(len(images)), 64, cfg.data.image_size)])
    with torch.no_grad():
        fresh = front(x).numpy()
        flipped = front(x.flip(-1)).numpy()
    assert acts.shape == (2, *fresh.shape) and acts.dtype == np.float16
    scale = np.abs(fresh).max()
    assert np.abs(acts[0].astype(np.float32) - fresh).max() <= 2e-3 * scale
    assert np.abs(acts[1].astype(np.float32) - flipped).max() <= 2e-3 * scale


def test_split_backbone_is_the_whole_network_and_refuses_others():
    model = timm.create_model("test_efficientnet", num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    for blocks in (1, 3, 5):
        front, back = partial.split_backbone(model, blocks)
        with torch.no_grad():
            assert torch.allclose(back(front(x)), model(x), atol=1e-5)
    with pytest.raises(ConfigError, match="has 5 blocks"):
        partial.split_backbone(model, 6)
    with pytest.raises(ConfigError, match="EfficientNet-family"):
        partial.split_backbone(timm.create_model("resnet10t"), 1)


def test_crop_views_are_seeded_inside_the_image_and_distinct():
    boxes = features.crop_boxes(50, "crop0", 40, 30)
    assert np.array_equal(boxes, features.crop_boxes(50, "crop0", 40, 30))
    assert not np.array_equal(boxes, features.crop_boxes(50, "crop1", 40, 30))
    top, left, h, w = boxes[:, :4].T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 40).all() and (left + w <= 30).all()
    batch = torch.arange(2 * 3 * 40 * 30, dtype=torch.float32).reshape(2, 3, 40, 30) % 255
    assert features.crop_view(batch, boxes[:2], 16).shape == (2, 3, 16, 16)


def test_crop_view_features_are_cached_reused_and_invalidated(tmp_path, competition, tiny_weights):
    base = ["train.mode=features", "model.name=test_efficientnet", f"model.weights={tiny_weights}",
            "infer.tta=[identity,hflip]", "train.crop_views=2"]
    cfg = make_cfg(tmp_path, competition, *base)
    chain(cfg)
    files = _files(tmp_path, "features")
    assert sorted(n.split("-")[0] + "-" + n.split("-")[-2] for n in files) == sorted(
        ["train-identity", "train-hflip", "train-crop0", "train-crop1", "test-identity", "test-hflip"])
    manifest = load_manifest(cfg.run_dir)
    feats = features.embeddings(cfg, manifest, "train", features.train_views(cfg), torch.device("cpu"))
    assert not np.allclose(feats["crop0"], feats["crop1"]) and not np.allclose(feats["crop0"], feats["identity"])
    chain(make_cfg(tmp_path, competition, *base, "train.head_c=0.1"))  # another head: every view reused
    assert _files(tmp_path, "features") == files
    chain(make_cfg(tmp_path, competition, *base, "data.image_size=24"))  # another size: every view again
    after = _files(tmp_path, "features")
    assert len(after) == 12 and all(after[name] == t for name, t in files.items())


def test_the_chosen_head_never_sees_the_held_out_fold(tmp_path, competition, tiny_weights):
    """logreg_cv chooses C inside the fold's training rows: scrambling the held-out rows' features and labels
    leaves the fitted head exactly as it was."""
    cfg = make_cfg(tmp_path, competition, "train.mode=features", "model.name=test_efficientnet",
                   f"model.weights={tiny_weights}", "infer.tta=[identity,hflip]", "train.head=logreg_cv",
                   "train.class_weights=balanced")
    preprocess.run(cfg)
    folds.run(cfg)
    manifest = load_manifest(cfg.run_dir)
    _, index = load_split(cfg.run_dir, "train", manifest)
    table = read_folds(cfg.run_dir, index)
    feats = features.embeddings(cfg, manifest, "train", features.train_views(cfg), torch.device("cpu"))
    features.fit_fold(cfg, 0, feats, index, table, manifest["classes"])
    first = load_file(str(cfg.run_dir / "fold0" / "best.safetensors"))
    held = table["fold"].to_numpy() == 0
    rng = np.random.default_rng(0)
    scrambled = {v: np.where(held[:, None], rng.normal(size=f.shape).astype(np.float32), f) for v, f in feats.items()}
    shuffled = index.copy()
    shuffled.loc[held, "label_idx"] = rng.permutation(shuffled.loc[held, "label_idx"].to_numpy())[::-1]
    features.fit_fold(cfg, 0, scrambled, shuffled, table, manifest["classes"])
    second = load_file(str(cfg.run_dir / "fold0" / "best.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)
