"""Figures derived from the scan table: class balance, image properties, colour statistics and drift.

Everything here is plain data (dicts of numbers and strings) so that it goes into ``eda.json`` as is;
the HTML report and the plots are drawn from the same dicts.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
from scipy.stats import ks_2samp

PERCENTILES = (0, 5, 25, 50, 75, 95, 100)
NUMERIC = ("width", "height", "aspect", "file_bytes", "brightness", "contrast", "mean_r", "mean_g", "mean_b")
DRIFT_FEATURES = ("brightness", "contrast", "mean_r", "mean_g", "mean_b", "aspect", "width", "height")
DRIFT_KS = 0.1  # flag a KS statistic above this (a size of effect: with 10⁴ images any tiny shift is "significant")
DRIFT_P = 0.01  # … when it is also significant (small test sets give large D by chance)
HIGH_DEPTH = ("I", "F")  # mode prefixes of 16/32-bit images


def class_counts(train: pd.DataFrame, classes: list[str]) -> dict:
    """Images per class (in ``classes`` order) and the imbalance ratio largest / smallest class."""
    counts = train["label"].value_counts().reindex(classes, fill_value=0)
    nonzero = counts[counts > 0]
    ratio = float(nonzero.max() / nonzero.min()) if len(nonzero) else None
    return {"counts": {str(k): int(v) for k, v in counts.items()}, "n_classes": len(classes),
            "imbalance_ratio": ratio, "largest": str(counts.idxmax()) if len(counts) else None,
            "smallest": str(counts.idxmin()) if len(counts) else None,
            "unlabelled": int(train["label"].isna().sum())}


def group_counts(train: pd.DataFrame) -> Optional[dict]:
    """Images per group (when a group column is set): how many groups, their sizes, the largest ones."""
    if "group" not in train.columns:
        return None
    sizes = train["group"].value_counts()
    labels_per_group = train.groupby("group")["label"].nunique()
    return {"n_groups": int(len(sizes)), "size": describe(sizes.to_numpy(dtype=float)),
            "largest": {str(k): int(v) for k, v in sizes.head(20).items()},
            "groups_with_several_labels": int((labels_per_group > 1).sum()),
            "size_hist": histogram(sizes.to_numpy(), np.array([]), bins=min(40, max(1, sizes.nunique())))}


def describe(values: np.ndarray) -> dict:
    """Count, mean and percentiles of the finite values."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return {"count": 0}
    pct = np.percentile(values, PERCENTILES)
    return {"count": int(len(values)), "mean": float(values.mean()),
            **{f"p{p}": float(v) for p, v in zip(PERCENTILES, pct)}}


def histogram(train: np.ndarray, test: np.ndarray, bins: int = 40) -> dict:
    """Counts of train and test on shared bin edges (so the two can be drawn on one axis)."""
    both = np.concatenate([train, test]).astype(float)
    both = both[np.isfinite(both)]
    if not len(both):
        return {"edges": [], "train": [], "test": []}
    lo, hi = float(both.min()), float(both.max())
    edges = np.linspace(lo, hi, bins + 1) if hi > lo else np.array([lo - 0.5, lo + 0.5])  # one value: one bar
    count = lambda v: np.histogram(v[np.isfinite(v)], edges)[0].tolist()  # noqa: E731
    return {"edges": edges.tolist(), "train": count(np.asarray(train, float)), "test": count(np.asarray(test, float))}


def categorical(frame: pd.DataFrame, column: str) -> dict:
    return {str(k): int(v) for k, v in frame[column].value_counts(dropna=False).items()}


def flagged(frame: pd.DataFrame) -> pd.DataFrame:
    """One row (split, id, path, flag, detail) per file behind a count of the report: unreadable, not plain
    RGB (grayscale, RGBA, CMYK, palette, …), 16/32-bit, EXIF-rotated, extension ≠ actual format."""
    ok = frame[frame["readable"]]
    ext = ok["path"].str.rsplit(".", n=1).str[-1].str.lower().replace({"jpg": "jpeg", "tif": "tiff"})
    parts = [(frame[~frame["readable"]], "unreadable", frame.loc[~frame["readable"], "error"]),
             (ok[ok["mode"] != "RGB"], "mode", ok.loc[ok["mode"] != "RGB", "mode"]),
             (ok[ok["mode"].str.startswith(HIGH_DEPTH)], "high_depth", ok["mode"]),
             (ok[ok["orientation"] != 1], "exif_rotated", "orientation " + ok["orientation"].astype(str)),
             (ok[ext != ok["format"].str.lower()], "extension_mismatch", "." + ext + " holds " + ok["format"])]
    rows = [rows[["split", "id", "path"]].assign(flag=flag, detail=detail.reindex(rows.index).astype(str))
            for rows, flag, detail in parts]
    return pd.concat(rows, ignore_index=True)


def split_properties(frame: pd.DataFrame, listed: int = 200) -> dict:
    """Per split: modes, formats, EXIF rotations, extension mismatches and numeric summaries, each count with
    the paths of (up to ``listed`` of) the files behind it."""
    ok = frame[frame["readable"]]
    flags = flagged(frame)
    paths = lambda flag: flags.loc[flags["flag"] == flag, "path"].head(listed).tolist()  # noqa: E731
    odd = flags[flags["flag"] == "mode"]
    rotated = ok[ok["orientation"] != 1]
    return {
        "images": int(len(frame)), "readable": int(len(ok)),
        "modes": categorical(ok, "mode"), "formats": categorical(ok, "format"),
        "mode_files": {m: g["path"].head(listed).tolist() for m, g in odd.groupby("detail")},
        "high_depth": int(ok["mode"].str.startswith(HIGH_DEPTH).sum()), "high_depth_files": paths("high_depth"),
        "exif_rotated": {"count": int(len(rotated)), "orientations": categorical(rotated, "orientation"),
                         "examples": rotated["id"].head(20).tolist(), "files": paths("exif_rotated")},
        "extension_mismatch": int((flags["flag"] == "extension_mismatch").sum()),
        "extension_mismatch_files": paths("extension_mismatch"),
        "summary": {col: describe(ok[col].to_numpy()) for col in NUMERIC},
    }


def channel_stats(frame: pd.DataFrame) -> dict:
    """Per-channel mean and std in [0, 1] over the readable images.

    Every image counts equally (the mean of per-image moments), as it does once training resizes all
    images to one size; std = sqrt(E[x²] − E[x]²) over all pixels of that mix.
    """
    ok = frame[frame["readable"]]
    if not len(ok):
        return {"mean": None, "std": None, "images": 0}
    mean = ok[["mean_r", "mean_g", "mean_b"]].mean().to_numpy()
    square = ok[["sq_r", "sq_g", "sq_b"]].mean().to_numpy()
    std = np.sqrt(np.maximum(square - mean ** 2, 0.0))
    return {"mean": [round(float(v), 4) for v in mean], "std": [round(float(v), 4) for v in std],
            "images": int(len(ok))}


def drift(train: pd.DataFrame, test: pd.DataFrame) -> dict:
    """Two-sample Kolmogorov–Smirnov statistic train vs test per feature; large D flags a shift."""
    out = {}
    for col in DRIFT_FEATURES:
        a, b = (f.loc[f["readable"], col].to_numpy(dtype=float) for f in (train, test))
        if len(a) and len(b):
            res = ks_2samp(a, b)
            out[col] = {"ks": round(float(res.statistic), 4), "p": float(res.pvalue),
                        "train_mean": float(a.mean()), "test_mean": float(b.mean()),
                        "shift": bool(res.statistic > DRIFT_KS and res.pvalue < DRIFT_P)}
    return out


def unreadable(frame: pd.DataFrame) -> list[dict]:
    """Every file that could not be decoded, with its split, id and the decoder's message."""
    bad = frame[~frame["readable"]]
    kind = np.where(bad["error"].str.contains("truncat", case=False), "truncated", "unreadable")
    return [{"split": r.split, "id": r.id, "path": r.path, "kind": k, "bytes": int(r.file_bytes), "error": r.error}
            for r, k in zip(bad.itertuples(), kind)]
