"""Infer stage: test probabilities of every fold's best model, averaged over the TTA views.

``python -m pipeline.infer --config CONFIG [--set infer.tta=[identity,hflip,shift_left]]`` writes
``fold<k>/test.npy`` per fold and ``test_probs.csv`` (id + one column per class, mean over folds). With
``infer.oof_tta`` it also scores the held-out folds through the same views (``oof_tta.csv`` and the
``oof_tta`` entry of ``cv.json``), so the TTA gain is measured, not assumed.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .cli import stage_main
from .config import Config
from .data.cache import load_manifest, load_split
from .models import create_model
from .engine import collect_oof, cv_report, load_weights
from . import features
from .tta import predict_tta
from .weights import normalization
from .utils import atomic_path, read_json, resolve_device, resolve_precision, write_csv, write_json

log = logging.getLogger(__name__)


def trained_folds(run_dir: Path) -> list[int]:
    """Folds of the current ``folds.csv`` that have a best checkpoint (stale fold folders are ignored)."""
    current = set(pd.read_csv(run_dir / "folds.csv", usecols=["fold"])["fold"].astype(int))
    folds = sorted(f for f in (int(p.parent.name[4:]) for p in run_dir.glob("fold*/best.safetensors"))
                   if f in current)
    if not folds:
        raise FileNotFoundError(f"no trained fold in {run_dir} (fold*/best.safetensors): run the train stage")
    return folds


def load_fold_model(cfg: Config, fold: int, num_classes: int, device: torch.device) -> torch.nn.Module:
    path = cfg.run_dir / f"fold{fold}" / "best.safetensors"
    model = load_weights(create_model(cfg.model, num_classes), path).to(device).eval()
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _up_to_date(out: Path, weights: Path, views: list[str]) -> bool:
    meta = out.with_suffix(".json")
    return (out.is_file() and meta.is_file() and out.stat().st_mtime >= weights.stat().st_mtime
            and read_json(meta).get("tta") == views)


def _save(out: Path, probs: np.ndarray, views: list[str]) -> None:
    with atomic_path(out) as tmp:
        np.save(tmp, probs.astype(np.float32))
    write_json(out.with_suffix(".json"), {"tta": views, "rows": len(probs)})


def predict_fold(cfg: Config, fold: int, manifest: dict, device: torch.device) -> None:
    """Write ``test.npy`` (and ``oof_tta.npy``) for one fold unless they are up to date."""
    fold_dir = cfg.run_dir / f"fold{fold}"
    views = list(cfg.infer.tta)
    jobs = [("test", fold_dir / "test.npy")]
    if cfg.infer.oof_tta:
        jobs.append(("train", fold_dir / "oof_tta.npy"))
    jobs = [(split, out) for split, out in jobs if not _up_to_date(out, fold_dir / "best.safetensors", views)]
    if not jobs:
        log.info("fold %d: predictions up to date", fold)
        return
    model = None if cfg.train.mode == "features" else load_fold_model(cfg, fold, len(manifest["classes"]), device)
    mean, std = normalization(cfg.model, manifest)
    kwargs = dict(mean=mean, std=std, device=device, channels_last=cfg.train.channels_last,
                  dtype=resolve_precision(cfg.train.precision, device), batch_size=cfg.infer.batch_size,
                  size=cfg.data.image_size)
    for split, out in jobs:
        images, _ = load_split(cfg.run_dir, split, manifest)
        rows = np.arange(len(images))
        if split == "train":
            folds = pd.read_csv(cfg.run_dir / "folds.csv", dtype={"id": str})
            rows = np.flatnonzero(folds["fold"].to_numpy() == fold)
        if model is None:  # train.mode=features: the fold's head on the cached embeddings of every view
            probs = features.predict_fold(cfg, fold, manifest, split, rows, views, device)
        else:
            probs = predict_tta(model, images, rows, views, **kwargs).numpy()
        _save(out, probs, views)
        log.info("fold %d: %s probabilities for %d images with TTA %s", fold, split, len(rows), views)


def run(cfg: Config) -> pd.DataFrame:
    """Predict the test set with every trained fold; return the fold-averaged probabilities."""
    manifest = load_manifest(cfg.run_dir)
    device = resolve_device(cfg.train.device)
    folds = trained_folds(cfg.run_dir)
    for fold in folds:
        predict_fold(cfg, fold, manifest, device)
    _, test_index = load_split(cfg.run_dir, "test", manifest)
    probs = np.mean([np.load(cfg.run_dir / f"fold{f}" / "test.npy") for f in folds], axis=0)
    frame = pd.DataFrame(probs, columns=manifest["classes"])
    frame.insert(0, "id", test_index["id"].to_numpy())
    write_csv(cfg.run_dir / "test_probs.csv", frame)
    if cfg.infer.oof_tta:
        _score_oof_tta(cfg, manifest)
    return frame


def _score_oof_tta(cfg: Config, manifest: dict) -> None:
    _, index = load_split(cfg.run_dir, "train", manifest)
    folds = pd.read_csv(cfg.run_dir / "folds.csv", dtype={"id": str, "label": str})
    oof, probs = collect_oof(cfg, index, folds, manifest["classes"], name="oof_tta.npy")
    write_csv(cfg.run_dir / "oof_tta.csv", oof)
    cv_path = cfg.run_dir / "cv.json"
    cv = read_json(cv_path) if cv_path.is_file() else {}
    tta = cv_report(cfg, index, folds, probs)
    cv["oof_tta"] = {"tta": list(cfg.infer.tta), **tta["oof"], "folds": tta["folds"]}
    write_json(cv_path, cv)
    log.info("CV with TTA %s: %s (without: %s)", list(cfg.infer.tta), tta["oof"], cv.get("oof"))


def main(argv=None) -> int:
    return stage_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
