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


def test_merge_groups_joins_groups_linked_by_a_shared_member():
    patient = pd.Series(["p1", "p1", "p2", "p3", "p4"])
    duplicate = pd.Series(["id:a", "id:b", "dup:7", "dup:7", "id:e"])  # rows 2 and 3 are copies
    merged = folds.merge_groups(patient, duplicate)
    assert merged[0] == merged[1]  # same patient
    assert merged[2] == merged[3]  # duplicates across two patients: one group
    assert len({merged[0], merged[2], merged[4]}) == 3


def test_folds_keep_eda_duplicates_together(tmp_path):
    """A planted copy of a train image lands in the same fold as its original once EDA has found it."""
    import shutil

    from pipeline.eda import stage as eda

    root = make_competition(tmp_path / "comp", n_per_class=12)
    train = pd.read_csv(root / "train.csv", dtype=str)
    copies = train.groupby("label").head(1)  # one copy per class, same label, new ids
    for k, (image_id, label) in enumerate(zip(copies["id"], copies["label"])):
        shutil.copy(root / "train" / f"{image_id}.png", root / "train" / f"copy{k}.png")
        train.loc[len(train)] = {"id": f"copy{k}", "label": label}
    train.to_csv(root / "train.csv", index=False)
    overrides = ("folds.n_splits=4", "folds.group_duplicates=true")
    assert eda.main(stage_argv(tmp_path, root, *overrides)) == 0
    assert preprocess.main(stage_argv(tmp_path, root, *overrides)) == 0
    frame = folds.run(make_cfg(tmp_path, root, *overrides))
    fold = frame.set_index("id")["fold"]
    for k, image_id in enumerate(copies["id"]):
        assert fold[f"copy{k}"] == fold[image_id]
    assert frame["cv_group"].nunique() <= len(frame) - len(copies)  # at least the planted copies merged


def test_group_duplicates_without_eda_says_what_to_run(tmp_path):
    root = make_competition(tmp_path / "comp", n_per_class=6)
    cfg = make_cfg(tmp_path, root, "folds.group_duplicates=true")
    preprocess.run(cfg)
    with pytest.raises(FileNotFoundError, match="run the eda stage first"):
        folds.run(cfg)
