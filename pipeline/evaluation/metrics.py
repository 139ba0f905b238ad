"""Scores of class probabilities against integer labels (what the CV report and the demo print)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score, log_loss

from pipeline.core.config import Config


def _clipped(probs: np.ndarray) -> np.ndarray:
    clipped = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1.0)
    return clipped / clipped.sum(1, keepdims=True)  # scikit-learn no longer renormalises (it warns)


def metric_loss(name: str, labels: np.ndarray, probs: np.ndarray) -> float:
    """Lower is better: ``log_loss``, or ``accuracy`` as the error rate (what a search or a fit minimises)."""
    if name == "accuracy":
        return 1.0 - float(accuracy_score(labels, np.asarray(probs).argmax(1)))
    if name == "log_loss":
        return float(log_loss(labels, _clipped(probs), labels=np.arange(np.asarray(probs).shape[1])))
    raise KeyError(f"unknown metric '{name}'; valid names: accuracy, log_loss")


def score(labels: np.ndarray, probs: np.ndarray) -> dict:
    """Accuracy, macro-F1 and log loss (probabilities clipped to [1e-7, 1] and renormalised)."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "log_loss": float("nan"), "n": 0}
    preds = probs.argmax(1)
    classes = np.arange(probs.shape[1])
    clipped = _clipped(probs)
    return {"accuracy": float(accuracy_score(labels, preds)),
            "macro_f1": float(f1_score(labels, preds, average="macro", labels=np.unique(labels))),
            "log_loss": float(log_loss(labels, clipped, labels=classes)),
            "n": int(len(labels))}


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> tuple[np.ndarray, ...]:
    """Per equal-width bin of the confidence (the top probability): row count, accuracy and mean confidence,
    and the expected calibration error (ECE: the count-weighted mean gap between the two)."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    acc = np.bincount(which, weights=np.asarray(correct, dtype=float), minlength=bins) / np.maximum(count, 1)
    conf = np.bincount(which, weights=confidence, minlength=bins) / np.maximum(count, 1)
    ece = float((count * np.abs(acc - conf)).sum() / max(count.sum(), 1))
    return count, acc, conf, ece


def calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """The ECE of class probabilities against integer labels (10 bins of the top probability)."""
    return reliability(probs.max(1), probs.argmax(1) == np.asarray(labels), bins)[3]


def cv_report(cfg: Config, index: pd.DataFrame, folds: pd.DataFrame, probs: np.ndarray) -> dict:
    """Accuracy, macro-F1 and log loss per fold and over all scored rows."""
    labels, fold_of = index["label_idx"].to_numpy(), folds["fold"].to_numpy()
    done = ~np.isnan(probs).any(axis=1)
    per_fold = {int(f): score(labels[(fold_of == f) & done], probs[(fold_of == f) & done])
                for f in sorted(set(fold_of[done]))}
    return {"experiment": cfg.experiment, "model": cfg.model.name, "folds": per_fold,
            "oof": score(labels[done], probs[done]) if done.any() else {}, "scored_rows": int(done.sum()),
            "total_rows": len(labels)}
