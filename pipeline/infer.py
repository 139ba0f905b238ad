"""Infer stage: test probabilities of every fold's best model, averaged over the TTA views.

``python -m pipeline.infer --config CONFIG [--set infer.tta=[identity,hflip,shift_left]]`` writes
``fold<k>/test.npy`` per fold and ``test_probs.csv`` (id + one column per class, mean over folds). With
``infer.oof_tta`` it also scores the held-out folds through the same views (``oof_tta.csv`` and the
``oof_tta`` entry of ``cv_tta.json``), so the TTA gain is measured, not assumed. With ``infer.tta: auto`` the
views are chosen on the OOF: every candidate of ``infer.tta_candidates`` predicts the held-out folds
(``fold<k>/oof_views.npy``), then views are added greedily from identity while the OOF ``infer.tta_metric``
improves (:func:`pipeline.evaluation.tta.select_views`); ``cv_tta.json``'s ``tta_auto`` shows each view's effect and the steps.
With ``train.refit`` the refit model (trained on every row) predicts the test set too (``refit/test.npy``, same
views); ``test_probs.csv`` stays the folds' mean, the ensemble stage combines the two (``ensemble.refit``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch

from pipeline.cli import stage_main
from pipeline.core.config import Config
from pipeline.core.jobs import training_slot
from pipeline.core.utils import atomic_path, read_json, resolve_device, write_csv, write_json
from pipeline.evaluation.metrics import cv_report
from pipeline.evaluation.tta import select_views
from pipeline.models.weights import normalization
from pipeline.provenance import collect_oof, counted_folds, fold_done
from pipeline.rundir import RunDir, file_sha1, load_manifest, load_split, read_folds
from pipeline.training.mode import Predict
from pipeline.training.modes import training_mode
from pipeline.training.precision import compute_settings
from pipeline.training.record import damage

log = logging.getLogger(__name__)


def trained_folds(cfg: Config) -> list[int]:
    """The folds that count (:func:`pipeline.provenance.counted_folds`: in ``folds.csv`` and ``train.folds``,
    finished with the current training settings) and have a best checkpoint."""
    run = RunDir.of(cfg)
    fold_of = read_folds(cfg.run_dir, load_split(cfg.run_dir, "train")[1])["fold"].to_numpy()
    folds = [f for f in counted_folds(cfg, fold_of) if run.model(f).weights("best").is_file()]
    if not folds:
        raise FileNotFoundError(f"no fold in {run} trained with these settings (fold*/result.json, "
                                "best.safetensors): run the train stage")
    damaged = [str(path) for path in (damage(run.model(f)) for f in folds) if path is not None]
    if damaged:
        raise ValueError(f"{', '.join(damaged)}: damaged (truncated or unreadable): re-run the train stage, "
                         "which trains those folds again")
    return folds


def refit_ready(cfg: Config) -> None:
    """``train.refit``: the refit model must have finished with the current settings and be intact."""
    best = RunDir.of(cfg).model(None).weights("best")
    if not (fold_done(cfg, None) and damage(RunDir.of(cfg).model(None)) is None):
        raise FileNotFoundError(f"train.refit: no refit model trained with these settings in {best.parent} "
                                "(result.json, best.safetensors): run the train stage")


def prediction_key(cfg: Config, fold: Optional[int], split: str, manifest: dict, device: torch.device,
                   views: list[str]) -> dict:
    """What a fold's saved predictions depend on: the weights' bytes, the TTA views, the cached images,
    the normalisation and the precision. Saved predictions are reused only when all of it is unchanged."""
    weights = RunDir.of(cfg).model(fold).weights("best")
    return {"tta": list(views), "weights_sha1": file_sha1(weights),
            "cache": manifest[split]["signature"], "normalization": list(normalization(cfg.model, manifest)),
            "precision": str(compute_settings(cfg, device)[0])}


def _up_to_date(out: Path, key: dict) -> bool:
    meta = out.with_suffix(".json")
    if not (out.is_file() and meta.is_file()):
        return False
    try:
        saved = read_json(meta)
        return saved.get("key") == json.loads(json.dumps(key)) and len(np.load(out, mmap_mode="r")) == saved["rows"]
    except (OSError, ValueError, AttributeError, KeyError, EOFError):
        return False  # damaged: predict again


def _save(out: Path, probs: np.ndarray, key: dict) -> None:
    with atomic_path(out) as tmp:
        np.save(tmp, probs.astype(np.float32))
    write_json(out.with_suffix(".json"), {"key": key, "tta": key["tta"], "rows": len(probs)})


def fold_predictor(cfg: Config, fold: Optional[int], manifest: dict, device: torch.device) -> Predict:
    """``predict(split, rows, views) -> probabilities`` of the fold's model as its training mode predicts (the
    network on images, a head on cached embeddings, the tuned back on cached activations), mean over the views."""
    return training_mode(cfg).predictor(cfg, fold, manifest, device)


def _fold_rows(cfg: Config, fold: int) -> np.ndarray:
    """The held-out rows of ``fold``, from ``folds.csv`` checked against the train index (read_folds)."""
    folds = read_folds(cfg.run_dir, load_split(cfg.run_dir, "train")[1])
    return np.flatnonzero(folds["fold"].to_numpy() == fold)


def predict_fold(cfg: Config, fold: Optional[int], manifest: dict, device: torch.device, views: list[str]) -> None:
    """Write ``test.npy`` (and ``oof_tta.npy``) for one fold (``None``: ``test.npy`` of the refit) unless they
    are up to date."""
    folder = RunDir.of(cfg).model(fold)
    name = folder.name
    jobs = [("test", folder.predictions("test"))]
    if fold is not None and (cfg.infer.oof_tta or cfg.infer.tta == "auto"):
        jobs.append(("train", folder.predictions("oof_tta")))
    keys = {split: prediction_key(cfg, fold, split, manifest, device, views) for split, _ in jobs}
    jobs = [(split, out) for split, out in jobs if not _up_to_date(out, keys[split])]
    if not jobs:
        log.info("%s: predictions up to date", name)
        return
    predict = fold_predictor(cfg, fold, manifest, device)
    for split, out in jobs:
        rows = _fold_rows(cfg, fold) if split == "train" else np.arange(manifest[split]["n"])
        probs = predict(split, rows, views)
        _save(out, probs, keys[split])
        log.info("%s: %s probabilities for %d images with TTA %s", name, split, len(rows), views)


def run(cfg: Config) -> pd.DataFrame:
    """Predict the test set with every trained fold; return the fold-averaged probabilities."""
    training_mode(cfg)  # a setting the mode cannot honour is refused before anything is read
    manifest = load_manifest(cfg.run_dir)
    device = resolve_device(cfg.train.device)
    folds = trained_folds(cfg)
    if cfg.train.refit:
        refit_ready(cfg)
    with training_slot(cfg, "infer") as threads:
        torch.set_num_threads(threads)
        auto = choose_views(cfg, manifest, folds, device) if cfg.infer.tta == "auto" else None
        views = auto["chosen"] if auto else list(cfg.infer.tta)
        for fold in folds + ([None] if cfg.train.refit else []):  # the refit's test predictions last
            predict_fold(cfg, fold, manifest, device, views)
    run = RunDir.of(cfg)
    _, test_index = load_split(cfg.run_dir, "test", manifest)
    probs = np.mean([np.load(run.model(f).predictions("test")) for f in folds], axis=0)
    frame = pd.DataFrame(probs, columns=manifest["classes"])
    frame.insert(0, "id", test_index["id"].to_numpy())
    write_csv(run.test_probs, frame)
    if cfg.infer.oof_tta or cfg.infer.tta == "auto":
        _score_oof_tta(cfg, manifest, views, auto)
    return frame


def choose_views(cfg: Config, manifest: dict, folds: list[int], device: torch.device) -> dict:
    """``infer.tta: auto``: every candidate view's OOF probabilities, then greedy selection on the OOF.

    Writes each fold's ``oof_tta.npy`` for the chosen views (the mean of their probabilities); returns the
    selection report (``chosen``: the views), which ``cv_tta.json`` keeps as ``tta_auto``."""
    candidates = list(dict.fromkeys(cfg.infer.tta_candidates))
    _, index = load_split(cfg.run_dir, "train", manifest)
    per_view = np.full((len(candidates), len(index), len(manifest["classes"])), np.nan, dtype=np.float32)
    for fold in folds:
        rows, out = _fold_rows(cfg, fold), RunDir.of(cfg).model(fold).predictions("oof_views")
        key = prediction_key(cfg, fold, "train", manifest, device, candidates)
        if not _up_to_date(out, key):
            predict = fold_predictor(cfg, fold, manifest, device)
            _save(out, np.stack([predict("train", rows, [v]) for v in candidates]), key)
            log.info("fold %d: OOF probabilities of %d candidate TTA views", fold, len(candidates))
        per_view[:, rows] = np.load(out)
    scored = ~np.isnan(per_view[0]).any(axis=1)
    labels = index["label_idx"].to_numpy()[scored]
    views, report = select_views(dict(zip(candidates, per_view[:, scored])), labels, cfg.infer.tta_metric)
    chosen = per_view[[candidates.index(v) for v in views]].mean(axis=0)
    for fold in folds:
        _save(RunDir.of(cfg).model(fold).predictions("oof_tta"), chosen[_fold_rows(cfg, fold)],
              prediction_key(cfg, fold, "train", manifest, device, views))
    log.info("auto TTA chose %s from %s on the OOF %s", views, candidates, cfg.infer.tta_metric)
    return report


def _score_oof_tta(cfg: Config, manifest: dict, views: list[str], auto: Optional[dict]) -> None:
    """``oof_tta.csv`` and ``cv_tta.json``: the OOF through the TTA views, tied to the ``oof.csv`` it improves on
    (a retrain makes it stale until infer runs again, see :func:`pipeline.rundir.read_cv`)."""
    run = RunDir.of(cfg)
    _, index = load_split(cfg.run_dir, "train", manifest)
    folds = read_folds(cfg.run_dir, index)
    oof, probs = collect_oof(cfg, index, folds, manifest["classes"], name="oof_tta")
    write_csv(run.oof_tta, oof)
    tta = cv_report(cfg, index, folds, probs)
    report = {"oof_sha1": file_sha1(run.oof) if run.oof.is_file() else None,
              "oof_tta": {"tta": views, **tta["oof"], "folds": tta["folds"]}}
    write_json(run.cv_tta, {**report, **({"tta_auto": auto} if auto else {})})
    plain = read_json(run.cv).get("oof") if run.cv.is_file() else None
    log.info("CV with TTA %s: %s (without: %s)", views, tta["oof"], plain)


def main(argv=None) -> int:
    return stage_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
