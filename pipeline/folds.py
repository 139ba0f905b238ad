"""Folds stage: Stratified K-Fold (StratifiedGroupKFold when a group column is set), saved and reused.

``python -m pipeline.folds --config CONFIG`` writes ``runs/<experiment>/folds.csv`` (id, label, fold).
An existing file made from the same ids, labels, groups and settings is reused as it is, so every
experiment that shares a run folder is scored on the same splits.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import bmat, coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from pipeline.cli import stage_main
from pipeline.core.config import Config
from pipeline.data.contract import AS_WRITTEN
from pipeline.rundir import ReportDir, RunDir, load_split, read_folds
from pipeline.core.utils import read_json, write_csv, write_json

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


def duplicate_groups(cfg: Config, ids: pd.Series) -> pd.Series:
    """Each train id's EDA duplicate group (``dup:<n>``), or its own group (``id:<id>``) when it has none; the
    groups of ``folds.duplicates_csv`` when set, else of this experiment's EDA."""
    path = Path(cfg.folds.duplicates_csv) if cfg.folds.duplicates_csv else ReportDir.of(cfg).duplicate_groups
    if not path.is_file():
        raise FileNotFoundError(f"folds.group_duplicates needs {path}: run the eda stage first")
    dups = pd.read_csv(path, dtype={"id": str, "split": str}, **AS_WRITTEN)
    dups = dups[dups["split"] == "train"].set_index("id")["dup_group"]
    mapped = ids.map(dups)
    return ("dup:" + mapped.astype("Int64").astype(str)).where(mapped.notna(), "id:" + ids)


def merge_groups(*columns: pd.Series) -> pd.Series:
    """One group per connected component: rows sharing a label in any column end up in the same group."""
    labels = pd.concat([c.astype(str).radd(f"{k}:") for k, c in enumerate(columns)], ignore_index=True)
    codes, uniques = pd.factorize(labels)
    rows = np.tile(np.arange(len(columns[0])), len(columns))
    graph = coo_matrix((np.ones(len(codes)), (rows, codes)), shape=(len(columns[0]), len(uniques)))
    adjacency = bmat([[None, graph], [graph.T, None]])
    _, component = connected_components(adjacency, directed=False)
    return pd.Series(component[:len(columns[0])], index=columns[0].index, name="cv_group")


def cv_groups(cfg: Config, index: pd.DataFrame) -> pd.Series | None:
    """The groups folds must respect: data.group_col, EDA duplicates, both merged, or None."""
    columns = [index["group"]] if "group" in index.columns else []
    if cfg.folds.group_duplicates:
        columns.append(duplicate_groups(cfg, index["id"]))
    return merge_groups(*columns) if columns else None


def _fingerprint(index: pd.DataFrame, cfg: Config, groups: pd.Series | None) -> str:
    text = index[["id", "label"]].to_csv(index=False) + f"{cfg.folds.n_splits}/{cfg.folds.seed}"
    if groups is not None:
        text += groups.to_csv(index=False)
    return hashlib.sha1(text.encode()).hexdigest()


def _read_json_or_empty(path: Path) -> dict:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return {}


def run(cfg: Config) -> pd.DataFrame:
    """Write (or reuse) ``folds.csv`` and return it."""
    _, index = load_split(cfg.run_dir, "train")
    groups = cv_groups(cfg, index)
    path, meta = RunDir.of(cfg).folds_csv, RunDir.of(cfg).folds_json
    fingerprint = _fingerprint(index, cfg, groups)
    if path.is_file() and meta.is_file() and _read_json_or_empty(meta).get("fingerprint") == fingerprint:
        try:
            frame = read_folds(cfg.run_dir, index)
            log.info("folds up to date: %s", path)
            return frame
        except ValueError as err:
            log.warning("%s; making the folds again", err)
    frame = index[["id", "label"] + (["group"] if "group" in index.columns else [])].copy()
    group_col = "group" if "group" in frame.columns else None
    if cfg.folds.group_duplicates:  # the merged groups are what the split respected: keep them visible
        frame["cv_group"], group_col = groups.to_numpy(), "cv_group"
    frame["fold"] = assign_folds(frame, cfg.folds.n_splits, cfg.folds.seed, group_col).to_numpy()
    write_csv(path, frame)
    write_json(meta, {"fingerprint": fingerprint, "n_splits": cfg.folds.n_splits, "seed": cfg.folds.seed})
    log.info("folds: %d rows in %d %s folds -> %s", len(frame), cfg.folds.n_splits,
             "grouped stratified" if groups is not None else "stratified", path)
    return frame


def main(argv=None) -> int:
    return stage_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
