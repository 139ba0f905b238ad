"""Ensemble stage: combine this experiment's fold models with other experiments', weights chosen on the OOF.

``python -m pipeline.ensemble --config CONFIG --set ensemble.members=[runs/exp_b,exp_c]`` reads each
member's per-fold test probabilities (``fold<k>/test.npy``) and out-of-fold table (``oof_tta.csv``, else
``oof.csv``) and combines them with ``ensemble.method``:

* ``soft``: weighted mean of probabilities; ``hard``: weighted majority vote, as vote shares. Weights are
  ``ensemble.weights`` (one per experiment, this run first), shared equally by an experiment's folds.
* ``hill_climb``: Caruana et al. (2004) greedy forward selection with replacement: starting from the best
  member, repeatedly add the member whose addition most improves the OOF ``ensemble.metric``; the weights
  are how often each member was picked (a member that never helps gets 0). With ``ensemble.temper_members``
  each member is first re-tempered with its own temperature fitted on the same rows (temperature scaling), so
  an accurate but under-confident member (label smoothing) is not passed over for its log loss.
* ``stack``: a multinomial logistic regression on the members' OOF log-probabilities (standardised: unscaled,
  lbfgs took ~450 iterations a fit and a 3-member CIFAR stack 10 minutes; scaled, ~60), its regularisation
  chosen by cross-validation on the same folds.

The reported OOF score is honest: for the fitted methods the weights are fitted on all folds but one and
scored on the held-out fold, fold by fold (nested over folds); the in-sample score, the plain average and
every member's own score stand beside it in ``ensemble.json``. Members must have the same class list and
test ids (and, for the fitted methods, the same folds). Writes ``ensemble.csv``, ``ensemble.json`` and
``ensemble_oof.csv`` (the nested OOF probabilities: a teacher for ``train.teacher``).
A member trained with ``train.refit`` adds its refit model's test probabilities (``refit/test.npy``) with its
fold models (``ensemble.refit_weight`` of the member's share) or instead of them (``ensemble.refit: instead``);
the OOF scores and fitted weights remain the fold models' (the refit model has no held-out rows).
``ensemble.calibrate: temperature`` then re-tempers the combination's probabilities with one scalar fitted on the
honest OOF log loss (:mod:`pipeline.evaluation.calibration`); the OOF is re-scored with each fold's T fitted on the others.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import yaml
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import PredefinedSplit
from sklearn.preprocessing import StandardScaler

from pipeline.cli import stage_main
from pipeline.core.config import Config, EnsembleConfig, load_config
from pipeline.core.registry import Registry
from pipeline.core.utils import write_csv, write_json
from pipeline.data.contract import AS_WRITTEN
from pipeline.evaluation.calibration import fit_temperature, temperature_report, with_temperature
from pipeline.evaluation.metrics import metric_loss, score
from pipeline.rundir import RunDir, load_manifest

log = logging.getLogger(__name__)


def soft_vote(probs: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Weighted mean of class probabilities."""
    return np.tensordot(weights / weights.sum(), np.stack(probs), axes=1)


def hard_vote(probs: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Weighted majority vote; returns each class's share of the votes (ties go to the lower index)."""
    votes = np.zeros_like(probs[0])
    for p, w in zip(probs, weights):
        votes[np.arange(len(p)), p.argmax(1)] += w
    return votes / weights.sum()


# --------------------------------------------------------------------------- ensemblers


class Ensembler:
    """Combines members' probabilities (one (N, C) array per experiment) with per-member weights.

    :meth:`fit` learns from the members' OOF probabilities (nothing for fixed weights); :meth:`predict`
    combines member-level probabilities; :meth:`predict_folds` combines every fold model of every member
    (the test set), each member's weight shared by its folds.
    """

    vote: Callable[[list[np.ndarray], np.ndarray], np.ndarray] = staticmethod(soft_vote)
    fitted = False  # True: weights come from the OOF, so the OOF score is nested over folds

    def __init__(self, cfg: EnsembleConfig, n_members: int) -> None:
        self.cfg = cfg
        weights = cfg.weights or [1.0] * n_members
        if len(weights) != n_members:
            raise ValueError(f"ensemble.weights has {len(weights)} values for {n_members} experiments")
        self.weights = np.asarray(weights, dtype=float)

    def fit(self, probs: list[np.ndarray], labels: np.ndarray, folds: np.ndarray) -> "Ensembler":
        return self

    def predict(self, probs: list[np.ndarray]) -> np.ndarray:
        return self.vote(probs, self.weights)

    def predict_folds(self, member_folds: list[list[np.ndarray]], shares: list[np.ndarray]) -> np.ndarray:
        """``shares``: each model's share of its member (the folds equally, or with a refit model)."""
        spread = np.concatenate([w * np.asarray(s) for w, s in zip(self.weights, shares)])
        return self.vote([p for folds in member_folds for p in folds], spread)

    def member_weights(self) -> list[float]:
        """Each member's share of the combination (sums to 1)."""
        return (self.weights / self.weights.sum()).tolist()


ENSEMBLERS: Registry[type[Ensembler]] = Registry("ensembler")
ENSEMBLERS.register("soft")(Ensembler)
# the bounds of a member's temperature before a hill climb: wide enough for a label-smoothed fine-tune (0.5-0.8 on our
# sets) and a logistic regression (1.5-3.3), narrow enough that a member with a handful of errors on the rows its T
# is fitted on is not sharpened without limit
MEMBER_TEMPERATURES = (0.25, 4.0)


@ENSEMBLERS.register("hard")
class HardVote(Ensembler):
    vote = staticmethod(hard_vote)


class FittedEnsembler(Ensembler):
    """An ensembler whose weights :meth:`fit` learns from the OOF (set weights are refused)."""

    fitted = True

    def __init__(self, cfg: EnsembleConfig, n_members: int) -> None:
        if cfg.weights is not None:
            raise ValueError(f"ensemble.weights is set, but ensemble.method={cfg.method} fits its own weights "
                             "on the OOF predictions: drop ensemble.weights or use method soft/hard")
        super().__init__(cfg, n_members)


@ENSEMBLERS.register("hill_climb")
class HillClimb(FittedEnsembler):
    """Greedy forward selection with replacement (Caruana et al., 2004) on the OOF ``ensemble.metric``; with
    ``ensemble.temper_members`` each member is first re-tempered with its own fitted temperature."""

    temperatures: Optional[list[float]] = None

    def tempered(self, probs: list[np.ndarray]) -> list[np.ndarray]:
        """``probs`` (one array per member) with each member's fitted temperature, when there are any."""
        if self.temperatures is None:
            return probs
        return [with_temperature(p, t) for p, t in zip(probs, self.temperatures)]

    def fit(self, probs: list[np.ndarray], labels: np.ndarray, folds: np.ndarray) -> "HillClimb":
        if self.cfg.temper_members:
            self.temperatures = [fit_temperature(p, labels, MEMBER_TEMPERATURES) for p in probs]
            probs = self.tempered(probs)
        losses = [metric_loss(self.cfg.metric, labels, p) for p in probs]
        counts = np.zeros(len(probs))
        first = int(np.argmin(losses))  # ties: the first member (so a duplicate is never preferred)
        counts[first], current, best = 1, probs[first].astype(np.float64), losses[first]
        for _ in range(self.cfg.hill_climb_steps):
            n = counts.sum()
            trials = [metric_loss(self.cfg.metric, labels, (current * n + p) / (n + 1)) for p in probs]
            pick = int(np.argmin(trials))
            if trials[pick] >= best:
                break  # no member improves the ensemble any more
            counts[pick] += 1
            current, best = (current * n + probs[pick]) / (n + 1), trials[pick]
        self.weights = counts
        return self

    def predict(self, probs: list[np.ndarray]) -> np.ndarray:
        return super().predict(self.tempered(probs))

    def predict_folds(self, member_folds: list[list[np.ndarray]], shares: list[np.ndarray]) -> np.ndarray:
        if self.temperatures is not None:
            member_folds = [[with_temperature(p, t) for p in folds]
                            for folds, t in zip(member_folds, self.temperatures)]
        return super().predict_folds(member_folds, shares)


@ENSEMBLERS.register("stack")
class Stack(FittedEnsembler):
    """Multinomial logistic regression on the members' log-probabilities; C chosen by CV on the folds."""

    def __init__(self, cfg: EnsembleConfig, n_members: int) -> None:
        super().__init__(cfg, n_members)
        self.model = None
        self.scaler = StandardScaler()
        self.keep: list[int] = list(range(n_members))

    @staticmethod
    def features(probs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([np.log(np.clip(p, 1e-7, 1.0)) for p in probs], axis=1)

    def fit(self, probs: list[np.ndarray], labels: np.ndarray, folds: np.ndarray) -> "Stack":
        # an exact copy of an earlier member adds nothing but would halve its features' penalty: drop it
        self.keep = [i for i, p in enumerate(probs) if not any(np.array_equal(p, probs[j]) for j in range(i))]
        x = self.scaler.fit_transform(self.features([probs[i] for i in self.keep]))
        if len(np.unique(folds)) >= 2:
            self.model = LogisticRegressionCV(Cs=list(self.cfg.stack_cs), cv=PredefinedSplit(folds),
                                              scoring="neg_log_loss", max_iter=2000,
                                              l1_ratios=(0.0,), use_legacy_attributes=False)
        else:
            self.model = LogisticRegression(C=1.0, max_iter=2000)
        self.model.fit(x, labels)
        coef = np.abs(self.model.coef_).reshape(len(self.model.classes_), len(self.keep), -1).sum(axis=(0, 2))
        self.weights = np.zeros(len(probs))
        self.weights[self.keep] = coef
        return self

    def predict(self, probs: list[np.ndarray]) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("stack: fit before predict")
        out = np.zeros((len(probs[0]), probs[0].shape[1]))
        x = self.scaler.transform(self.features([probs[i] for i in self.keep]))
        out[:, self.model.classes_] = self.model.predict_proba(x)
        return out

    def predict_folds(self, member_folds: list[list[np.ndarray]], shares: list[np.ndarray]) -> np.ndarray:
        return self.predict([np.tensordot(s, np.stack(folds), axes=1) for folds, s in zip(member_folds, shares)])


def nested_oof(cfg: EnsembleConfig, probs: list[np.ndarray], labels: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """OOF probabilities of the ensemble with its weights fitted on every fold but the row's own."""
    out = np.zeros_like(probs[0], dtype=np.float64)
    for fold in np.unique(folds):
        held = folds == fold
        fitted = ENSEMBLERS.build(cfg.method, cfg, len(probs)).fit(
            [p[~held] for p in probs], labels[~held], folds[~held])
        out[held] = fitted.predict([p[held] for p in probs])
    return out


# --------------------------------------------------------------------------- members


def member_dirs(cfg: Config) -> list[Path]:
    """This run's folder first, then each member (a run folder path or an experiment name). An ensemble config
    (``ensemble.member_configs``) is not a member itself; its members default to its member configs' folders."""
    own = not cfg.ensemble.member_configs
    dirs = [cfg.run_dir] if own else []
    names = cfg.ensemble.members or [str(load_config(p).run_dir) for p in cfg.ensemble.member_configs]
    for member in names:
        path = Path(member)
        path = path if path.is_dir() else Path(cfg.runs_dir) / member
        if not path.is_dir():
            raise FileNotFoundError(f"ensemble member {member!r}: no run folder at {member} or {path}")
        if not own or path.resolve() != cfg.run_dir.resolve():
            dirs.append(path)
    return dirs


def trained_with_refit(run_dir: Path) -> bool:
    """Whether a member's last training had ``train.refit`` on (its saved ``config.yaml``)."""
    path = RunDir(run_dir).config
    config = yaml.safe_load(path.read_text()) if path.is_file() else None
    return bool(((config or {}).get("train") or {}).get("refit", False))


def with_refit(member: dict, refit: bool, cfg: EnsembleConfig) -> dict:
    """Add the member's refit model (``refit/test.npy``) to its fold models as ``ensemble.refit`` says: "with"
    (``refit_weight`` of the member's share, the folds the rest) or "instead"; ``shares`` holds each model's share."""
    folds = member["folds"]
    member["shares"], member["refit"] = model_shares(len(folds), False, cfg), None
    if not refit:
        return member
    path = RunDir(member["dir"]).model(None).predictions("test")
    if not path.is_file():
        raise FileNotFoundError(f"ensemble member {member['dir']} was trained with train.refit but has no {path}: "
                                "run its infer stage")
    member["folds"] = ([] if cfg.refit == "instead" else folds) + [np.load(path)]
    member["shares"] = model_shares(len(folds), True, cfg)
    weight = f"with the folds, weight {cfg.refit_weight:g}"
    member["refit"] = "instead of the folds" if cfg.refit == "instead" else weight
    return member


def model_shares(n_folds: int, refit: bool, cfg: EnsembleConfig) -> np.ndarray:
    """Each model's share of its member: the ``n_folds`` fold models equally, then, with a refit model, its share
    as ``ensemble.refit`` says (``instead``: the refit model alone, the folds dropped)."""
    if not refit:
        return np.full(n_folds, 1 / n_folds)
    w = 1.0 if cfg.refit == "instead" else cfg.refit_weight
    return np.append([] if cfg.refit == "instead" else np.full(n_folds, (1 - w) / n_folds), w)


def load_member(run_dir: Path, classes: Optional[list[str]]) -> dict:
    """A member's classes, test ids, per-fold test probabilities and (if any) OOF table."""
    manifest = load_manifest(run_dir)
    if classes is not None and manifest["classes"] != classes:
        raise ValueError(f"ensemble member {run_dir} has classes {manifest['classes']}, not {classes}: "
                         "its probabilities cannot be combined")
    run = RunDir(run_dir)
    fold_files = [m.predictions("test") for m in run.fold_models() if m.predictions("test").is_file()]
    if not fold_files:
        raise FileNotFoundError(f"ensemble member {run_dir} has no fold*/test.npy: run its infer stage")
    ids = pd.read_csv(run.index(manifest["test"]), dtype={"id": str}, **AS_WRITTEN)["id"].to_numpy()
    oof_path = run.oof_table()
    return {"dir": run_dir, "name": run_dir.name, "classes": manifest["classes"], "ids": ids,
            "folds": [np.load(p) for p in fold_files], "oof": oof_path}


def _aligned(member: dict, ids: np.ndarray) -> list[np.ndarray]:
    if np.array_equal(member["ids"], ids):
        return member["folds"]
    if set(member["ids"]) != set(ids):
        raise ValueError(f"ensemble member {member['dir']} predicts other test ids than {ids[:3]}…")
    order = pd.Index(member["ids"]).get_indexer(ids)
    return [p[order] for p in member["folds"]]


def load_oof(members: list[dict], classes: list[str], same_folds: bool) -> Optional[dict]:
    """Every member's OOF probabilities on the first member's ids, the labels and folds (None if any is
    missing or partial). With ``same_folds``, members whose folds differ are an error."""
    if any(m["oof"] is None for m in members):
        return None
    tables = [pd.read_csv(m["oof"], dtype={"id": str, "label": str}, **AS_WRITTEN).set_index("id") for m in members]
    if any(set(t.index) != set(tables[0].index) for t in tables):
        return None
    ids = tables[0].index
    probs = [t.loc[ids, classes].to_numpy(dtype=np.float64) for t in tables]
    if any(np.isnan(p).any() for p in probs):
        return None
    folds = tables[0]["fold"].to_numpy()
    for m, t in zip(members, tables):
        if same_folds and not np.array_equal(t.loc[ids, "fold"].to_numpy(), folds):
            raise ValueError(f"ensemble member {m['dir']} was cross-validated on other folds than {members[0]['dir']}:"
                             " weights fitted on the OOF need the same folds (same data, folds.* and seed)")
    labels = tables[0].loc[ids, "label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    return {"ids": ids.to_numpy(), "label": tables[0].loc[ids, "label"].to_numpy(), "labels": labels,
            "folds": folds, "probs": probs}


def oof_report(cfg: Config, members: list[dict], oof: dict, fitted: Ensembler) -> tuple[dict, np.ndarray]:
    """The honest OOF score (nested over folds for fitted weights) next to the in-sample one, the plain
    average and every member's own score; returns the report and the honest OOF probabilities."""
    labels, probs = oof["labels"], oof["probs"]
    in_sample = fitted.predict(probs)
    honest = nested_oof(cfg.ensemble, probs, labels, oof["folds"]) if fitted.fitted else in_sample
    own = {m["name"]: score(labels, p) for m, p in zip(members, probs)}
    best = max(own, key=lambda name: own[name]["accuracy"])
    report = {"oof": score(labels, honest), "oof_scoring": "nested over folds" if fitted.fitted else "fixed weights",
              "oof_in_sample": score(labels, in_sample), "oof_average": score(labels, soft_vote(probs, np.ones(len(probs)))),
              "oof_members": own, "best_member": best, "oof_without": contributions(cfg, members, oof)}
    return report, honest


def contributions(cfg: Config, members: list[dict], oof: dict) -> dict:
    """Each member's contribution: the in-sample OOF score of the ensemble refitted without it."""
    if len(members) < 2:
        return {}
    out = {}
    for drop, member in enumerate(members):
        keep = [i for i in range(len(members)) if i != drop]
        ens = cfg.ensemble
        if ens.weights is not None:
            ens = dataclasses.replace(ens, weights=[ens.weights[i] for i in keep])
        probs = [oof["probs"][i] for i in keep]
        fitted = ENSEMBLERS.build(ens.method, ens, len(keep)).fit(probs, oof["labels"], oof["folds"])
        out[member["name"]] = score(oof["labels"], fitted.predict(probs))
    return out


def calibrated(report: dict, test: np.ndarray, honest: np.ndarray, oof: dict) -> tuple[np.ndarray, np.ndarray]:
    """Temperature scaling fitted on the honest OOF: the test probabilities with that T, the OOF re-scored with
    each fold's T fitted on the other folds (``report["oof"]``; the uncalibrated score stays beside it)."""
    t, nested, summary = temperature_report(honest, oof["labels"], oof["folds"])
    report["calibration"], report["oof_uncalibrated"] = summary, report["oof"]
    report["oof"] = score(oof["labels"], nested)
    log.info("ensemble: temperature %.3f: OOF log loss %.4f -> %.4f, ECE %.4f -> %.4f (%s)", t,
             *summary["oof_log_loss"], *summary["oof_ece"], summary["scoring"])
    return with_temperature(test, t), nested


def load_members(cfg: Config) -> list[dict]:
    """Every member's predictions (:func:`member_dirs` order), each with its refit model as ``ensemble.refit`` says."""
    members: list[dict] = []
    for path in member_dirs(cfg):
        member = load_member(path, members[0]["classes"] if members else None)
        refit = cfg.train.refit if not members else trained_with_refit(path)  # this run: as configured now
        members.append(with_refit(member, refit, cfg.ensemble))
    return members


def write_oof(path: Path, oof: dict, probs: np.ndarray, classes: list[str]) -> None:
    """The ensemble's honest OOF probabilities as a table: id, label, fold, one column per class."""
    table = pd.DataFrame(probs, columns=classes)
    table.insert(0, "fold", oof["folds"])
    table.insert(0, "label", oof["label"])
    table.insert(0, "id", oof["ids"])
    write_csv(path, table)


def run(cfg: Config) -> pd.DataFrame:
    """Fit the combination on the members' OOF, combine their fold predictions; write ``ensemble.csv``."""
    method, out = ENSEMBLERS.get(cfg.ensemble.method), RunDir.of(cfg)
    members = load_members(cfg)
    if cfg.ensemble.weights is not None and len(cfg.ensemble.weights) != len(members) and not method.fitted:
        raise ValueError(f"ensemble.weights has {len(cfg.ensemble.weights)} values for {len(members)} experiments "
                         f"({', '.join(str(m['dir']) for m in members)})")
    classes, ids = members[0]["classes"], members[0]["ids"]
    ensembler = method(cfg.ensemble, len(members))
    oof = load_oof(members, classes, same_folds=method.fitted)
    fits = [f"ensemble.method={cfg.ensemble.method}"] * method.fitted + \
        [f"ensemble.calibrate={cfg.ensemble.calibrate}"] * (cfg.ensemble.calibrate != "none")
    if fits and oof is None:
        raise FileNotFoundError(f"{' and '.join(fits)} fit on the OOF predictions, but a member has no complete "
                                "oof.csv: train every fold of every member")
    if method.fitted:
        ensembler.fit(oof["probs"], oof["labels"], oof["folds"])
    member_folds = [_aligned(m, ids) for m in members]
    test = ensembler.predict_folds(member_folds, [m["shares"] for m in members])
    report = {"method": cfg.ensemble.method, "settings": dataclasses.asdict(cfg.ensemble),
              "members": [str(m["dir"]) for m in members],
              "models": sum(len(f) for f in member_folds), "weights": cfg.ensemble.weights,
              "member_weights": dict(zip([m["name"] for m in members], ensembler.member_weights())), "oof": None}
    refits = {m["name"]: m["refit"] for m in members if m["refit"]}
    if refits:  # test predictions only: nothing of a refit model is held out
        report["refit"] = {**refits, "note": "refit models change the test predictions only; the OOF scores and "
                                             "fitted weights are the fold models'"}
        log.info("ensemble: refit models %s (test predictions only; OOF from the fold models)", refits)
    if oof is not None:
        scores, honest = oof_report(cfg, members, oof, ensembler)
        report.update(scores)
        if cfg.ensemble.calibrate != "none":
            test, honest = calibrated(report, test, honest, oof)
        write_oof(out.ensemble_oof, oof, honest, classes)
    frame = pd.DataFrame(test, columns=classes)
    frame.insert(0, "id", ids)
    write_csv(out.ensemble_csv, frame)
    write_json(out.ensemble_json, report)
    log.info("ensemble: %s of %d fold models from %d experiment(s), member weights %s; OOF %s",
             cfg.ensemble.method, report["models"], len(members), report["member_weights"], report["oof"])
    if oof is not None:
        log.info("ensemble OOF accuracy %.4f (%s) vs in-sample %.4f, plain average %.4f, best member %s %.4f",
                 report["oof"]["accuracy"], report["oof_scoring"], report["oof_in_sample"]["accuracy"],
                 report["oof_average"]["accuracy"], report["best_member"],
                 report["oof_members"][report["best_member"]]["accuracy"])
    return frame


def main(argv=None) -> int:
    return stage_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
