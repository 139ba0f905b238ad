"""The search's chart: searched models against well-known networks at equal training, read from run folders.

The search exports ``search/chart/``: a config per searched model on the re-ranked front (``trial<N>.yaml``)
and per ``search.references`` entry (``ref-<label>.yaml``), each the study's training config (data, folds,
epochs, recipe) with only the model changed. Once ``./run.sh full`` has trained them,
``python -m pipeline.search.report --chart runs/<experiment>/search`` reads their run folders (and any other
``--runs``) and writes ``chart.png`` (parameters on a log axis against K-fold OOF accuracy with TTA),
``chart.csv`` and ``chart.md``: parameters, MACs and 1-thread CPU latency per image, measured here, beside
each model's OOF scores and training minutes. Configs not trained yet are listed with their command.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pipeline.core.config import Config, load_config
from pipeline.core.utils import read_json, write_csv, write_json, write_text
from pipeline.models.factory import create_model, model_costs
from pipeline.report.figures import save_png
from pipeline.rundir import RunDir, SearchDir, load_manifest, read_cv

log = logging.getLogger(__name__)

COLUMNS = ("kind", "model", "params", "macs", "latency_ms", "oof_accuracy", "oof_accuracy_tta", "macro_f1_tta",
           "train_minutes", "epochs", "folds", "rows", "run")


def run_row(cfg: Config, run_dir: Path, name: str, latency: bool = True) -> Optional[dict]:
    """A finished run's chart row (None while any fold is missing): the model's costs at the run's image size
    and the OOF scores, with TTA where infer scored it."""
    cv = read_cv(run_dir)
    if "oof" not in cv or cv.get("scored_rows") != cv.get("total_rows"):
        return None
    classes = load_manifest(run_dir)["classes"]
    costs = model_costs(create_model(cfg.model, len(classes)), cfg.data.image_size, latency)
    tta = cv.get("oof_tta", cv["oof"])
    seconds = sum(read_json(m.result).get("seconds", 0.0) for m in RunDir(run_dir).fold_models()
                  if m.result.is_file())
    return {"kind": "searched" if cfg.model.name == "spec" else "reference", "model": name, **costs,
            "oof_accuracy": cv["oof"]["accuracy"], "oof_accuracy_tta": tta["accuracy"],
            "macro_f1_tta": tta["macro_f1"], "train_minutes": round(seconds / 60, 2), "epochs": cfg.train.epochs,
            "folds": cfg.folds.n_splits, "rows": cv["total_rows"], "run": str(run_dir)}


def chart_table(search: SearchDir, runs: Sequence[str | Path] = (), latency: bool = True) -> tuple[pd.DataFrame,
                                                                                                   list[str]]:
    """The chart's rows (``search/chart/*.yaml`` trained, then each of ``runs``) by parameters, and the commands
    that train the configs without a finished run folder yet."""
    rows, missing = [], []
    for path in sorted(search.chart.glob("*.yaml")):
        cfg = load_config(path)
        row = run_row(cfg, Path(cfg.run_dir), path.stem.removeprefix("ref-"), latency)
        if row is None:
            missing.append(f"./run.sh full {path}")
        else:
            rows.append(row)
    for run in runs:
        cfg = load_config(RunDir(run).config)
        row = run_row(cfg, Path(run), Path(run).name, latency)
        if row is None:
            raise ValueError(f"{run}: no finished K-fold OOF table (cv.json); train every fold first")
        rows.append(row)
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    return table.sort_values("params").reset_index(drop=True), missing


def plot_chart(table: pd.DataFrame, path: Path, title: str) -> None:
    """Parameters (log) against OOF accuracy with TTA: the searched models with their front as a step line,
    each reference a labelled star."""
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    searched = table[table["kind"] == "searched"].sort_values("params")
    if len(searched):
        best = searched["oof_accuracy_tta"].cummax()
        front = searched[searched["oof_accuracy_tta"] >= best]
        ax.step(front["params"], front["oof_accuracy_tta"], where="post", color="crimson", lw=1.2,
                label="searched front")
        ax.scatter(searched["params"], searched["oof_accuracy_tta"], color="crimson", s=28, zorder=3,
                   label="searched")
    for _, row in table.iterrows():
        reference = row["kind"] == "reference"
        if reference:
            ax.scatter(row["params"], row["oof_accuracy_tta"], marker="*", s=150, color="black", zorder=3)
        ax.annotate(row["model"], (row["params"], row["oof_accuracy_tta"]), textcoords="offset points",
                    xytext=(6, -4 if reference else 5), fontsize=8, color="black" if reference else "crimson")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("K-fold OOF accuracy with TTA")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(searched):
        ax.legend(loc="best")
    save_png(fig, path)


def spread(table: pd.DataFrame, column: str) -> str:
    """A column's value where every model shares it (equal training), else its values joined by '/'."""
    return "/".join(f"{v:,}" for v in sorted(set(table[column])))


def markdown(table: pd.DataFrame) -> str:
    """The table as Markdown, parameters and MACs in thousands and millions."""
    lines = ["| model | kind | params | MACs | CPU latency (ms/img) | OOF acc | OOF acc, TTA | macro-F1, TTA "
             "| train min |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for _, r in table.iterrows():
        latency = "" if pd.isna(r["latency_ms"]) else f"{r['latency_ms']:.2f}"
        lines.append(f"| {r['model']} | {r['kind']} | {r['params'] / 1e3:,.0f}k | {r['macs'] / 1e6:.1f}M "
                     f"| {latency} | {r['oof_accuracy']:.4f} | {r['oof_accuracy_tta']:.4f} "
                     f"| {r['macro_f1_tta']:.4f} | {r['train_minutes']:.1f} |")
    return "\n".join(lines) + "\n"


def write_chart(search_dir: str | Path, runs: Sequence[str | Path] = (), out: Optional[str | Path] = None,
                latency: bool = True) -> dict:
    """Draw the chart of a search folder's exported models (and ``runs``) into ``out`` (default
    ``search/chart/``): ``chart.png``, ``chart.csv``, ``chart.md``, ``chart.json``. Returns the JSON."""
    search = SearchDir(Path(search_dir))
    table, missing = chart_table(search, runs, latency)
    for command in missing:
        log.warning("not trained yet, left off the chart: %s", command)
    if table.empty:
        raise ValueError(f"{search_dir}: no trained model to chart; train the configs in {search.chart} first")
    folder = Path(out) if out else search.chart
    folder.mkdir(parents=True, exist_ok=True)
    plot_chart(table, folder / "chart.png", f"{len(table)} models: {spread(table, 'folds')}-fold OOF, "
                                            f"{spread(table, 'epochs')} epochs, {spread(table, 'rows')} images")
    write_csv(folder / "chart.csv", table)
    write_text(folder / "chart.md", markdown(table))
    summary = {"rows": table.replace({np.nan: None}).to_dict("records"), "not_trained": missing}
    write_json(folder / "chart.json", summary)
    log.info("chart of %d models → %s (%d configs not trained yet)", len(table), folder / "chart.png", len(missing))
    return summary
