"""Temperature scaling: recovers a known temperature, keeps every prediction's class, and the ensemble stage
re-tempers the test probabilities and reports an honest (nested) OOF score."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax

from pipeline import ensemble
from pipeline.evaluation.calibration import fit_temperature, nested_temperature, with_temperature
from pipeline.evaluation.metrics import calibration_error, metric_loss

from conftest import make_cfg
from test_ensemble import CLASSES, fake_run, oof_table, random_probs


def sampled(n: int = 4000, c: int = 5, seed: int = 0):
    """Labels drawn from softmax(logits): those probabilities are calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, (n, c))
    probs = softmax(logits, axis=1)
    labels = np.array([rng.choice(c, p=p) for p in probs])
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fit_recovers_the_temperature_that_spoiled_calibrated_probabilities(true_t):
    logits, labels = sampled()
    spoiled = with_temperature(softmax(logits, axis=1), 1.0 / true_t)
    t = fit_temperature(spoiled, labels)
    assert t == pytest.approx(true_t, rel=0.1)  # undoes the spoiling: (log p × true_t) / t = log p
    fixed = with_temperature(spoiled, t)
    assert metric_loss("log_loss", labels, fixed) < metric_loss("log_loss", labels, spoiled)
    assert calibration_error(labels, fixed) < calibration_error(labels, spoiled)
    np.testing.assert_array_equal(fixed.argmax(1), spoiled.argmax(1))


def test_temperature_one_changes_nothing_and_rows_sum_to_one():
    p = random_probs(3, n=50, c=4)
    np.testing.assert_allclose(with_temperature(p, 1.0), p, atol=1e-12)
    np.testing.assert_allclose(with_temperature(p, 3.0).sum(1), 1.0)


def test_nested_fits_each_fold_without_its_rows():
    logits, labels = sampled(n=1000, seed=1)
    spoiled = with_temperature(softmax(logits, axis=1), 0.4)
    folds = np.arange(1000) % 5
    nested = nested_temperature(spoiled, labels, folds)
    held = folds == 0
    t0 = fit_temperature(spoiled[~held], labels[~held])
    np.testing.assert_allclose(nested[held], with_temperature(spoiled[held], t0))
    assert not np.allclose(nested[held], with_temperature(spoiled[held], fit_temperature(spoiled, labels)))


def test_ensemble_stage_calibrates_the_test_probabilities_and_scores_honestly(tmp_path):
    logits, labels = sampled(n=300, c=3, seed=2)
    under = with_temperature(softmax(logits, axis=1), 4.0)  # under-confident
    folds = np.arange(300) % 5
    test = [random_probs(1), random_probs(2)]
    plain = make_cfg(tmp_path, None, "experiment=plain")
    fake_run(plain.run_dir, test, oof=oof_table(labels, folds, under))
    ensemble.run(plain)
    cfg = make_cfg(tmp_path, None, "experiment=cal", "ensemble.calibrate=temperature")
    fake_run(cfg.run_dir, test, oof=oof_table(labels, folds, under))
    ensemble.run(cfg)
    report = json.loads((cfg.run_dir / "ensemble.json").read_text())
    t = report["calibration"]["temperature"]
    assert t < 0.5  # sharpened back
    assert report["oof"]["log_loss"] < report["oof_uncalibrated"]["log_loss"]
    assert report["oof"]["accuracy"] == report["oof_uncalibrated"]["accuracy"]
    before = pd.read_csv(plain.run_dir / "ensemble.csv", dtype={"id": str})[CLASSES].to_numpy()
    after = pd.read_csv(cfg.run_dir / "ensemble.csv", dtype={"id": str})[CLASSES].to_numpy()
    np.testing.assert_allclose(after, with_temperature(before, t), atol=1e-6)
    nested = pd.read_csv(cfg.run_dir / "ensemble_oof.csv", dtype={"id": str})[CLASSES].to_numpy()
    np.testing.assert_allclose(nested, nested_temperature(under, labels, folds), atol=1e-6)


def test_calibration_without_oof_is_refused(tmp_path):
    cfg = make_cfg(tmp_path, None, "experiment=cal", "ensemble.calibrate=temperature")
    fake_run(Path(cfg.run_dir), [random_probs(1)])
    with pytest.raises(FileNotFoundError, match="ensemble.calibrate=temperature"):
        ensemble.run(cfg)
    assert not (cfg.run_dir / "ensemble.csv").exists()
