"""EDA stage: scan every train and test image once and write a self-contained HTML report + eda.json.

``python -m pipeline.eda --config CONFIG [--set …] [--force]`` writes into
``<eda.out_dir>/<experiment>/eda/`` (:class:`~pipeline.rundir.ReportDir`): ``index.html`` (opens from disk;
plots are embedded PNGs), ``eda.json`` (every number in the page, the suggestions, and ``normalization`` for
the train stage) and ``duplicate_groups.csv`` (each image in an exact/near duplicate group; ``dup_group`` is a
CV group id) and ``image_flags.csv`` (every file behind a count: unreadable, not plain RGB, 16/32-bit,
EXIF-rotated, extension ≠ format; the log names them too).
The data folder is only read. A rerun with the same files (names, sizes, mtimes) and settings is skipped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from pipeline.cli import build_parser, stage_main
from pipeline.core.config import Config
from pipeline.data.contract import Competition, group_candidates, load_competition
from pipeline.core.utils import read_json, write_csv, write_json, write_text
from pipeline.eda import dups, plots, sections, stats, suggest
from pipeline.eda.report import page
from pipeline.eda.scan import default_workers, scan_paths
from pipeline.rundir import ReportDir

log = logging.getLogger(__name__)

EDA_VERSION = 4  # bump when the report changes, so that up-to-date checks rerun
MAX_LISTED = 200  # duplicate groups listed per kind in eda.json (counts are always exact)


@dataclass
class EdaResult:
    """What the stage wrote (the page and ``eda.json``), the summary numbers, and whether it was up to date."""
    html: Path
    json: Path
    summary: dict
    skipped: bool = False


def image_table(comp: Competition) -> pd.DataFrame:
    """Train and test rows that have an image: split, id, label (None for test), path."""
    train = comp.train.assign(split="train")[["split", "id", "label", "path"]]
    test = comp.test.assign(split="test", label=None)[["split", "id", "label", "path"]]
    frame = pd.concat([train, test], ignore_index=True)
    return frame[frame["path"].notna()].reset_index(drop=True)


def signature(cfg: Config, comp: Competition, frame: pd.DataFrame) -> str:
    """Hash of the settings and of every input file's name, size and mtime (what the report depends on)."""
    digest = hashlib.sha256(json.dumps([EDA_VERSION, dataclasses.asdict(cfg.data), dataclasses.asdict(cfg.eda),
                                        cfg.seed], sort_keys=True, default=str).encode())
    csvs = [comp.root / cfg.data.train_csv, comp.root / cfg.data.sample_submission]
    for path in [*map(str, csvs), *frame["path"]]:
        try:
            st = os.stat(path)
            digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()


def scan(frame: pd.DataFrame, workers: int, max_pixels: Optional[int] = None) -> pd.DataFrame:
    """``frame`` plus the per-image measurements of :mod:`.scan` (one parallel pass per split); images over
    ``max_pixels`` are listed as unreadable, undecoded."""
    parts = [scan_paths(frame.loc[frame["split"] == s, "path"].tolist(), workers, desc=f"eda scan {s}",
                        max_pixels=max_pixels) for s in ("train", "test")]
    measured = pd.concat(parts, ignore_index=True).drop(columns="path")
    frame = pd.concat([frame, measured], axis=1)  # image_table lists train first, then test
    frame["aspect"] = frame["width"] / frame["height"].where(frame["height"] > 0)
    frame.loc[~frame["readable"], "aspect"] = np.nan
    return frame


def sample_ids(frame: pd.DataFrame, classes: list[str], cfg: Config) -> dict:
    """A fixed random choice of readable images per class (up to eda.max_classes_in_grid) and of test."""
    ok = frame[frame["readable"]]
    n = cfg.eda.samples_per_class

    def pick(rows: pd.DataFrame) -> list[str]:
        return rows.sample(min(len(rows), n), random_state=cfg.seed)["id"].tolist()

    train = ok[ok["split"] == "train"]
    return {"train": {c: pick(train[train["label"] == c]) for c in classes[: cfg.eda.max_classes_in_grid]},
            "test": pick(ok[ok["split"] == "test"])}


def build_report(cfg: Config, comp: Competition, frame: pd.DataFrame) -> tuple[dict, pd.DataFrame]:
    """Every figure of the report as plain data, plus the duplicate-group table."""
    train, test = frame[frame["split"] == "train"], frame[frame["split"] == "test"]
    duplicates, groups = dups.analyse(frame, cfg.eda.near_dup_threshold, cfg.eda.near_dup_min_corr, MAX_LISTED)
    channels = {"train": stats.channel_stats(train), "test": stats.channel_stats(test)}
    bad = stats.unreadable(frame)
    report = {
        "version": EDA_VERSION, "experiment": cfg.experiment, "data_root": str(comp.root),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "counts": {"train": len(comp.train), "test": len(comp.test), "classes": len(comp.classes)},
        "problems": list(comp.problems),
        "classes": stats.class_counts(comp.train, comp.classes), "groups": stats.group_counts(comp.train),
        "group_candidates": [] if comp.group_col else group_candidates(comp, cfg.folds.n_splits),
        "images": {"train": stats.split_properties(train, MAX_LISTED), "test": stats.split_properties(test, MAX_LISTED)},
        "histograms": {c: stats.histogram(train.loc[train.readable, c].to_numpy(float),
                                          test.loc[test.readable, c].to_numpy(float)) for c in stats.NUMERIC},
        "channels": channels,
        "normalization": {"mean": channels["train"]["mean"], "std": channels["train"]["std"]},
        "drift": stats.drift(train, test),
        "unreadable": {"train": sum(b["split"] == "train" for b in bad),
                       "test": sum(b["split"] == "test" for b in bad), "files": bad},
        "duplicates": duplicates,
        "samples": sample_ids(frame, comp.classes, cfg),
    }
    report["suggestions"] = suggest.suggestions(report, cfg)
    return report, groups


def _dup_rows(listed: list[dict]) -> list:
    return [(", ".join(g["flags"]), [(m["path"], f"{m['split']}" + (f":{m['label']}" if m["label"] else "")
                                      + f"\n{m['id'][:14]}")
                                     for m in g["members"][:6]]) for g in listed[:6]]


def draw_figures(report: dict, frame: pd.DataFrame) -> dict[str, str]:
    """All plots as base64 PNGs, keyed by name."""
    hists, cls = report["histograms"], report["classes"]
    figs = {"classes": plots.class_bars(cls["counts"], cls["imbalance_ratio"]),
            "geometry": plots.train_test_hists({k: hists[k] for k in ("width", "height", "aspect", "file_bytes")},
                                               {"file_bytes": "file size (bytes)", "aspect": "aspect (w/h)"}),
            "colour": plots.train_test_hists({k: hists[k] for k in ("brightness", "contrast", "mean_r", "mean_g",
                                                                    "mean_b")},
                                             {"brightness": "brightness (mean luma)", "contrast": "contrast (luma std)",
                                              "mean_r": "red mean", "mean_g": "green mean", "mean_b": "blue mean"})}
    if report["groups"]:
        figs["groups"] = plots.group_sizes(report["groups"]["size_hist"])
    path_of = dict(zip(zip(frame["split"], frame["id"]), frame["path"]))
    rows = [(f"{c} ({cls['counts'].get(c, 0):,})", [(path_of["train", i], i[:14]) for i in ids])
            for c, ids in report["samples"]["train"].items()]
    rows.append(("test", [(path_of["test", i], i[:14]) for i in report["samples"]["test"]]))
    figs["samples"] = plots.thumb_grid(rows)
    for kind in ("exact", "near"):
        if report["duplicates"][kind]["listed"]:
            figs[f"dups_{kind}"] = plots.thumb_grid(_dup_rows(report["duplicates"][kind]["listed"]))
    return figs


def summarize(report: dict) -> dict:
    """The handful of numbers a caller (or ./run.sh) wants to see."""
    d = report["duplicates"]
    return {"train": report["counts"]["train"], "test": report["counts"]["test"],
            "classes": report["counts"]["classes"], "imbalance_ratio": report["classes"]["imbalance_ratio"],
            "unreadable": len(report["unreadable"]["files"]), "problems": len(report["problems"]),
            "exact_duplicate_groups": d["exact"]["groups"], "near_duplicate_pairs": d["near"]["pairs"],
            "train_test_leaked_test_images": d["any"]["train_test"]["test_images"],
            "conflicting_label_groups": d["any"]["conflicting_labels"]["groups"],
            "normalization": report["normalization"]}


def log_flagged(problems: list[str], flags: pd.DataFrame, csv_path: Path, shown: int = 20) -> None:
    """Name in the log the files behind the report's warnings (all of them are in ``csv_path``)."""
    if problems:
        log.warning("EDA: %d data-contract problem(s):\n  %s", len(problems), "\n  ".join(problems[:shown]))
    for flag, rows in flags.groupby("flag", sort=False):
        lines = [f"{r.path} ({r.detail})" for r in rows.head(shown).itertuples()]
        more = f"\n  … and {len(rows) - shown} more" if len(rows) > shown else ""
        (log.warning if flag == "unreadable" else log.info)(
            "EDA: %d %s file(s) (all in %s):\n  %s%s", len(rows), flag.replace("_", " "), csv_path,
            "\n  ".join(lines), more)


def _up_to_date(json_path: Path, html_path: Path, sig: str) -> Optional[dict]:
    """The previous report when it was made from the same inputs and settings, else None."""
    if not (json_path.is_file() and html_path.is_file()):
        return None
    try:
        prior = read_json(json_path)
    except (OSError, ValueError):
        return None
    return prior if prior.get("signature") == sig else None


def run(cfg: Config, force: bool = False) -> EdaResult:
    """Scan the competition at ``cfg.data.root`` and write the EDA report (skipped when up to date)."""
    if not 0 <= cfg.eda.near_dup_threshold < 64:
        raise ValueError(f"eda.near_dup_threshold must be in [0, 63], got {cfg.eda.near_dup_threshold}")
    start = time.perf_counter()
    comp = load_competition(cfg.data)
    frame = image_table(comp)
    reports = ReportDir.of(cfg)
    json_path, html_path = reports.eda_json, reports.eda_page
    sig = signature(cfg, comp, frame)
    prior = None if force else _up_to_date(json_path, html_path, sig)
    if prior is not None:
        log.info("EDA is up to date: %s (use --force to redo)", html_path)
        return EdaResult(html_path, json_path, summarize(prior), skipped=True)
    n_train = int((frame["split"] == "train").sum())
    log.info("EDA of %s: %d train + %d test images", comp.root, n_train, len(frame) - n_train)
    frame = scan(frame, default_workers(), cfg.data.max_pixels)
    report, groups = build_report(cfg, comp, frame)
    figs = draw_figures(report, frame)
    report["signature"], report["elapsed_s"] = sig, round(time.perf_counter() - start, 2)
    subtitle = (f"{comp.root} · {report['counts']['train']:,} train / {report['counts']['test']:,} test images · "
                f"generated {report['created']} in {report['elapsed_s']:.1f} s")
    write_csv(reports.duplicate_groups, groups)
    flags = stats.flagged(frame)
    write_csv(reports.image_flags, flags)
    log_flagged(report["problems"], flags, reports.image_flags)
    write_json(json_path, report)
    write_text(html_path, page(f"EDA — {cfg.experiment}", subtitle, sections.build(report, figs)))
    summary = summarize(report)
    log.info("EDA written to %s in %.1f s: %s", html_path, report["elapsed_s"], json.dumps(summary))
    return EdaResult(html_path, json_path, summary)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m pipeline.eda``: the stage's command line, with ``--force`` to rescan an up-to-date report."""
    parser = build_parser(__doc__.splitlines()[0])
    parser.prog = "python -m pipeline.eda"
    parser.add_argument("--force", action="store_true", help="rescan even when the report is up to date")
    force = parser.parse_known_args(argv)[0].force

    def eda(cfg: Config) -> EdaResult:
        return run(cfg, force=force)

    return stage_main(eda, __doc__.splitlines()[0], argv, parser)
