"""The CV / ensemble scores."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from pipeline.evaluation.metrics import score


def test_score_values():
    labels = np.array([0, 1, 2, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2], [0.1, 0.8, 0.1]])
    out = score(labels, probs)
    assert out["accuracy"] == pytest.approx(0.75) and out["n"] == 4
    expected = -np.mean(np.log([0.8, 0.7, 0.2, 0.8]))
    assert out["log_loss"] == pytest.approx(expected, rel=1e-6)
    # macro F1 over the classes present: class 0 (p=0.5, r=1), 1 (1, 1), 2 (0, 0)
    assert out["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_probabilities_read_back_from_csv_are_renormalised_without_warnings():
    """OOF tables round-trip through CSV as rounded floats; hard votes contain exact zeros."""
    labels = np.array([0, 1])
    probs = np.array([[0.3333333, 0.3333333, 0.3333333], [0.0, 1.0, 0.0]])  # sums 0.9999999 and zeros
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = score(labels, probs)
    assert out["log_loss"] == pytest.approx((math.log(3) + 0.0) / 2, abs=1e-6)


def test_empty_labels_give_nan():
    out = score(np.array([], dtype=int), np.zeros((0, 3)))
    assert out["n"] == 0 and math.isnan(out["accuracy"])
