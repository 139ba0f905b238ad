"""Ensembling: soft and hard votes, combining experiments' run folders, refusing mismatches."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pytest

from pipeline import ensemble
from pipeline.evaluation import calibration

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


# --------------------------------------------------------------------------- weights fitted on the OOF


def synthetic_oof(n: int = 600, c: int = 4, seed: int = 0, n_folds: int = 5):
    """Labels, folds and three members: two informative ones (right about 70% of the time, their mistakes
    independent, so averaging them helps) and a useless one (random probabilities)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    folds = np.arange(n) % n_folds

    def member(acc):
        noisy = np.where(rng.random(n) < acc, labels, rng.integers(0, c, n))
        logits = 2.0 * np.eye(c)[noisy] + rng.normal(0, 1.0, (n, c))
        p = np.exp(logits)
        return p / p.sum(1, keepdims=True)

    useless = rng.random((n, c)) + 0.05
    return labels, folds, [member(0.7), member(0.7), useless / useless.sum(1, keepdims=True)]


def ens_cfg(**values):
    from pipeline.core.config import EnsembleConfig

    return EnsembleConfig(**values)


@pytest.mark.parametrize("metric", ["log_loss", "accuracy"])
def test_hill_climb_gives_a_useless_member_weight_zero(metric):
    labels, folds, probs = synthetic_oof()
    fitted = ensemble.HillClimb(ens_cfg(method="hill_climb", metric=metric), 3).fit(probs, labels, folds)
    weights = fitted.member_weights()
    assert weights[2] == 0.0 and weights[0] > 0 and weights[1] > 0
    combined = fitted.predict(probs)
    # better than either informative member alone, on the metric it climbed
    from pipeline.evaluation.metrics import metric_loss
    assert metric_loss(metric, labels, combined) < min(metric_loss(metric, labels, p) for p in probs[:2])


@pytest.mark.parametrize("method", ["hill_climb", "stack"])
def test_a_duplicated_member_changes_nothing(method):
    labels, folds, probs = synthetic_oof(seed=1)
    cfg = ens_cfg(method=method)
    once = ensemble.ENSEMBLERS.build(method, cfg, 3).fit(probs, labels, folds)
    twice = ensemble.ENSEMBLERS.build(method, cfg, 4).fit(probs + [probs[0].copy()], labels, folds)
    np.testing.assert_allclose(twice.predict(probs + [probs[0]]), once.predict(probs), atol=1e-9)
    assert twice.member_weights()[3] == 0.0
    nested_once = ensemble.nested_oof(cfg, probs, labels, folds)
    np.testing.assert_allclose(ensemble.nested_oof(cfg, probs + [probs[0]], labels, folds), nested_once, atol=1e-9)


def test_stack_learns_to_ignore_a_useless_member_and_fixes_calibration():
    labels, folds, probs = synthetic_oof(seed=2)
    fitted = ensemble.Stack(ens_cfg(method="stack"), 3).fit(probs, labels, folds)
    weights = fitted.member_weights()
    assert weights[2] < 0.5 * min(weights[:2])  # its coefficients are noise-sized
    combined = fitted.predict(probs)
    np.testing.assert_allclose(combined.sum(1), 1.0, rtol=1e-6)
    average = ensemble.soft_vote(probs[:2], np.ones(2))
    from pipeline.evaluation.metrics import metric_loss
    assert metric_loss("log_loss", labels, combined) < metric_loss("log_loss", labels, average)


@pytest.mark.parametrize("method", ["hill_climb", "stack"])
def test_nested_score_is_not_above_the_in_sample_one(method):
    """Weights fitted on the rows they score flatter the ensemble; fitted on the other folds they cannot."""
    from pipeline.evaluation.metrics import metric_loss

    cfg = ens_cfg(method=method)
    differs = []
    for seed in range(4):
        labels, folds, probs = synthetic_oof(n=300, seed=10 + seed)
        in_sample = ensemble.ENSEMBLERS.build(method, cfg, 3).fit(probs, labels, folds).predict(probs)
        nested = ensemble.nested_oof(cfg, probs, labels, folds)
        assert metric_loss("log_loss", labels, nested) >= metric_loss("log_loss", labels, in_sample) - 1e-9
        differs.append(not np.allclose(nested, in_sample))
    assert any(differs)  # the folds really are scored by weights fitted without them


def oof_table(labels: np.ndarray, folds: np.ndarray, probs: np.ndarray, classes=CLASSES) -> pd.DataFrame:
    ids = [f"{i:04d}" for i in range(len(labels))]
    return pd.DataFrame({"id": ids, "label": np.asarray(classes)[labels], "fold": folds,
                         **dict(zip(classes, probs.T))})


@pytest.mark.parametrize("method", ["hill_climb", "stack"])
def test_run_fits_on_the_oof_and_reports_honest_scores(tmp_path, method):
    labels, folds, probs = synthetic_oof(n=300, c=3, seed=3)
    cfg = make_cfg(tmp_path, None, "experiment=exp_a", "ensemble.members=[exp_b, exp_c]", f"ensemble.method={method}")
    for name, p in zip(("exp_a", "exp_b", "exp_c"), probs):
        fake_run(Path(cfg.runs_dir) / name, [random_probs(len(name)), random_probs(7)], oof=oof_table(labels, folds, p))
    ensemble.run(cfg)
    report = json.loads((cfg.run_dir / "ensemble.json").read_text())
    assert report["oof_scoring"] == "nested over folds" and report["best_member"] in ("exp_a", "exp_b")
    assert report["oof"]["log_loss"] >= report["oof_in_sample"]["log_loss"] - 1e-9
    assert report["oof"]["accuracy"] > max(report["oof_members"][m]["accuracy"] for m in ("exp_a", "exp_c"))
    assert set(report["member_weights"]) == {"exp_a", "exp_b", "exp_c"}
    assert sum(report["member_weights"].values()) == pytest.approx(1.0)
    honest = pd.read_csv(cfg.run_dir / "ensemble_oof.csv", dtype={"id": str})
    assert list(honest.columns) == ["id", "label", "fold"] + CLASSES and len(honest) == 300
    from pipeline.evaluation.metrics import score
    assert score(labels, honest[CLASSES].to_numpy())["accuracy"] == pytest.approx(report["oof"]["accuracy"])


def test_fitted_methods_refuse_other_folds_missing_oof_and_fixed_weights(tmp_path):
    labels, folds, probs = synthetic_oof(n=60, c=3, seed=4)
    cfg = make_cfg(tmp_path, None, "experiment=exp_a", "ensemble.members=[exp_b]", "ensemble.method=hill_climb")
    fake_run(cfg.run_dir, [random_probs(0)], oof=oof_table(labels, folds, probs[0]))
    fake_run(Path(cfg.runs_dir) / "exp_b", [random_probs(1)], oof=oof_table(labels, (folds + 1) % 5, probs[1]))
    with pytest.raises(ValueError, match="other folds"):
        ensemble.run(cfg)
    (Path(cfg.runs_dir) / "exp_b" / "oof.csv").unlink()
    with pytest.raises(FileNotFoundError, match="oof"):
        ensemble.run(cfg)
    with pytest.raises(ValueError, match="fits its own weights"):
        ensemble.run(make_cfg(tmp_path, None, "experiment=exp_a", "ensemble.method=stack", "ensemble.weights=[1]"))


def test_tempered_members_let_an_accurate_but_under_confident_one_count():
    labels, folds, (sure, other, _) = synthetic_oof(seed=3)
    timid = calibration.with_temperature(sure, 8.0)  # the same ranking, far too little confidence (label smoothing)
    plain = ensemble.HillClimb(ens_cfg(method="hill_climb"), 2).fit([timid, other], labels, folds)
    tempered = ensemble.HillClimb(ens_cfg(method="hill_climb", temper_members=True), 2).fit([timid, other], labels,
                                                                                          folds)
    assert plain.member_weights()[0] == 0.0  # passed over for its log loss
    assert tempered.member_weights()[0] > 0 and tempered.temperatures[0] < 0.5 < tempered.temperatures[1] * 2
    both = [timid, other]
    assert (tempered.predict(both).argmax(1) == labels).mean() > (plain.predict(both).argmax(1) == labels).mean()
    folded = tempered.predict_folds([[timid], [other]], [np.ones(1), np.ones(1)])
    np.testing.assert_allclose(folded, tempered.predict(both))  # the test set combined as the OOF was
