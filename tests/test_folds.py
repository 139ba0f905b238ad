"""Folds: stratified proportions, groups kept together, folds.csv reused or rebuilt."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from pipeline import folds, preprocess

from conftest import make_cfg, make_competition, stage_argv


def test_stratified_kfold_keeps_class_proportions():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    index = pd.DataFrame({"id": [f"{i:03d}" for i in range(100)], "label": labels})
    fold = folds.assign_folds(index, n_splits=5, seed=0)
    assert sorted(fold.unique()) == [0, 1, 2, 3, 4]
    table = pd.crosstab(fold, index["label"])
    assert (table["a"] == 10).all() and (table["b"] == 6).all() and (table["c"] == 4).all()
    # a different seed shuffles differently but keeps the proportions
    other = folds.assign_folds(index, n_splits=5, seed=1)
    assert not other.equals(fold)
    assert (pd.crosstab(other, index["label"])["a"] == 10).all()


def test_stratified_group_kfold_keeps_each_group_in_one_fold():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(30), 4)  # 30 patients with 4 images each
    labels = np.array(["x", "y", "z"])[groups % 3]
    index = pd.DataFrame({"id": [f"{i:04d}" for i in range(len(groups))], "label": labels,
                          "group": [f"g{g}" for g in groups]}).sample(frac=1, random_state=0)
    index = index.reset_index(drop=True)
    fold = folds.assign_folds(index, n_splits=3, seed=int(rng.integers(100)), group_col="group")
    per_group = pd.Series(fold.to_numpy()).groupby(index["group"].to_numpy()).nunique()
    assert (per_group == 1).all()
    assert set(fold) == {0, 1, 2}
    # a plain stratified split of the same table would split groups apart
    plain = folds.assign_folds(index, n_splits=3, seed=0)
    assert (pd.Series(plain.to_numpy()).groupby(index["group"].to_numpy()).nunique() > 1).any()


def test_folds_stage_with_group_column(tmp_path):
    root = make_competition(tmp_path / "comp", groups=True)
    cfg = make_cfg(tmp_path, root, "data.group_col=patient")
    preprocess.run(cfg)
    frame = folds.run(cfg)
    assert list(frame.columns) == ["id", "label", "group", "fold"]
    assert (frame.groupby("group")["fold"].nunique() == 1).all()
    assert frame["group"].nunique() == 18
    assert set(frame["fold"]) == {0, 1, 2}


def test_folds_stage_writes_stratified_folds(tmp_path, competition):
    cfg = make_cfg(tmp_path, competition)
    preprocess.run(cfg)
    assert folds.main(stage_argv(tmp_path, competition)) == 0
    frame = pd.read_csv(cfg.run_dir / "folds.csv", dtype={"id": str})
    assert list(frame.columns) == ["id", "label", "fold"]
    assert "0012" in set(frame["id"])
    assert (pd.crosstab(frame["fold"], frame["label"]) == 4).all().all()  # 12 per class over 3 folds
    train_index = pd.read_csv(cfg.run_dir / "train_index.csv", dtype={"id": str})
    assert list(frame["id"]) == list(train_index["id"])  # aligned row by row with the cache


def test_folds_csv_is_reused_when_unchanged_and_rebuilt_when_n_splits_changes(tmp_path, competition):
    cfg = make_cfg(tmp_path, competition)
    preprocess.run(cfg)
    first = folds.run(cfg)
    path = cfg.run_dir / "folds.csv"
    stat, text = os.stat(path), path.read_text()

    again = folds.run(make_cfg(tmp_path, competition))
    assert os.stat(path).st_mtime_ns == stat.st_mtime_ns and os.stat(path).st_ino == stat.st_ino
    assert path.read_text() == text
    pd.testing.assert_frame_equal(again, first)

    cfg4 = make_cfg(tmp_path, competition, "folds.n_splits=4")
    preprocess.run(cfg4)
    rebuilt = folds.run(cfg4)
    assert set(rebuilt["fold"]) == {0, 1, 2, 3}
    assert path.read_text() != text
    assert set(pd.read_csv(path)["fold"]) == {0, 1, 2, 3}

    reseeded = folds.run(make_cfg(tmp_path, competition, "folds.n_splits=4", "folds.seed=7"))
    assert not reseeded["fold"].equals(rebuilt["fold"])


def test_folds_need_preprocess_first(tmp_path, competition):
    with pytest.raises(FileNotFoundError, match="preprocess"):
        folds.run(make_cfg(tmp_path, competition))
