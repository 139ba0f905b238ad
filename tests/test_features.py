"""train.mode=features: embeddings cached per backbone/weights/size/view, a head per fold, the chain unchanged."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from pipeline import ensemble, folds, preprocess, submit, train
from pipeline.training import features
from pipeline.rundir import read_cv

from conftest import chain, fold_run, make_cfg


def _feature_files(tmp_path):
    return {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "features").glob("*.npy")}


def test_features_mode_end_to_end(tmp_path, competition, tiny_weights, caplog):
    caplog.set_level(logging.INFO)
    base = ["train.mode=features", "model.name=test_efficientnet", f"model.weights={tiny_weights}",
            "infer.tta=[identity,hflip]"]
    cfg = make_cfg(tmp_path, competition, *base)
    report = chain(cfg)
    assert report["scored_rows"] == report["total_rows"] == 36
    cv = read_cv(cfg.run_dir)
    assert cv["oof_tta"]["tta"] == ["identity", "hflip"] and 0 <= cv["oof_tta"]["accuracy"] <= 1
    for fold in range(3):
        assert (cfg.run_dir / f"fold{fold}" / "best.safetensors").is_file()
        assert np.load(cfg.run_dir / f"fold{fold}" / "test.npy").shape == (6, 3)
    ensemble.run(cfg)
    assert submit.run(cfg).is_file()
    files = _feature_files(tmp_path)
    assert len(files) == 4  # train and test × identity and hflip

    # another head: refitted from the cached embeddings, nothing re-embedded
    caplog.clear()
    chain(make_cfg(tmp_path, competition, *base, "train.head_c=0.1"))
    assert _feature_files(tmp_path) == files
    assert "embedded" not in caplog.text and "cached" in caplog.text

    # the MLP head: same embeddings, its own checkpoints, the chain unchanged
    report = chain(make_cfg(tmp_path, competition, *base, "train.head=mlp", "train.head_steps=20"))
    assert report["scored_rows"] == 36 and _feature_files(tmp_path) == files

    # another backbone (the shipped Lite0 weights) or another size: new embeddings
    chain(make_cfg(tmp_path, competition, "train.mode=features", "model.name=efficientnet_lite0",
                    "model.pretrained=true", "infer.tta=[identity,hflip]"))
    assert len(_feature_files(tmp_path)) == 8
    chain(make_cfg(tmp_path, competition, *base, "data.image_size=24"))
    after = _feature_files(tmp_path)
    assert len(after) == 12 and all(after[name] == t for name, t in files.items())


def test_features_mode_needs_pretrained_weights(tmp_path, competition):
    cfg = make_cfg(tmp_path, competition, "train.mode=features", "model.name=test_efficientnet")
    preprocess.run(cfg)
    folds.run(cfg)
    with pytest.raises(ValueError, match="pretrained backbone"):
        train.run(cfg)


def test_linear_probe_head_init_is_the_features_head(tmp_path, competition, tiny_weights):
    """train.head_init=linear_probe starts fine-tuning from the features mode's fold head: fitted on the same
    training rows only (equal weights), so the held-out fold never shapes its own model."""
    import torch
    from safetensors.torch import load_file

    base = ["model.name=test_efficientnet", f"model.weights={tiny_weights}", "infer.tta=[identity,hflip]"]
    features_cfg = make_cfg(tmp_path, competition, *base, "train.mode=features", "experiment=probe")
    chain(features_cfg)
    cfg = make_cfg(tmp_path, competition, *base, "train.head_init=linear_probe", "train.ema_decay=0.9")
    run = fold_run(cfg, fold=1)
    saved = load_file(str(features_cfg.run_dir / "fold1" / "best.safetensors"))
    head = run.training.model.get_classifier()
    assert torch.allclose(head.weight, saved["weight"].float(), atol=1e-5)
    assert torch.allclose(head.bias, saved["bias"].float(), atol=1e-5)
    assert torch.equal(run.training.ema.module.get_classifier().weight, head.weight)  # the EMA starts from the probe too


def test_a_cached_pass_is_keyed_by_its_precision_and_engine(tmp_path):
    manifest = {"train": {"signature": "0" * 40}}
    paths = {(p, e): features.features_path(make_cfg(tmp_path, None, f"train.precision={p}", f"infer.engine={e}"),
                                             manifest, "train", "identity")
             for p in ("fp32", "bf16") for e in ("torch", "onnxruntime")}
    assert len(set(paths.values())) == 4  # a bf16 pass is never read where fp32 is asked for, nor across engines
