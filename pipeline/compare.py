"""Is one experiment's CV really better than another's? Row-by-row comparison of their out-of-fold predictions.

``python -m pipeline.compare runs/A runs/B,runs/B-seed7 ...`` scores every model on the same OOF rows (each run's
``oof_tta.csv``, else ``oof.csv``; ``--plain`` takes ``oof.csv``; a CSV path is read as it is). A model given as
several runs joined by commas (seeds of one recipe) scores the mean of its runs. Each model after the first is
compared with the first: the difference in ``--metric`` (accuracy, macro_f1 or log_loss) with a paired bootstrap
95% interval over rows (every model scored on the same resamples, so what both get right or wrong cancels), and
for accuracy between two single runs McNemar's exact test on the rows only one of them gets right. Two seeds of
one model differ by about half a point on 10,000 rows: a gap inside the interval is noise, whatever the
leaderboard of means says.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from pipeline.core.utils import setup_logging, write_json
from pipeline.data.contract import AS_WRITTEN
from pipeline.rundir import OOF_TABLES, run_oof


def oof_table(path: str | Path, plain: bool = False) -> pd.DataFrame:
    """A run's OOF table (id, label, fold, one probability column per class): its TTA one unless ``plain``."""
    path = Path(path)
    if path.is_dir():
        found = run_oof(path, plain)
        if found is None:
            names = OOF_TABLES[1:] if plain else OOF_TABLES
            raise FileNotFoundError(f"{path}: no {' or '.join(names)} (train and infer the run first)")
        path = found
    table = pd.read_csv(path, dtype={"id": str, "label": str}, **AS_WRITTEN)
    missing = {"id", "label"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: no column(s) {sorted(missing)}: not an OOF table")
    classes = [c for c in table.columns if c not in ("id", "label", "fold")]
    table = table.dropna(subset=classes)  # rows of folds not trained
    if table.empty:
        raise ValueError(f"{path}: no out-of-fold row has predictions")
    table.attrs["source"] = str(path)
    return table.set_index("id").sort_index()


METRICS = ("accuracy", "macro_f1", "log_loss")


def row_stats(table: pd.DataFrame, classes: list[str]) -> dict[str, np.ndarray]:
    """What every metric needs, per row: right or not, the negative log-probability of the label, and one-hot
    predicted and true classes (float32, for weighted sums over bootstrap resamples)."""
    probs = table[classes].to_numpy(dtype=np.float64)
    label = pd.Index(classes).get_indexer(table["label"])
    pred = probs.argmax(1)
    eye = np.eye(len(classes), dtype=np.float32)
    label_p = np.where(label >= 0, probs[np.arange(len(probs)), np.maximum(label, 0)], 0.0)
    return {"correct": (pred == label).astype(np.float32), "nll": -np.log(np.clip(label_p, 1e-15, 1.0)),
            "pred": eye[pred], "true": np.where(label[:, None] >= 0, eye[np.maximum(label, 0)], 0.0)}


def weighted_metric(metric: str, rows: dict[str, np.ndarray], weights: np.ndarray) -> np.ndarray:
    """``metric`` under each row of ``weights`` (resample counts per OOF row; all ones: the plain score)."""
    total = weights.sum(1)
    if metric == "accuracy":
        return weights @ rows["correct"] / total
    if metric == "log_loss":
        return weights @ rows["nll"] / total
    tp, pred, true = weights @ (rows["pred"] * rows["true"]), weights @ rows["pred"], weights @ rows["true"]
    both = pred + true  # macro-F1 over the classes true or predicted in the resample, as scikit-learn's
    f1 = np.divide(2 * tp, both, out=np.zeros_like(both), where=both > 0)
    return f1.sum(1) / np.maximum((both > 0).sum(1), 1)


def resample_weights(n: int, n_boot: int, seed: int, chunk: int = 200):
    """Bootstrap resamples of ``n`` rows as count matrices (chunk × n), ``n_boot`` in all."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        picks = rng.integers(0, n, (m, n)) + n * np.arange(m)[:, None]
        yield np.bincount(picks.ravel(), minlength=m * n).reshape(m, n).astype(np.float32)


def model_tables(runs: Sequence[str], plain: bool) -> list[pd.DataFrame]:
    """A model's OOF tables, one per run (seed); its runs must hold the same rows and labels."""
    tables = [oof_table(run, plain) for run in runs]
    for table in tables[1:]:
        if not table.index.equals(tables[0].index) or not table["label"].equals(tables[0]["label"]):
            raise ValueError(f"{table.attrs['source']} and {tables[0].attrs['source']} hold other rows or labels: "
                             "seeds of one model must be scored on the same OOF rows")
    return tables


def shared_rows(models: Sequence[Sequence[str]], tables: list[list[pd.DataFrame]]) -> pd.Index:
    """The ids every model predicted, refused when two models label them differently or score other classes."""
    shared = tables[0][0].index
    for model in tables[1:]:
        shared = shared.intersection(model[0].index)
    if len(shared) == 0:
        raise ValueError("the models share no out-of-fold row")
    first = tables[0][0]
    for model, runs in zip(tables[1:], models[1:]):
        if not model[0]["label"].reindex(shared).equals(first["label"].reindex(shared)):
            raise ValueError(f"{','.join(runs)} labels rows differently from {','.join(models[0])}: not the same "
                             "competition (or a label was fixed: compare runs trained on the same train.csv)")
        if set(model[0].columns) != set(first.columns):
            raise ValueError(f"{','.join(runs)} scores other classes than {','.join(models[0])}")
    return shared


def compare(models: Sequence[Sequence[str]], plain: bool = False, n_boot: int = 10000, seed: int = 0,
            metric: str = "accuracy") -> dict:
    """Every model's OOF ``metric`` (the mean over its runs, with a bootstrap interval) and each later model
    against the first on the rows they share, every model scored on the same resamples."""
    if metric not in METRICS:
        raise ValueError(f"metric: {metric!r} is not one of {list(METRICS)}")
    tables = [model_tables(runs, plain) for runs in models]
    shared = shared_rows(models, tables)
    classes = [c for c in tables[0][0].columns if c not in ("label", "fold")]
    stats = [[row_stats(t.loc[shared], classes) for t in model] for model in tables]

    def value(k: int, weights: np.ndarray) -> np.ndarray:
        return np.mean([weighted_metric(metric, rows, weights) for rows in stats[k]], axis=0)

    chunks = [[value(k, w) for k in range(len(models))] for w in resample_weights(len(shared), n_boot, seed)]
    boots = [np.concatenate([chunk[k] for chunk in chunks]) for k in range(len(models))]  # per model, per resample
    ones = np.ones((1, len(shared)), dtype=np.float32)
    report = {"rows": int(len(shared)), "metric": metric, "oof": "plain" if plain else "tta (else plain)",
              "models": []}
    for k, runs in enumerate(models):
        entry = {"model": ",".join(runs), "runs": len(runs), metric: float(value(k, ones)[0]),
                 "ci95": interval(boots[k])}
        if k:
            entry["vs_first"] = {"difference": entry[metric] - report["models"][0][metric],
                                 "ci95": interval(boots[k] - boots[0])}
            if metric == "accuracy" and len(runs) == 1 and len(models[0]) == 1:
                entry["vs_first"].update(mcnemar(stats[0][0]["correct"], stats[k][0]["correct"]))
        report["models"].append(entry)
    return report


def interval(values: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval of bootstrap values."""
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def mcnemar(first: np.ndarray, this: np.ndarray) -> dict:
    """McNemar's exact test on the rows exactly one of two single runs gets right."""
    only_this, only_first = int((this > first).sum()), int((this < first).sum())
    p = binomtest(only_this, only_this + only_first).pvalue if only_this + only_first else 1.0
    return {"only_this_right": only_this, "only_first_right": only_first, "mcnemar_p": float(p)}


def lines(report: dict) -> list[str]:
    """The report as a short table, one line per model (differences in points, log loss as it is)."""
    metric = report["metric"]
    scale, unit, digits = (1, "", 4) if metric == "log_loss" else (100, " points", 2)
    out = [f"{report['rows']} shared OOF rows ({report['oof']}), {metric}; 95% intervals: bootstrap over rows"]
    for m in report["models"]:
        line = f"{m['model']}: {metric} {m[metric]:.4f} [{m['ci95'][0]:.4f}, {m['ci95'][1]:.4f}]"
        if "vs_first" in m:
            v = m["vs_first"]
            line += (f"; vs the first {scale * v['difference']:+.{digits}f}{unit} [{scale * v['ci95'][0]:+.{digits}f}, "
                     f"{scale * v['ci95'][1]:+.{digits}f}]")
            if "mcnemar_p" in v:
                line += (f", McNemar p {v['mcnemar_p']:.3g} ({v['only_this_right']} rows only it gets right, "
                         f"{v['only_first_right']} only the first)")
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
    parser.add_argument("--metric", choices=METRICS, default="accuracy")
    parser.add_argument("--out", help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if len(args.models) < 2:
        parser.error("give at least two models to compare")
    report = compare([m.split(",") for m in args.models], args.plain, args.bootstrap, args.seed, args.metric)
    if args.out:
        write_json(Path(args.out), report)
    print("\n".join(lines(report)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
