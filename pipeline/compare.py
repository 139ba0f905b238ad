"""Is one experiment's CV really better than another's? Row-by-row comparison of their out-of-fold predictions.

``python -m pipeline.compare runs/A runs/B,runs/B-seed7 ...`` scores every model on the same OOF rows (each run's
``oof_tta.csv``, else ``oof.csv``; ``--plain`` takes ``oof.csv``; a CSV path is read as it is). A model given as
several runs joined by commas (seeds of one recipe) scores the mean of its runs, row by row. Each model after the
first is compared with the first: the accuracy difference with a paired bootstrap 95% interval over rows (the
rows resampled together, so what both get right or wrong cancels), and for two single runs McNemar's exact test
on the rows only one of them gets right. Two seeds of one model differ by about half a point on 10,000 rows:
a gap inside the interval is noise, whatever the leaderboard of means says.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from .utils import setup_logging, write_json


def oof_table(path: str | Path, plain: bool = False) -> pd.DataFrame:
    """A run's OOF table (id, label, fold, one probability column per class): its TTA one unless ``plain``."""
    path = Path(path)
    if path.is_dir():
        names = ["oof.csv"] if plain else ["oof_tta.csv", "oof.csv"]
        found = [path / n for n in names if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: no {' or '.join(names)} (train and infer the run first)")
        path = found[0]
    table = pd.read_csv(path, dtype={"id": str, "label": str})
    missing = {"id", "label"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: no column(s) {sorted(missing)}: not an OOF table")
    classes = [c for c in table.columns if c not in ("id", "label", "fold")]
    table = table.dropna(subset=classes)  # rows of folds not trained
    if table.empty:
        raise ValueError(f"{path}: no out-of-fold row has predictions")
    table.attrs["source"] = str(path)
    return table.set_index("id").sort_index()


def correct(table: pd.DataFrame) -> pd.Series:
    """1.0 where the OOF arg-max is the label, per id."""
    probs = table.drop(columns=[c for c in ("label", "fold") if c in table.columns])
    return pd.Series(probs.to_numpy().argmax(1) == probs.columns.get_indexer(table["label"]), index=table.index,
                     dtype=float)


def model_rows(runs: Sequence[str], plain: bool) -> tuple[pd.Series, pd.Series]:
    """A model's per-row correctness (the mean over its runs) and its labels; its runs must hold the same rows."""
    tables = [oof_table(run, plain) for run in runs]
    for table in tables[1:]:
        if not table.index.equals(tables[0].index) or not table["label"].equals(tables[0]["label"]):
            raise ValueError(f"{table.attrs['source']} and {tables[0].attrs['source']} hold other rows or labels: "
                             "seeds of one model must be scored on the same OOF rows")
    return pd.concat([correct(t) for t in tables], axis=1).mean(axis=1), tables[0]["label"]


def paired_interval(diff: np.ndarray, n_boot: int, seed: int, chunk: int = 500) -> tuple[float, float]:
    """The 95% percentile interval of the mean of ``diff`` over bootstrap resamples of its rows."""
    rng = np.random.default_rng(seed)
    means = np.concatenate([diff[rng.integers(0, len(diff), (min(chunk, n_boot - i), len(diff)))].mean(1)
                            for i in range(0, n_boot, chunk)])
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def compare(models: Sequence[Sequence[str]], plain: bool = False, n_boot: int = 10000, seed: int = 0) -> dict:
    """Every model's OOF accuracy (with its own bootstrap interval) and each later model against the first on
    the rows they share."""
    scored = [model_rows(runs, plain) for runs in models]
    shared = scored[0][0].index
    for rows, _ in scored[1:]:
        shared = shared.intersection(rows.index)
    if len(shared) == 0:
        raise ValueError("the models share no out-of-fold row")
    for (_, labels), runs in zip(scored[1:], models[1:]):
        if not labels.reindex(shared).equals(scored[0][1].reindex(shared)):
            raise ValueError(f"{','.join(runs)} labels rows differently from {','.join(models[0])}: not the same "
                             "competition (or a label was fixed: compare runs trained on the same train.csv)")
    base = scored[0][0].reindex(shared).to_numpy()
    report = {"rows": int(len(shared)), "oof": "plain" if plain else "tta (else plain)", "models": []}
    for k, ((rows, _), runs) in enumerate(zip(scored, models)):
        acc = rows.reindex(shared).to_numpy()
        entry = {"model": ",".join(runs), "runs": len(runs), "accuracy": float(acc.mean()),
                 "ci95": paired_interval(acc, n_boot, seed)}
        if k:
            diff = acc - base
            entry["vs_first"] = {"difference": float(diff.mean()), "ci95": paired_interval(diff, n_boot, seed)}
            if len(runs) == 1 and len(models[0]) == 1:
                only_this, only_first = int((diff > 0).sum()), int((diff < 0).sum())
                entry["vs_first"].update(only_this_right=only_this, only_first_right=only_first,
                                         mcnemar_p=binomtest(only_this, only_this + only_first).pvalue
                                         if only_this + only_first else 1.0)
        report["models"].append(entry)
    return report


def lines(report: dict) -> list[str]:
    """The report as a short table, one line per model."""
    out = [f"{report['rows']} shared OOF rows ({report['oof']}); 95% intervals: bootstrap over rows"]
    for m in report["models"]:
        line = f"{m['model']}: accuracy {m['accuracy']:.4f} [{m['ci95'][0]:.4f}, {m['ci95'][1]:.4f}]"
        if "vs_first" in m:
            v = m["vs_first"]
            line += f"; vs the first {100 * v['difference']:+.2f} points [{100 * v['ci95'][0]:+.2f}, " \
                    f"{100 * v['ci95'][1]:+.2f}]"
            if "mcnemar_p" in v:
                line += f", McNemar p {v['mcnemar_p']:.3g} ({v['only_this_right']} rows only it gets right, " \
                        f"{v['only_first_right']} only the first)"
        out.append(line)
    return out


def main(argv=None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", metavar="RUN[,RUN...]",
                        help="run folders or OOF CSVs; runs joined by commas are seeds of one model")
    parser.add_argument("--plain", action="store_true", help="oof.csv (without TTA) instead of oof_tta.csv")
    parser.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples (default 10000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if len(args.models) < 2:
        parser.error("give at least two models to compare")
    report = compare([m.split(",") for m in args.models], args.plain, args.bootstrap, args.seed)
    if args.out:
        write_json(Path(args.out), report)
    print("\n".join(lines(report)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
