"""No stale or mixed results: infer re-predicts what changed, dropped folds stop counting, a run folder
holds one dataset and one process at a time."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import pytest

from pipeline import folds, infer, preprocess, train
from pipeline.rundir import read_cv
from pipeline import rundir
from pipeline.core.utils import read_json

from conftest import locked_elsewhere, make_cfg, make_competition, stage_argv, trained_run

OVERRIDES = ("experiment=stale", "train.lr=0.01", "train.optimizer=adamw", "infer.tta=[identity]")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three folds trained for one epoch and predicted, in one run folder shared by this module's tests."""
    tmp = tmp_path_factory.mktemp("stale")
    root, cfg = trained_run(tmp, *OVERRIDES)
    return tmp, root, cfg


def predicted(cfg, fold: int) -> np.ndarray:
    return np.load(cfg.run_dir / f"fold{fold}" / "test.npy")


def test_infer_repredicts_when_the_tta_views_change(trained):
    tmp, root, cfg = trained
    before = predicted(cfg, 0)
    hflip = make_cfg(tmp, root, *OVERRIDES, "infer.tta=[hflip]")
    infer.run(hflip)
    assert read_json(cfg.run_dir / "fold0" / "test.json")["tta"] == ["hflip"]
    assert not np.array_equal(predicted(cfg, 0), before)
    infer.run(cfg)
    np.testing.assert_array_equal(predicted(cfg, 0), before)


def test_infer_repredicts_when_a_folds_weights_change_even_with_an_older_mtime(trained):
    _, _, cfg = trained
    fold0, fold1 = cfg.run_dir / "fold0", cfg.run_dir / "fold1"
    original = (fold0 / "best.safetensors").read_bytes()
    try:
        shutil.copy(fold1 / "best.safetensors", fold0 / "best.safetensors")
        old = (fold0 / "test.npy").stat().st_mtime - 3600
        os.utime(fold0 / "best.safetensors", (old, old))  # older than the predictions it invalidates
        infer.run(cfg)
        np.testing.assert_array_equal(predicted(cfg, 0), predicted(cfg, 1))
    finally:
        (fold0 / "best.safetensors").write_bytes(original)
    infer.run(cfg)
    assert not np.array_equal(predicted(cfg, 0), predicted(cfg, 1))


def test_folds_dropped_from_train_folds_stop_counting(trained):
    tmp, root, cfg = trained
    assert read_json(cfg.run_dir / "cv.json")["scored_rows"] == 36
    only0 = make_cfg(tmp, root, *OVERRIDES, "train.folds=[0]")
    report = train.run(only0)
    assert report["scored_rows"] == 12 and list(report["folds"]) == [0]
    assert pd.read_csv(only0.run_dir / "oof.csv").dropna()["fold"].unique().tolist() == [0]
    probs = infer.run(only0)
    np.testing.assert_allclose(probs.drop(columns="id").to_numpy(), predicted(cfg, 0), rtol=1e-6)
    assert list(read_cv(cfg.run_dir)["oof_tta"]["folds"]) == ["0"]
    # a fold trained with other settings does not count either
    other = make_cfg(tmp, root, *OVERRIDES, "train.lr=0.02")
    with pytest.raises(FileNotFoundError, match="trained with these settings"):
        infer.trained_folds(other)
    assert train.run(cfg)["scored_rows"] == 36  # all three folds again: nothing retrained


def test_a_run_folder_refuses_another_dataset(trained, capsys):
    tmp, _, cfg = trained
    other = make_competition(tmp / "other", seed=1)
    assert preprocess.main(stage_argv(tmp, other, *OVERRIDES)) == 1
    err = capsys.readouterr().err
    assert f"holds results made from {os.path.realpath(tmp / 'comp')}" in err
    assert "--set experiment=stale-other" in err
    assert preprocess.main(stage_argv(tmp, other, *OVERRIDES, "experiment=stale-other")) == 0


def test_a_second_process_on_the_run_folder_refuses(trained, capsys):
    tmp, root, cfg = trained
    with locked_elsewhere(cfg.run_dir, "train") as pid:
        assert folds.main(stage_argv(tmp, root, *OVERRIDES)) == 1
    err = capsys.readouterr().err
    assert f"{cfg.run_dir} is in use by another pipeline process (pid {pid}, train since" in err
    assert folds.main(stage_argv(tmp, root, *OVERRIDES)) == 0  # released (a killed holder's lock goes with it)
    with rundir.run_lock(cfg.run_dir, "full"):  # the same process again: full holds it while its stages run
        assert folds.main(stage_argv(tmp, root, *OVERRIDES)) == 0
