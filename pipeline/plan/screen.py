"""A member's first fold as evidence. Before a budgeted plan trains a member's other folds it trains its fold 0
alone (:func:`screen_config`: the fold is kept, so a member that goes on does not train it again) and asks what
that fold says about this data:

* **Does the member add to the ensemble?** The fold-0 held-out probabilities of the members already finished and
  of the candidate are combined by hill climbing on ``ensemble.metric``, as the ensemble stage combines them
  (members are not re-tempered here: a temperature fitted on half of one fold of an accurate member sees a handful
  of errors and sharpens it to its bound),
  and scored honestly: the weights are fitted on one half of fold 0's rows and scored on the other, both ways
  (:func:`fold_gain`). Where the candidate does not lower the metric, its other folds would not change the
  submission: the plan stops it there (:func:`judge`) and goes on to the next member. Stopped members complete
  only with time no other member can use, the largest fold-0 gain first (:func:`late_step`): a gain too small to
  measure on one fold may still show on five.
* **Do its other folds fit the time left?** Each takes as long as fold 0 took to fit, and the infer stage its
  estimate scaled by how fold 0 ran against its own (:func:`rest_seconds`): the member timed by its own first fold,
  not by a benchmark of random tensors.

A screen costs a member's first fold: a fifth of a model trained from scratch or of a fine-tune's epochs, most of a
frozen-feature member (embedding the training images is its cost, and fold 0 needs them all).
"""
from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from sklearn.model_selection import KFold, StratifiedKFold

from pipeline.core.config import Config, EnsembleConfig, with_values
from pipeline.core.timing import minutes
from pipeline.core.utils import read_json
from pipeline.data.contract import AS_WRITTEN
from pipeline.ensemble import nested_oof
from pipeline.evaluation.metrics import metric_loss, score
from pipeline.plan import planner
from pipeline.rundir import RunDir
from pipeline.training.mode import FOLD_OVERHEAD_S

log = logging.getLogger(__name__)

SCREEN_FOLD = 0
MIN_ROWS = 100  # fewer held-out rows in fold 0 say too little to stop a member: it goes on


def screen_config(cfg: Config) -> Config:
    """``cfg`` training only the screened fold (and no refit model): the same training settings, so its fold
    counts when the member goes on to its other folds."""
    return with_values(cfg, {"train.folds": [SCREEN_FOLD], "train.refit": False})


def held_out(run_dir: Path, fold: int = SCREEN_FOLD) -> Optional[pd.DataFrame]:
    """The rows of ``fold`` in a member's plain ``oof.csv`` (no TTA, so every member is scored alike), by id; None
    when the table or the fold's probabilities are missing."""
    path = RunDir(run_dir).oof
    if not path.is_file():
        return None
    table = pd.read_csv(path, dtype={"id": str, "label": str}, **AS_WRITTEN).set_index("id")
    rows = table[table["fold"] == fold]
    classes = [c for c in table.columns if c not in ("label", "fold")]
    if rows.empty or rows[classes].isna().any().any():
        return None
    return rows


def halves(labels: np.ndarray, seed: int) -> np.ndarray:
    """Two halves of the rows (stratified where every class has two rows or more), as fold numbers 0 and 1."""
    split = np.zeros(len(labels), dtype=int)
    counts = np.bincount(labels)
    stratify = counts[counts > 0].min() >= 2
    splitter = (StratifiedKFold if stratify else KFold)(2, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for half, (_, rows) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
            split[rows] = half
    return split


def fold_gain(done: list[Path], candidate: Path, ensemble: EnsembleConfig, seed: int,
              fold: int = SCREEN_FOLD) -> Optional[dict]:
    """How the candidate's fold ``fold`` changes the hill-climbed ensemble of the ``done`` members there: the
    ensemble's metric, accuracy and macro-F1 without and with it (nested over two halves of the rows), its own
    scores, and ``gain`` (the metric's loss without minus with: positive when it helps). None when a member's fold
    is missing or the members were not split alike."""
    found = held_out(candidate, fold)
    tables = [held_out(path, fold) for path in done]
    if found is None or not tables or any(t is None or set(t.index) != set(found.index) for t in tables):
        return None
    classes = [c for c in found.columns if c not in ("label", "fold")]
    if any(list(t.columns) != list(found.columns) for t in tables):
        return None
    ids = found.index
    labels = found["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    probs = [t.loc[ids, classes].to_numpy(np.float64) for t in tables]
    mine = found[classes].to_numpy(np.float64)
    hill = dataclasses.replace(ensemble, method="hill_climb", weights=None)
    split = halves(labels, seed)
    without, with_it = nested_oof(hill, probs, labels, split), nested_oof(hill, probs + [mine], labels, split)
    gain = metric_loss(hill.metric, labels, without) - metric_loss(hill.metric, labels, with_it)
    return {"fold": fold, "rows": len(ids), "members": [Path(p).name for p in done], "metric": hill.metric,
            "alone": _scores(labels, mine), "without": _scores(labels, without), "with": _scores(labels, with_it),
            "gain": round(gain, 6)}


def _scores(labels: np.ndarray, probs: np.ndarray) -> dict:
    found = score(labels, probs)
    return {key: round(found[key], 6) for key in ("accuracy", "macro_f1", "log_loss")}


# --------------------------------------------------------------------------- the plan's verdict


def screens(plan: planner.Plan, i: int) -> bool:
    """Whether step ``i`` proves itself on its first fold before its other folds: every member of a budgeted plan
    but the first, unless the user chose the folds (``train.folds``), there is one fold, or an earlier invocation
    already judged it."""
    cfg = plan.configs[i]
    return (plan.budget_s is not None and i != plan.lead and cfg.train.folds is None and cfg.folds.n_splits > 1
            and not plan.steps[i].get("screen"))


def judge(plan: planner.Plan, i: int, actual_s: float) -> Optional[str]:
    """After step ``i``'s first fold (``actual_s`` seconds, with its preprocess and folds): its evidence recorded
    in ``plan.json`` (``screen``), and why it stops there, or None when its other folds train."""
    step, cfg = plan.steps[i], plan.configs[i]
    if step.get("resumed") and step.get("started_min") is not None:  # its minutes span the invocations
        actual_s = max(actual_s, plan.spent() - 60 * step["started_min"])
    rest = rest_seconds(step, cfg, actual_s)
    evidence = fold_gain([c.run_dir for c in planner.finished(plan)], cfg.run_dir, cfg.ensemble, plan.base.seed)
    left = plan.left()
    reason = stop_reason(evidence, rest, float("inf") if left is None else left)
    if evidence is not None and rest > 0:
        evidence["gain_per_min"] = round(evidence["gain"] / (rest / 60), 6)
    step["screen"] = {"estimated_min": step.get("first_fold_min"), "actual_min": minutes(actual_s),
                      "rest_min": minutes(rest), "evidence": evidence, "decision": reason or "goes on"}
    plan.save()
    log.info("plan: %s after fold %d (%.2f min, estimated %s): %s", step["member"], SCREEN_FOLD, actual_s / 60,
             step.get("first_fold_min"), reason or _went_on(evidence, rest))
    return reason


def rest_seconds(step: dict, cfg: Config, actual_s: float) -> float:
    """The seconds a screened member's other folds need: each as long as its fold 0 took to fit (its
    ``result.json``; what was done once before it is not done again), and its infer stage as estimated, scaled by
    how fold 0 ran against its own estimate. Without fold 0's whole timing (none, or a fold resumed in another
    invocation times only its last epochs), the whole rest of the estimate so scaled."""
    total, first = 60 * (step["estimated_min"] or 0.0), 60 * (step.get("first_fold_min") or 0.0)
    factor = min(max(actual_s / first, planner.CORRECTION[0]), planner.CORRECTION[1]) if first else 1.0
    result = RunDir.of(cfg).model(SCREEN_FOLD).result
    if step.get("infer_min") is None or step.get("resumed") or not result.is_file():
        return max(total - first, 0.0) * factor
    fold_s = float(read_json(result)["seconds"]) + FOLD_OVERHEAD_S
    return (cfg.folds.n_splits - 1) * fold_s + 60 * step["infer_min"] * factor


def stop_reason(evidence: Optional[dict], rest_s: float, left_s: float) -> Optional[str]:
    """Why a screened member stops: its fold adds nothing to the ensemble (judged on :data:`MIN_ROWS` rows or
    more), or its other folds do not fit the time left; None: it goes on."""
    if evidence is not None and evidence["rows"] >= MIN_ROWS and evidence["gain"] <= 0:
        metric, names = evidence["metric"], ", ".join(evidence["members"])
        return (f"stopped after fold {evidence['fold']}: it does not improve the ensemble of {names} there "
                f"(held-out {metric} {evidence['without'][metric]:.4f} without it, {evidence['with'][metric]:.4f} "
                f"with it, {evidence['rows']} rows); its other folds train only with time no other member can use")
    if rest_s > left_s:
        return (f"stopped after fold {SCREEN_FOLD}: its other folds need {rest_s / 60:.1f} min (timed by its first), "
                f"{max(left_s, 0.0) / 60:.1f} min left")
    return None


def late_step(plan: planner.Plan) -> Optional[int]:
    """Once no member is planned, the stopped member to complete: the one with the largest fold-0 gain among
    those whose other folds (timed by their first) fit the time left; None when none does."""
    left = plan.left()
    if left is None:
        return None
    found = [((s["screen"].get("evidence") or {}).get("gain", 0.0), -i) for i, s in enumerate(plan.steps)
             if s["status"] == "stopped" and s.get("screen") and 60 * (s["screen"]["rest_min"] or 0.0) <= left]
    return -max(found)[1] if found else None


def start_late(plan: planner.Plan, i: int) -> None:
    """Mark stopped step ``i`` running again, for its other folds."""
    plan.steps[i].update(status="running", note="its fold-0 gain was too small to go on at once; its other folds "
                         "trained with time no other member could use")
    plan.save()


def _went_on(evidence: Optional[dict], rest_s: float) -> str:
    if evidence is None:
        return f"no fold-{SCREEN_FOLD} evidence to compare; its other folds train ({rest_s / 60:.1f} min)"
    metric = evidence["metric"]
    return (f"the ensemble's held-out {metric} {evidence['without'][metric]:.4f} -> {evidence['with'][metric]:.4f} "
            f"with it ({evidence['rows']} rows): its other folds train ({rest_s / 60:.1f} min)")
