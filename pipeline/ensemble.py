"""Ensemble stage: vote across every fold model of this experiment and of other experiments.

``python -m pipeline.ensemble --config CONFIG --set ensemble.members=[runs/exp_b,exp_c]`` reads each
member's per-fold test probabilities (``fold<k>/test.npy``) and combines them with the configured
ensembler (``soft``: weighted mean of probabilities; ``hard``: weighted majority vote, as vote shares).
``ensemble.weights`` gives one weight per experiment (this run first), shared equally by its folds.
Members must have the same class list and test ids. When every member has out-of-fold predictions on
the same ids, the ensemble's OOF score is reported too. Writes ``ensemble.csv`` and ``ensemble.json``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from .cli import stage_main
from .config import Config
from .data.cache import load_manifest
from .metrics import score
from .registry import Registry
from .utils import write_csv, write_json

log = logging.getLogger(__name__)

Ensembler = Callable[[list[np.ndarray], np.ndarray], np.ndarray]
ENSEMBLERS: Registry[Ensembler] = Registry("ensembler")


@ENSEMBLERS.register("soft")
def soft_vote(probs: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Weighted mean of class probabilities."""
    return np.tensordot(weights / weights.sum(), np.stack(probs), axes=1)


@ENSEMBLERS.register("hard")
def hard_vote(probs: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Weighted majority vote; returns each class's share of the votes (ties go to the lower index)."""
    votes = np.zeros_like(probs[0])
    for p, w in zip(probs, weights):
        votes[np.arange(len(p)), p.argmax(1)] += w
    return votes / weights.sum()


def member_dirs(cfg: Config) -> list[Path]:
    """This run's folder first, then each member (a run folder path or an experiment name)."""
    dirs = [cfg.run_dir]
    for member in cfg.ensemble.members:
        path = Path(member)
        path = path if path.is_dir() else Path(cfg.runs_dir) / member
        if not path.is_dir():
            raise FileNotFoundError(f"ensemble member {member!r}: no run folder at {member} or {path}")
        if path.resolve() != cfg.run_dir.resolve():
            dirs.append(path)
    return dirs


def load_member(run_dir: Path, classes: Optional[list[str]]) -> dict:
    """A member's classes, test ids, per-fold test probabilities and (if any) OOF table."""
    manifest = load_manifest(run_dir)
    if classes is not None and manifest["classes"] != classes:
        raise ValueError(f"ensemble member {run_dir} has classes {manifest['classes']}, not {classes}: "
                         "its probabilities cannot be combined")
    fold_files = sorted(run_dir.glob("fold*/test.npy"))
    if not fold_files:
        raise FileNotFoundError(f"ensemble member {run_dir} has no fold*/test.npy: run its infer stage")
    ids = pd.read_csv(run_dir / manifest["test"]["index"], dtype={"id": str})["id"].to_numpy()
    oof_path = next((p for p in (run_dir / "oof_tta.csv", run_dir / "oof.csv") if p.is_file()), None)
    return {"dir": run_dir, "classes": manifest["classes"], "ids": ids,
            "folds": [np.load(p) for p in fold_files], "oof": oof_path}


def _aligned(member: dict, ids: np.ndarray) -> list[np.ndarray]:
    if np.array_equal(member["ids"], ids):
        return member["folds"]
    if set(member["ids"]) != set(ids):
        raise ValueError(f"ensemble member {member['dir']} predicts other test ids than {ids[:3]}…")
    order = pd.Index(member["ids"]).get_indexer(ids)
    return [p[order] for p in member["folds"]]


def _weights(cfg: Config, members: list[dict]) -> np.ndarray:
    per_member = cfg.ensemble.weights or [1.0] * len(members)
    if len(per_member) != len(members):
        raise ValueError(f"ensemble.weights has {len(per_member)} values for {len(members)} experiments "
                         f"({', '.join(str(m['dir']) for m in members)})")
    return np.concatenate([np.full(len(m["folds"]), w / len(m["folds"])) for w, m in zip(per_member, members)])


def oof_score(cfg: Config, members: list[dict], classes: list[str]) -> Optional[dict]:
    """The ensemble's OOF score when every member has OOF probabilities for the same ids."""
    if any(m["oof"] is None for m in members):
        return None
    tables = [pd.read_csv(m["oof"], dtype={"id": str, "label": str}).set_index("id") for m in members]
    if any(set(t.index) != set(tables[0].index) for t in tables):
        return None
    ids = tables[0].index
    probs = [t.loc[ids, classes].to_numpy() for t in tables]
    if any(np.isnan(p).any() for p in probs):
        return None
    weights = np.asarray(cfg.ensemble.weights or [1.0] * len(members), dtype=float)
    combined = ENSEMBLERS.get(cfg.ensemble.method)(probs, weights)
    labels = tables[0].loc[ids, "label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    return score(labels, combined)


def run(cfg: Config) -> pd.DataFrame:
    """Combine the members' fold predictions; write and return ``ensemble.csv``."""
    combine = ENSEMBLERS.get(cfg.ensemble.method)
    members: list[dict] = []
    for path in member_dirs(cfg):
        members.append(load_member(path, members[0]["classes"] if members else None))
    classes, ids = members[0]["classes"], members[0]["ids"]
    probs = [p for m in members for p in _aligned(m, ids)]
    combined = combine(probs, _weights(cfg, members))
    frame = pd.DataFrame(combined, columns=classes)
    frame.insert(0, "id", ids)
    write_csv(cfg.run_dir / "ensemble.csv", frame)
    report = {"method": cfg.ensemble.method, "members": [str(m["dir"]) for m in members],
              "models": len(probs), "weights": cfg.ensemble.weights, "oof": oof_score(cfg, members, classes)}
    write_json(cfg.run_dir / "ensemble.json", report)
    log.info("ensemble: %s vote of %d fold models from %d experiment(s); OOF %s", cfg.ensemble.method,
             len(probs), len(members), report["oof"])
    return frame


def main(argv=None) -> int:
    return stage_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
