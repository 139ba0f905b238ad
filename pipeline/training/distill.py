"""Knowledge distillation from a teacher's out-of-fold predictions (``train.teacher``).

The student trains on ``distill_alpha`` × the teacher's probabilities (softened by ``distill_temperature``)
plus ``1 - distill_alpha`` × the one-hot label. The teacher's probabilities are its **out-of-fold** ones: the
probability for an image comes from the teacher's fold model that held that image out, so no image is labelled
by a model that saw it. The teacher must have been cross-validated on the student's folds (same ids, same
fold per id), which is checked, so student and teacher CV scores are comparable.

A second-order effect remains and is accepted (as in the usual Kaggle practice): the teacher's fold-j model
that labels a training image of the student's fold k was itself trained on fold k, so the student's fold-k
score can be a little optimistic. Use a teacher trained on a disjoint split if that matters.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd

from pipeline.core.config import Config
from pipeline.data.contract import AS_WRITTEN
from pipeline.provenance import teacher_table


def teacher_probs(cfg: Config, index: pd.DataFrame, folds: pd.DataFrame, classes: list[str]) -> Optional[np.ndarray]:
    """The teacher's OOF probabilities aligned with the student's train index, checked to be out-of-fold on
    the student's own folds (every id present, same fold per id, no missing probability)."""
    path = teacher_table(cfg)
    if path is None:
        return None
    table = pd.read_csv(path, dtype={"id": str, "label": str}, **AS_WRITTEN)
    missing = [c for c in ["id", "fold", *classes] if c not in table.columns]
    if missing:
        raise ValueError(f"teacher OOF {path} lacks column(s) {missing} (the student's classes are {classes})")
    table = table.set_index("id")
    absent = index["id"][~index["id"].isin(table.index)]
    if len(absent):
        raise ValueError(f"teacher OOF {path} has no prediction for {len(absent)} train id(s), e.g. {list(absent[:3])}")
    student_fold = folds["fold"].to_numpy()
    teacher_fold = table.loc[index["id"], "fold"].to_numpy()
    if not np.array_equal(teacher_fold, student_fold):
        bad = int((teacher_fold != student_fold).sum())
        raise ValueError(f"teacher OOF {path} was made on other folds ({bad} id(s) in another fold): a teacher must "
                         "share the student's folds (same data, folds.* settings)")
    probs = table.loc[index["id"], classes].to_numpy(dtype=np.float64)
    if np.isnan(probs).any():
        raise ValueError(f"teacher OOF {path} has rows without probabilities: train every fold of the teacher")
    return probs


def distill_targets(labels: np.ndarray, teacher: np.ndarray, alpha: float, temperature: float) -> np.ndarray:
    """``alpha`` × teacher probabilities at ``temperature`` (p^(1/T), renormalised: softmax(logits / T))
    + ``1 - alpha`` × one-hot labels; float32 rows that sum to 1."""
    soft = np.exp(np.log(np.clip(teacher, 1e-12, 1.0)) / temperature)
    soft /= soft.sum(1, keepdims=True)
    hard = np.eye(teacher.shape[1])[labels]
    return (alpha * soft + (1.0 - alpha) * hard).astype(np.float32)
