"""Results stage: ``reports/<experiment>/results/index.html``, the page that says how good the model is and where.

``python -m pipeline.results --config CONFIG`` reads the run folder's out-of-fold predictions (the ensemble's
nested ``ensemble_oof.csv`` when this run ensembled, else ``oof_tta.csv``, else ``oof.csv``) and draws, in the
EDA page's style: CV per fold and overall, per-class precision/recall, the confusion matrix, the most
confidently wrong OOF images as thumbnails, calibration (reliability diagram, ECE), the auto-TTA choice, for
an ensemble each member's weight, own score and contribution (the score without it), and for a run planned by
``recipe: auto`` the plan (``plan.json``: each member's estimated and actual minutes and OOF score).
``results.json`` beside the page holds the same numbers.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from pipeline.cli import stage_main
from pipeline.core.config import Config
from pipeline.core.utils import read_json, write_json, write_text
from pipeline.data.cache import gather
from pipeline.data.contract import AS_WRITTEN
from pipeline.evaluation.metrics import score
from pipeline.report.figures import confusion_figure, reliability_figure, thumbs_figure
from pipeline.report.webpage import esc, figure, fmt, page, png_base64, section, table
from pipeline.rundir import ReportDir, RunDir, load_manifest, load_split, read_cv

log = logging.getLogger(__name__)

NAV = [("cv", "CV"), ("classes", "Per class"), ("confusion", "Confusion"), ("wrong", "Confidently wrong"),
       ("calibration", "Calibration"), ("tta", "TTA"), ("ensemble", "Ensemble"), ("plan", "Plan")]


def oof_source(run: RunDir) -> Path:
    """The ensemble's nested OOF when this run ensembled several experiments, calibrated its probabilities or is
    an ensemble config's (no OOF of its own), else its own (TTA) OOF."""
    report = read_json(run.ensemble_json) if run.ensemble_json.is_file() else None
    ensembled = report is not None and (len(report["members"]) > 1 or "calibration" in report
                                        or not run.oof.is_file())
    if ensembled and run.ensemble_oof.is_file():
        return run.ensemble_oof
    found = run.oof_table()
    if found is None:
        raise FileNotFoundError(f"no OOF predictions in {run} (oof.csv): run the train stage first")
    return found


def _scores(labels: np.ndarray, probs: np.ndarray, folds: np.ndarray) -> dict:
    return {"overall": score(labels, probs),
            "folds": {int(f): score(labels[folds == f], probs[folds == f]) for f in np.unique(folds)}}


def cv_section(source: Path, scores: dict, cv: dict) -> str:
    rows = [[f"fold {f}", s["accuracy"], s["macro_f1"], s["log_loss"], s["n"]] for f, s in scores["folds"].items()]
    o = scores["overall"]
    rows.append(["overall", o["accuracy"], o["macro_f1"], o["log_loss"], o["n"]])
    body = f"<p>Out-of-fold predictions from <code>{esc(source.name)}</code>.</p>"
    body += table(["", "accuracy", "macro-F1", "log loss", "images"], rows)
    if cv.get("oof"):
        plain, tta = cv["oof"], cv.get("oof_tta")
        extra = [["single view (oof.csv)", plain["accuracy"], plain["log_loss"]]]
        if tta:
            extra.append([f"TTA {' + '.join(tta['tta'])} (oof_tta.csv)", tta["accuracy"], tta["log_loss"]])
        body += "<h3>This experiment's models</h3>" + table(["", "accuracy", "log loss"], extra)
    return section("cv", "Cross-validation", body)


def class_section(labels: np.ndarray, preds: np.ndarray, classes: list[str]) -> tuple[str, list[dict]]:
    p, r, f, n = precision_recall_fscore_support(labels, preds, labels=np.arange(len(classes)), zero_division=0)
    rows = [{"class": c, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(n[i])}
            for i, c in enumerate(classes)]
    worst = sorted(rows, key=lambda row: row["f1"])
    body = table(["class", "precision", "recall", "F1", "images"], [list(row.values()) for row in worst], 60,
                 source="results.json")
    return section("classes", "Per class (worst F1 first)", body), rows


def wrong_section(images: np.ndarray, rows: np.ndarray, labels: np.ndarray, probs: np.ndarray, classes: list[str],
                  ids: np.ndarray, n: int = 24) -> tuple[str, list[dict]]:
    """Thumbnails (from the cache: ``rows`` are the cache rows of the scored images) of the wrong OOF
    predictions with the highest confidence."""
    preds = probs.argmax(1)
    wrong = np.flatnonzero(preds != labels)
    worst = wrong[np.argsort(-probs[wrong, preds[wrong]])][:n]
    items = [{"id": str(ids[i]), "label": classes[labels[i]], "predicted": classes[preds[i]],
              "confidence": float(probs[i, preds[i]])} for i in worst]
    if not len(worst):
        return section("wrong", "Most confidently wrong", "<p class='ok'>No OOF image is wrong.</p>"), items
    captions = [f"{it['id']}\n{it['label']}→{it['predicted']} {it['confidence']:.2f}" for it in items]
    grid = png_base64(thumbs_figure(gather(images, rows[worst]), captions))
    body = ("<p>The wrong OOF predictions made with the highest confidence (id, true → predicted, probability): "
            "label noise, look-alike classes or missing cues show up here first.</p>" + figure(grid, "wrong images"))
    return section("wrong", "Most confidently wrong", body), items


def tta_section(cv: dict) -> str:
    auto = cv.get("tta_auto")
    if not auto:
        tta = cv.get("oof_tta")
        text = f"<p>Fixed views: {esc(', '.join(tta['tta']))}.</p>" if tta else "<p class='muted'>No TTA scored.</p>"
        return section("tta", "Test-time augmentation", text)
    steps = [[" + ".join(s["views"]), s["accuracy"], s["log_loss"], "kept" if s["kept"] else "dropped"]
             for s in auto["steps"]]
    base = next(k for k in auto["views"][auto["chosen"][0]] if k.startswith("with_"))
    views = [[v, e["alone"]["accuracy"], e[base]["accuracy"], e[base]["log_loss"]] for v, e in auto["views"].items()]
    body = (f"<p><code>infer.tta: auto</code> chose <b>{esc(' + '.join(auto['chosen']))}</b> on the OOF "
            f"{esc(auto['metric'])}.</p><h3>Greedy steps</h3>"
            + table(["views", "accuracy", "log loss", ""], steps)
            + f"<h3>Each view's effect</h3>" + table(["view", "accuracy alone", f"accuracy {base}", f"log loss {base}"], views))
    return section("tta", "Test-time augmentation", body)


def ensemble_section(report: Optional[dict]) -> str:
    if not report or not report.get("oof"):
        return section("ensemble", "Ensemble", "<p class='muted'>This run is not an ensemble of experiments.</p>")
    rows = []
    for name, weight in report["member_weights"].items():
        own = report["oof_members"][name]
        without = report.get("oof_without", {}).get(name)
        rows.append([name, weight, own["accuracy"], own["log_loss"],
                     without["accuracy"] if without else None,
                     report["oof_in_sample"]["accuracy"] - without["accuracy"] if without else None])
    best = report["oof_members"][report["best_member"]]
    summary = [[f"ensemble ({report['method']}, {report['oof_scoring']})", report["oof"]["accuracy"], report["oof"]["log_loss"]],
               ["ensemble, weights fitted on all rows (in-sample)", report["oof_in_sample"]["accuracy"],
                report["oof_in_sample"]["log_loss"]],
               ["plain average of the members", report["oof_average"]["accuracy"], report["oof_average"]["log_loss"]],
               [f"best member ({report['best_member']})", best["accuracy"], best["log_loss"]]]
    body = (table(["OOF", "accuracy", "log loss"], summary) + "<h3>Members</h3>"
            + table(["member", "weight", "own accuracy", "own log loss", "ensemble accuracy without it",
                     "contribution (in-sample accuracy)"], rows))
    return section("ensemble", "Ensemble", body)


def plan_section(plan: Optional[dict]) -> str:
    """The ``recipe: auto`` plan: the family and why, then each member's estimated and actual minutes and OOF."""
    if not plan:
        return section("plan", "Plan", "<p class='muted'>This run was not planned (recipe: manual).</p>")
    budget = "no budget (one member)" if plan["budget_min"] is None else f"a budget of {plan['budget_min']:g} min"
    rows = [[s["member"], s["experiment"], s["estimated_min"], s["actual_min"], (s["oof"] or {}).get("accuracy"),
             (s["oof"] or {}).get("log_loss"), s["status"], s["note"]] for s in plan["steps"]]
    ens = plan.get("ensemble") or {}
    adapted = f" After the first member, {esc(plan['adapted'])}." if plan.get("adapted") else ""
    body = (f"<p><b>{esc(plan['family'])}</b> recipe, {esc(budget)}, on {esc(plan['device'])}: {esc(plan['why'])}."
            f"{adapted}</p>" + table(["member", "experiment", "estimated min", "actual min", "OOF accuracy", "OOF log loss",
                             "status", "note"], rows, source="plan.json")
            + f"<p>Planning (EDA and measurements) {plan['planning_min']} min; ensemble: {esc(ens.get('method'))}, "
            f"OOF accuracy {fmt((ens.get('oof') or {}).get('accuracy'))}.</p>")
    return section("plan", "Plan", body)


def run(cfg: Config) -> Path:
    """Write ``reports/<experiment>/results/index.html`` and ``results.json``; return the page's path."""
    manifest = load_manifest(cfg.run_dir)
    classes = manifest["classes"]
    images, index = load_split(cfg.run_dir, "train", manifest)
    run = RunDir.of(cfg)
    source = oof_source(run)
    oof = pd.read_csv(source, dtype={"id": str, "label": str}, **AS_WRITTEN).set_index("id").loc[index["id"]]
    done = ~oof[classes].isna().any(axis=1).to_numpy()
    probs = oof[classes].to_numpy(dtype=np.float64)[done]
    labels = index["label_idx"].to_numpy()[done]
    folds, ids = oof["fold"].to_numpy()[done], index["id"].to_numpy()[done]
    cv = read_cv(run.root)
    ens = read_json(run.ensemble_json) if source == run.ensemble_oof and run.ensemble_json.is_file() else None
    scores = _scores(labels, probs, folds)
    per_class_html, per_class = class_section(labels, probs.argmax(1), classes)
    cm = confusion_matrix(labels, probs.argmax(1), labels=np.arange(len(classes)))
    wrong_html, wrong = wrong_section(images, np.flatnonzero(done), labels, probs, classes, ids)
    rel_fig, ece = reliability_figure(probs.max(1), probs.argmax(1) == labels)
    sections = [cv_section(source, scores, cv), per_class_html,
                section("confusion", "Confusion matrix", figure(png_base64(confusion_figure(cm, classes)), "confusion")),
                wrong_html,
                section("calibration", "Calibration", figure(png_base64(rel_fig), "reliability diagram")
                        + f"<p>Expected calibration error {ece:.4f} (10 bins of the top probability).</p>"),
                tta_section(cv), ensemble_section(ens),
                plan_section(read_json(run.plan) if run.plan.is_file() else None)]
    reports = ReportDir.of(cfg)
    title = f"Results: {cfg.experiment}"
    subtitle = f"{cfg.model.name}, {len(np.unique(folds))} folds, {int(done.sum()):,} OOF images, {source.name}"
    write_text(reports.results_page, page(title, subtitle, sections, NAV))
    write_json(reports.results_json, {"source": source.name, **scores, "per_class": per_class, "ece": ece,
                                      "confusion_matrix": cm, "confidently_wrong": wrong, "ensemble": ens})
    log.info("results: OOF accuracy %.4f (%s), ECE %.4f → %s", scores["overall"]["accuracy"], source.name, ece,
             reports.results_page)
    return reports.results_page


def main(argv=None) -> int:
    return stage_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
