"""Ensembling: soft and hard votes, combining experiments' run folders, refusing mismatches."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pytest

from pipeline import ensemble

from conftest import make_cfg, stage_argv

CLASSES = ["cat", "dog", "fox"]
IDS = ["0007", "0003", "0010", "0001"]


def fake_run(run_dir: Path, fold_probs: list[np.ndarray], ids=IDS, classes=CLASSES,
             oof: Optional[pd.DataFrame] = None) -> Path:
    """A run folder as preprocess + infer leave it: manifest, test index, fold*/test.npy (+ oof.csv)."""
    run_dir.mkdir(parents=True)
    manifest = {"root": str(run_dir), "layout": "csv", "classes": classes, "submission_columns": ["id", "label"],
                "id_col": "id", "label_col": "label", "test": {"index": "test_index.csv", "n": len(ids)}}
    (run_dir / "preprocess.json").write_text(json.dumps(manifest))
    pd.DataFrame({"id": ids}).to_csv(run_dir / "test_index.csv", index=False)
    for k, probs in enumerate(fold_probs):
        (run_dir / f"fold{k}").mkdir()
        np.save(run_dir / f"fold{k}" / "test.npy", probs.astype(np.float32))
    if oof is not None:
        oof.to_csv(run_dir / "oof.csv", index=False)
    return run_dir


def random_probs(seed: int, n: int = len(IDS), c: int = len(CLASSES)) -> np.ndarray:
    p = np.random.default_rng(seed).random((n, c)) + 0.01
    return p / p.sum(1, keepdims=True)


def test_soft_vote_is_a_weighted_mean():
    a, b = random_probs(0), random_probs(1)
    out = ensemble.soft_vote([a, b], np.array([1.0, 3.0]))
    np.testing.assert_allclose(out, 0.25 * a + 0.75 * b, rtol=1e-6)
    np.testing.assert_allclose(out.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(ensemble.soft_vote([a, b], np.array([2.0, 2.0])), (a + b) / 2, rtol=1e-6)


def test_hard_vote_gives_vote_shares():
    a = np.array([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
    b = np.array([[0.2, 0.7, 0.1], [0.3, 0.3, 0.4]])
    c = np.array([[0.5, 0.4, 0.1], [0.8, 0.1, 0.1]])
    out = ensemble.hard_vote([a, b, c], np.array([1.0, 1.0, 2.0]))
    np.testing.assert_allclose(out, [[0.75, 0.25, 0.0], [0.5, 0.0, 0.5]])
    # a confident minority cannot outvote the majority, unlike a soft vote
    sure = np.array([[0.0, 1.0, 0.0]])
    unsure = np.array([[0.4, 0.35, 0.25]])
    assert ensemble.hard_vote([sure, unsure, unsure], np.ones(3)).argmax(1)[0] == 0
    assert ensemble.soft_vote([sure, unsure, unsure], np.ones(3)).argmax(1)[0] == 1


def test_run_combines_two_experiments(tmp_path):
    a_folds = [random_probs(0), random_probs(1)]
    b_folds = [random_probs(2), random_probs(3), random_probs(4)]
    cfg = make_cfg(tmp_path, None, "experiment=exp_a", "ensemble.members=[exp_b]", "ensemble.weights=[1, 3]")
    fake_run(cfg.run_dir, a_folds)
    # exp_b lists the same test ids in another order: they are aligned by id
    order = [2, 0, 3, 1]
    fake_run(Path(cfg.runs_dir) / "exp_b", [p[order] for p in b_folds], ids=[IDS[i] for i in order])
    frame = ensemble.run(cfg)
    expected = 0.25 * np.mean(a_folds, axis=0) + 0.75 * np.mean(b_folds, axis=0)
    assert list(frame.columns) == ["id"] + CLASSES
    assert list(frame["id"]) == IDS
    np.testing.assert_allclose(frame[CLASSES].to_numpy(), expected, rtol=1e-5)
    written = pd.read_csv(cfg.run_dir / "ensemble.csv", dtype={"id": str})
    assert list(written["id"]) == IDS  # zero-padded ids survive the CSV
    np.testing.assert_allclose(written[CLASSES].to_numpy(), expected, rtol=1e-5)
    report = json.loads((cfg.run_dir / "ensemble.json").read_text())
    assert report["models"] == 5 and report["method"] == "soft" and report["oof"] is None
    assert report["members"][1].endswith("exp_b")


def test_run_with_member_given_as_a_path_and_hard_vote(tmp_path):
    a_folds = [random_probs(5)]
    other = fake_run(tmp_path / "elsewhere" / "exp_c", [random_probs(6), random_probs(7)])
    cfg = make_cfg(tmp_path, None, "experiment=exp_a", f"ensemble.members=[{other}]", "ensemble.method=hard")
    fake_run(cfg.run_dir, a_folds)
    assert ensemble.main(stage_argv(tmp_path, None, "experiment=exp_a", f"ensemble.members=[{other}]",
                                    "ensemble.method=hard")) == 0
    written = pd.read_csv(cfg.run_dir / "ensemble.csv", dtype={"id": str})
    # this run's single fold weighs as much as the two folds of exp_c together
    expected = ensemble.hard_vote([a_folds[0], random_probs(6), random_probs(7)], np.array([1.0, 0.5, 0.5]))
    np.testing.assert_allclose(written[CLASSES].to_numpy(), expected, rtol=1e-5)


def test_oof_score_is_reported_when_every_member_has_oof(tmp_path):
    ids = ["0001", "0002", "0003", "0004"]
    labels = ["cat", "dog", "fox", "cat"]

    def oof(probs):
        return pd.DataFrame({"id": ids, "label": labels, "fold": [0, 1, 0, 1], **dict(zip(CLASSES, probs.T))})

    good = np.eye(3)[[0, 1, 2, 0]] * 0.9 + 0.1 / 3
    bad = np.eye(3)[[1, 1, 1, 1]] * 0.9 + 0.1 / 3
    cfg = make_cfg(tmp_path, None, "experiment=exp_a", "ensemble.members=[exp_b]", "ensemble.weights=[3, 1]")
    fake_run(cfg.run_dir, [random_probs(0)], oof=oof(good))
    fake_run(Path(cfg.runs_dir) / "exp_b", [random_probs(1)], oof=oof(bad))
    ensemble.run(cfg)
    report = json.loads((cfg.run_dir / "ensemble.json").read_text())
    assert report["oof"]["accuracy"] == pytest.approx(1.0)  # exp_a outweighs exp_b
    assert report["oof"]["n"] == 4


def test_members_with_other_classes_are_refused(tmp_path):
    cfg = make_cfg(tmp_path, None, "experiment=exp_a", "ensemble.members=[exp_b]")
    fake_run(cfg.run_dir, [random_probs(0)])
    fake_run(Path(cfg.runs_dir) / "exp_b", [random_probs(1)], classes=["cat", "dog", "wolf"])
    with pytest.raises(ValueError, match="classes"):
        ensemble.run(cfg)
    assert not (cfg.run_dir / "ensemble.csv").exists()
    assert ensemble.main(stage_argv(tmp_path, None, "experiment=exp_a", "ensemble.members=[exp_b]")) == 1


def test_members_with_other_test_ids_are_refused(tmp_path):
    cfg = make_cfg(tmp_path, None, "experiment=exp_a", "ensemble.members=[exp_b]")
    fake_run(cfg.run_dir, [random_probs(0)])
    fake_run(Path(cfg.runs_dir) / "exp_b", [random_probs(1)], ids=["0007", "0003", "0010", "0002"])
    with pytest.raises(ValueError, match="test ids"):
        ensemble.run(cfg)


def test_weights_length_must_match_experiments(tmp_path):
    cfg = make_cfg(tmp_path, None, "experiment=exp_a", "ensemble.members=[exp_b]", "ensemble.weights=[1, 2, 3]")
    fake_run(cfg.run_dir, [random_probs(0)])
    fake_run(Path(cfg.runs_dir) / "exp_b", [random_probs(1)])
    with pytest.raises(ValueError, match="3 values for 2 experiments"):
        ensemble.run(cfg)


def test_missing_member_and_unknown_method(tmp_path):
    cfg = make_cfg(tmp_path, None, "experiment=exp_a", "ensemble.members=[nope]")
    fake_run(cfg.run_dir, [random_probs(0)])
    with pytest.raises(FileNotFoundError, match="nope"):
        ensemble.run(cfg)
    with pytest.raises(KeyError, match="soft"):
        ensemble.run(make_cfg(tmp_path, None, "experiment=exp_a", "ensemble.method=median"))


def test_member_without_predictions_is_refused(tmp_path):
    cfg = make_cfg(tmp_path, None, "experiment=exp_a", "ensemble.members=[exp_b]")
    fake_run(cfg.run_dir, [random_probs(0)])
    fake_run(Path(cfg.runs_dir) / "exp_b", [])
    with pytest.raises(FileNotFoundError, match="infer"):
        ensemble.run(cfg)
