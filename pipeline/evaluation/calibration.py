"""Temperature scaling (Guo et al., 2017): one scalar T fitted on the out-of-fold log loss, p ∝ p^(1/T).

Label smoothing, mixup and the average of fold models leave probabilities under-confident (small CIFAR-10's
Lite0 fine-tune: ECE 0.098), and log-loss competitions score the probabilities themselves. One scalar cannot
change which class is on top, so accuracy is untouched. The honest OOF score applies to each fold a T fitted on
the other folds; the test probabilities get the T fitted on every fold.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import softmax

from pipeline.evaluation.metrics import calibration_error, metric_loss, score


def with_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities re-tempered: softmax(log p / T). T > 1 softens, T < 1 sharpens, T = 1 changes nothing."""
    return softmax(np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)) / temperature, axis=1)


def fit_temperature(probs: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The T in ``bounds`` that minimises the log loss of ``with_temperature(probs, T)`` (searched on log T)."""
    result = minimize_scalar(lambda log_t: metric_loss("log_loss", labels, with_temperature(probs, np.exp(log_t))),
                             bounds=np.log(bounds), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


def nested_temperature(probs: np.ndarray, labels: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Each fold's rows re-tempered with the T fitted on the other folds (an honest OOF score)."""
    out = np.empty(probs.shape, dtype=np.float64)
    for fold in np.unique(folds):
        held = folds == fold
        t = fit_temperature(probs[~held], labels[~held]) if (~held).any() else 1.0
        out[held] = with_temperature(probs[held], t)
    return out


def temperature_report(probs: np.ndarray, labels: np.ndarray, folds: np.ndarray) -> tuple[float, np.ndarray, dict]:
    """Fit T on the OOF ``probs``; returns T, the nested re-tempered OOF and a before/after summary."""
    t = fit_temperature(probs, labels)
    nested = nested_temperature(probs, labels, folds)
    summary = {"method": "temperature", "temperature": t, "scoring": "each fold with T fitted on the other folds",
               "oof_log_loss": [score(labels, probs)["log_loss"], score(labels, nested)["log_loss"]],
               "oof_ece": [calibration_error(labels, probs), calibration_error(labels, nested)]}
    return t, nested, summary
