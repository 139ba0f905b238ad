"""train.refit: one model on every training row after the CV; its test predictions; ensemble.refit with/instead."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.training import fold
from pipeline.training.mode import FoldData
from pipeline import provenance
from pipeline import ensemble, folds, infer, preprocess, train
from pipeline.core.config import ConfigError, with_values
from pipeline.rundir import load_split, read_cv
from pipeline.core.utils import read_json

from conftest import KeepEpochOne, make_cfg, trained_run


@pytest.fixture(scope="module")
def refitted(tmp_path_factory):
    """A tiny competition trained with 3 folds and a refit, predicted by infer (the refit last)."""
    return trained_run(tmp_path_factory.mktemp("refit"), "train.refit=true", "train.epochs=2")[1]


def test_refit_trains_on_every_row_and_keeps_the_cv_the_folds(refitted):
    cfg = refitted
    result = provenance.fold_done(cfg, None)
    assert result and result["fold"] is None and (cfg.run_dir / "refit" / "best.safetensors").is_file()
    assert result["best_epoch"] == 2  # nothing held out: the last epoch (of 2) is kept
    assert result["metrics"] == dict.fromkeys(("accuracy", "macro_f1", "log_loss", "loss"))  # no scores: null
    manifest = preprocess.run(cfg)
    images, index = load_split(cfg.run_dir, "train", manifest)
    run = fold.FoldRun(FoldData(cfg, manifest, images, index, folds.run(cfg), torch.device("cpu")), None)
    assert len(run.train_rows) == len(index) == 36 and len(run.valid_rows) == 0
    cv = read_json(cfg.run_dir / "cv.json")
    assert cv["refit"]["rows"] == 36 and "OOF and CV are the fold models'" in cv["refit"]["note"]
    assert sorted(cv["folds"]) == ["0", "1", "2"] and cv["scored_rows"] == 36
    assert np.load(cfg.run_dir / "refit" / "test.npy").shape == (6, 3)
    assert read_json(cfg.run_dir / "refit" / "test.json")["tta"] == list(cfg.infer.tta)


def test_refit_is_skipped_when_done_and_retrained_when_settings_change(refitted, caplog):
    with caplog.at_level("INFO", logger="pipeline"):
        train.run(refitted)
    assert "refit already trained with these settings: skipped" in caplog.text
    assert not provenance.fold_done(with_values(refitted, {"train.lr": 0.01}), None)


@pytest.mark.parametrize("mode, weight", [("with", 0.5), ("with", 0.25), ("instead", 1.0)])
def test_ensemble_combines_the_refit_with_or_instead_of_the_folds(refitted, mode, weight):
    cfg = with_values(refitted, {"ensemble.refit": mode, "ensemble.refit_weight": weight})
    out = ensemble.run(cfg).drop(columns="id").to_numpy()
    folds_mean = np.mean([np.load(cfg.run_dir / f"fold{k}" / "test.npy") for k in range(3)], axis=0)
    refit = np.load(cfg.run_dir / "refit" / "test.npy")
    np.testing.assert_allclose(out, (1 - weight) * folds_mean + weight * refit, rtol=1e-5, atol=1e-6)
    report = read_json(cfg.run_dir / "ensemble.json")
    assert "OOF scores and fitted weights are the fold models'" in report["refit"]["note"]
    assert report["oof"]["accuracy"] == read_cv(cfg.run_dir)["oof_tta"]["accuracy"]  # the folds'


def test_without_refit_the_ensemble_ignores_a_left_over_refit_model(refitted):
    cfg = with_values(refitted, {"train.refit": False})
    out = ensemble.run(cfg).drop(columns="id").to_numpy()
    folds_mean = np.mean([np.load(cfg.run_dir / f"fold{k}" / "test.npy") for k in range(3)], axis=0)
    np.testing.assert_allclose(out, folds_mean, rtol=1e-5, atol=1e-6)
    assert "refit" not in read_json(cfg.run_dir / "ensemble.json")


def test_refit_added_later_keeps_the_folds(tmp_path, caplog):
    """Turning train.refit on after the CV trains only the refit; infer refuses until it exists."""
    _, cfg = trained_run(tmp_path, "train.folds=[0]")
    cfg = with_values(cfg, {"train.refit": True})
    with pytest.raises(FileNotFoundError, match="train.refit: no refit model trained with these settings"):
        infer.run(cfg)
    with caplog.at_level("INFO", logger="pipeline"):
        train.run(cfg)
    assert "fold 0 already trained with these settings: skipped" in caplog.text and "refit epoch 1/1" in caplog.text
    infer.run(cfg)
    assert (cfg.run_dir / "refit" / "test.npy").is_file()


def test_refit_resumes_exactly(tmp_path, competition):
    cfg = make_cfg(tmp_path, competition, "train.epochs=2", "train.refit=true")
    manifest = preprocess.run(cfg)
    images, index = load_split(cfg.run_dir, "train", manifest)
    split = folds.run(cfg)
    data = FoldData(cfg, manifest, images, index, split, torch.device("cpu"))
    run = lambda cls=fold.FoldRun: cls(data, None)  # noqa: E731
    run(KeepEpochOne).fit()
    refit_dir = cfg.run_dir / "refit"
    reference = (refit_dir / "best.safetensors").read_bytes()
    shutil.copy(refit_dir / "epoch1_state.pt", refit_dir / "last_state.pt")
    resumed = run()
    resumed.fit()
    assert resumed.epoch == 2 and (refit_dir / "best.safetensors").read_bytes() == reference


def test_refit_needs_a_fixed_schedule():
    with pytest.raises(ConfigError, match="train.refit"):
        with_values(make_cfg("/tmp", None), {"train.refit": True, "train.scheduler": "plateau"})
