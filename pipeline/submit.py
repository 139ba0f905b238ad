"""Submit stage: the submission CSV, in the sample submission's id order and columns, checked first.

``python -m pipeline.submit --config CONFIG`` reads ``ensemble.csv`` (or ``test_probs.csv``) and writes
``submissions/<experiment>-<timestamp>.csv``; an earlier submission is never overwritten. The format follows
the sample submission (``submit.format=auto``): when its columns after the id are the classes, they hold
probabilities (``probs``), else the label column holds the predicted class (``labels``). When the competition folder has a ``solution.csv`` (the embedded demo does),
the test score is logged. The last line printed is ``submission: <path>``.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.cli import stage_main
from pipeline.core.config import Config
from pipeline.data.contract import AS_WRITTEN, read_csv_text, submission_format
from pipeline.rundir import RunDir, load_manifest

log = logging.getLogger(__name__)


def predictions(cfg: Config) -> pd.DataFrame:
    """The ensemble's test probabilities when this run ensembled, else the folds' average."""
    run = RunDir.of(cfg)
    for path in (run.ensemble_csv, run.test_probs):
        if path.is_file():
            return pd.read_csv(path, dtype={"id": str}, **AS_WRITTEN)
    raise FileNotFoundError(f"no ensemble.csv or test_probs.csv in {cfg.run_dir}: run infer and ensemble first")


def resolve_format(fmt: str, sample: pd.DataFrame, classes: list[str], id_col: str, label_col: str) -> str:
    """``labels`` or ``probs``: ``fmt`` itself, or for ``auto`` what the sample submission's columns ask for;
    columns the submission cannot follow raise ValueError (the preprocess stage checks the same, earlier)."""
    return submission_format(fmt, list(sample.columns), classes, id_col, label_col)


def build_submission(preds: pd.DataFrame, sample: pd.DataFrame, classes: list[str], id_col: str,
                     label_col: str, fmt: str) -> pd.DataFrame:
    """The submission table in ``sample``'s row order and columns."""
    preds = preds.set_index("id")
    missing = sample[id_col][~sample[id_col].isin(preds.index)]
    if len(missing):
        raise ValueError(f"{len(missing)} sample-submission id(s) have no prediction, e.g. {list(missing[:5])}")
    probs = preds.loc[sample[id_col], classes].to_numpy()
    out = pd.DataFrame({id_col: sample[id_col].to_numpy()})
    if fmt == "labels":
        if label_col not in sample.columns:
            raise ValueError(f"submit.format=labels but the sample submission has no '{label_col}' column")
        out[label_col] = np.asarray(classes, dtype=object)[probs.argmax(1)]
    else:
        absent = [c for c in sample.columns if c != id_col and c not in classes]
        if absent:
            raise ValueError(f"submit.format=probs: sample columns {absent} are not classes {classes}")
        for i, c in enumerate(classes):
            out[c] = probs[:, i]
    return out[[c for c in sample.columns if c in out.columns]]


def validate(sub: pd.DataFrame, sample: pd.DataFrame, classes: list[str], id_col: str, label_col: str,
             fmt: str) -> None:
    """Refuse a submission that does not match the sample exactly (rows, order, columns, values)."""
    problems = []
    if list(sub.columns) != list(sample.columns):
        problems.append(f"columns {list(sub.columns)} != sample {list(sample.columns)}")
    if len(sub) != len(sample) or not sub[id_col].equals(sample[id_col]):
        problems.append("ids differ from the sample submission's (count or order)")
    if sub.isna().any().any():
        problems.append("empty values")
    if fmt == "labels" and not sub[label_col].isin(classes).all():
        problems.append("labels outside the training classes")
    if fmt == "probs" and not np.allclose(sub[classes].sum(axis=1), 1.0, atol=1e-3):
        problems.append("class probabilities do not sum to 1")
    if problems:
        raise ValueError("submission check failed: " + "; ".join(problems))


def write_new(sub: pd.DataFrame, folder: Path, stem: str) -> Path:
    """Write to a fresh name (``stem.csv``, ``stem-1.csv``, …): never replace an earlier submission."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{stem}.{os.getpid()}.tmp"
    sub.to_csv(tmp, index=False)
    try:
        for n in range(1000):
            path = folder / (f"{stem}.csv" if n == 0 else f"{stem}-{n}.csv")
            try:
                os.link(tmp, path)  # atomic and fails if the name exists
                return path
            except FileExistsError:
                continue
        raise RuntimeError(f"no free submission name for {stem} in {folder}")
    finally:
        tmp.unlink(missing_ok=True)


def run(cfg: Config) -> Path:
    """Build, check and write the submission; return its path."""
    manifest = load_manifest(cfg.run_dir)
    root, classes = Path(manifest["root"]), manifest["classes"]
    id_col, label_col = manifest["id_col"], manifest["label_col"]
    sample_path = root / cfg.data.sample_submission
    if sample_path.is_file():
        sample = read_csv_text(sample_path, cfg.data.csv_encoding)
    else:  # ImageFolder layout: the submission format is id,label over the test folder
        ids = pd.read_csv(RunDir.of(cfg).index(manifest["test"]), dtype={"id": str}, **AS_WRITTEN)["id"]
        sample = pd.DataFrame({id_col: ids, label_col: ""})
    fmt = resolve_format(cfg.submit.format, sample, classes, id_col, label_col)
    sub = build_submission(predictions(cfg), sample, classes, id_col, label_col, fmt)
    validate(sub, sample, classes, id_col, label_col, fmt)
    path = write_new(sub, Path(cfg.submit.dir), f"{cfg.experiment}-{time.strftime('%Y%m%d-%H%M%S')}")
    log.info("submission written: %s (%d rows, %s)", path, len(sub), fmt)
    _score_against_solution(root / "solution.csv", sub, label_col, id_col, fmt, cfg.data.csv_encoding)
    return path


def _score_against_solution(path: Path, sub: pd.DataFrame, label_col: str, id_col: str, fmt: str,
                            encoding: str) -> None:
    if not path.is_file() or fmt != "labels":
        return
    truth = read_csv_text(path, encoding).set_index(id_col)[label_col]
    pred = sub.set_index(id_col)[label_col].astype(str)
    acc = float((truth.loc[pred.index] == pred).mean())
    log.info("test accuracy against %s: %.4f", path, acc)


def main(argv=None) -> int:
    result: dict = {}

    def _run(cfg: Config) -> Path:
        result["path"] = run(cfg)
        return result["path"]

    code = stage_main(_run, __doc__.splitlines()[0], argv)
    if code == 0:
        print(f"submission: {result['path']}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
