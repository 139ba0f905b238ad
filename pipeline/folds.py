"""Folds stage: Stratified K-Fold (StratifiedGroupKFold when a group column is set), saved and reused.

``python -m pipeline.folds --config CONFIG`` writes ``runs/<experiment>/folds.csv`` (id, label, fold).
An existing file made from the same ids, labels, groups and settings is reused as it is, so every
experiment that shares a run folder is scored on the same splits.
"""
from __future__ import annotations

import hashlib
import logging

import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from .cli import stage_main
from .config import Config
from .data.cache import load_split
from .utils import read_json, write_csv, write_json

log = logging.getLogger(__name__)


def assign_folds(index: pd.DataFrame, n_splits: int, seed: int, group_col: str | None = None) -> pd.Series:
    """The fold number of every row: stratified by label, and grouped when ``group_col`` is given."""
    folds = pd.Series(-1, index=index.index, name="fold")
    if group_col:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        splits = splitter.split(index, index["label"], groups=index[group_col])
    else:
        splits = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(index, index["label"])
    for fold, (_, valid) in enumerate(splits):
        folds.iloc[valid] = fold
    return folds


def _fingerprint(index: pd.DataFrame, cfg: Config, group_col: str | None) -> str:
    cols = ["id", "label"] + ([group_col] if group_col else [])
    text = index[cols].to_csv(index=False) + f"{cfg.folds.n_splits}/{cfg.folds.seed}"
    return hashlib.sha1(text.encode()).hexdigest()


def run(cfg: Config) -> pd.DataFrame:
    """Write (or reuse) ``folds.csv`` and return it."""
    _, index = load_split(cfg.run_dir, "train")
    group_col = "group" if "group" in index.columns else None
    path, meta = cfg.run_dir / "folds.csv", cfg.run_dir / "folds.json"
    fingerprint = _fingerprint(index, cfg, group_col)
    if path.is_file() and meta.is_file() and read_json(meta).get("fingerprint") == fingerprint:
        log.info("folds up to date: %s", path)
        return pd.read_csv(path, dtype={"id": str, "label": str})
    frame = index[["id", "label"] + ([group_col] if group_col else [])].copy()
    frame["fold"] = assign_folds(index, cfg.folds.n_splits, cfg.folds.seed, group_col).to_numpy()
    write_csv(path, frame)
    write_json(meta, {"fingerprint": fingerprint, "n_splits": cfg.folds.n_splits, "seed": cfg.folds.seed})
    log.info("folds: %d rows in %d %s folds -> %s", len(frame), cfg.folds.n_splits,
             "grouped stratified" if group_col else "stratified", path)
    return frame


def main(argv=None) -> int:
    return stage_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
