"""Train stage: K-fold training with out-of-fold predictions, checkpoints and TensorBoard logs.

``python -m pipeline.train --config CONFIG [--set train.epochs=3]``. For each fold the config's training mode
(``train.mode``, :mod:`pipeline.training.modes`) trains a model on the other folds and scores the held-out one,
keeping

* ``fold<k>/best.safetensors`` + ``best.json``, ``oof.npy`` (held-out probabilities of the kept epoch) and
  ``result.json`` (done marker), the same for every mode (:mod:`pipeline.training.record`),
* ``fold<k>/last.safetensors`` + ``last_state.pt`` (finetune: optimizer/scheduler state, written atomically each
  epoch: an interrupted run resumes where it stopped),
* TensorBoard scalars under ``runs/<experiment>/tb/fold<k>`` (``tensorboard --logdir runs``; a resumed fold
  continues its curves, a fold trained again replaces them),

then ``oof.csv`` and ``cv.json`` (accuracy, macro-F1 and log loss per fold and overall). With
``train.teacher`` the targets mix a teacher's out-of-fold probabilities with the labels (pipeline.training.distill).
"""
from __future__ import annotations

import logging

import torch

from pipeline.cli import stage_main
from pipeline.core.config import Config
from pipeline.core.jobs import training_slot
from pipeline.core.utils import resolve_device, write_csv, write_json
from pipeline.evaluation.metrics import cv_report
from pipeline.provenance import collect_oof, teacher_table
from pipeline.rundir import ModelDir, RunDir, load_manifest, load_split, read_folds, save_config
from pipeline.training import distributed, modes
from pipeline.training.distill import distill_targets, teacher_probs
from pipeline.training.mode import FoldData

log = logging.getLogger(__name__)


def _teacher_targets(cfg: Config, index, folds, manifest: dict):
    """Soft targets from ``train.teacher``'s out-of-fold probabilities mixed with the labels, or None."""
    teacher = teacher_probs(cfg, index, folds, manifest["classes"])
    if teacher is None:
        return None
    log.info("distilling from %s (alpha %.2f, temperature %.2f)", teacher_table(cfg), cfg.train.distill_alpha,
             cfg.train.distill_temperature)
    return distill_targets(index["label_idx"].to_numpy(), teacher, cfg.train.distill_alpha,
                           cfg.train.distill_temperature)


def remove_temporaries(folder: ModelDir) -> None:
    """Delete what writes killed halfway left in a model folder (the train stage holds the run folder's lock,
    so no write is in progress there)."""
    stray = folder.temporaries()
    for path in stray:
        path.unlink(missing_ok=True)
    if stray:
        log.info("%s: removed %d unfinished write(s) of an interrupted run: %s", folder.name, len(stray),
                 ", ".join(p.name for p in stray))


def run(cfg: Config) -> dict:
    """Train every configured fold (skipping finished ones) in the config's mode, then write ``oof.csv`` and
    ``cv.json``."""
    mode = modes.check(cfg)  # a setting the mode cannot honour is refused before anything is read
    manifest = load_manifest(cfg.run_dir)
    images, index = load_split(cfg.run_dir, "train", manifest)
    folds = read_folds(cfg.run_dir, index)
    save_config(cfg)
    device = distributed.local_device(resolve_device(cfg.train.device))
    wanted = [int(f) for f in (cfg.train.folds if cfg.train.folds is not None else sorted(folds["fold"].unique()))]
    refit = [None] if cfg.train.refit else []  # None: the refit model, after the CV folds (test predictions only)
    mine = distributed.share(wanted + refit)  # under torchrun: this process's share (else all of them)
    data = FoldData(cfg, manifest, images, index, folds, device, _teacher_targets(cfg, index, folds, manifest))
    for fold in mine:
        remove_temporaries(RunDir.of(cfg).model(fold))
    with distributed.process_group(device), training_slot(cfg, "train") as threads:
        torch.set_num_threads(threads)
        log.info("train: %s, train.mode=%s on %s (%d threads), folds %s, %d images", cfg.model.name, mode.name,
                 device, threads, mine, len(index))
        distributed.total(mode.fit_folds(data, mine))  # waits for every process's folds
        if distributed.rank() != 0:
            return {"rank": distributed.rank(), "folds": mine}  # rank 0 collects the OOF
    run = RunDir.of(cfg)
    oof, probs = collect_oof(cfg, index, folds, manifest["classes"])
    write_csv(run.oof, oof)
    report = cv_report(cfg, index, folds, probs)
    if cfg.train.refit:
        refit = run.model(None).root
        report["refit"] = {"rows": len(index), "dir": str(refit),
                           "note": "trained on every row: nothing held out, so the OOF and CV are the fold models'"}
        log.info("refit: one model on all %d rows in %s (test predictions only; the CV is the folds')", len(index),
                 refit)
    write_json(run.cv, report)
    log.info("CV (%d/%d rows): %s", report["scored_rows"], report["total_rows"], report["oof"])
    return report


def main(argv=None) -> int:
    return stage_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
