"""The one writer of a fold's results, for every training mode: the kept weights and their sidecar, the held-out
probabilities and ``result.json`` (the same keys whatever the mode), the epoch a fold keeps (:class:`Monitor`)
and whether a finished fold's files are whole (:func:`damage`).

A fold's folder (:class:`pipeline.rundir.ModelDir`) holds ``best.safetensors`` + ``best.json`` (the weights kept,
the epoch, scores, classes, mode and resolved config), ``oof.npy`` (held-out probabilities of that epoch) and,
written last, ``result.json``: :data:`RESULT_KEYS`, with what the fold was trained with
(:func:`pipeline.provenance.trained_with`), which decides whether it is up to date.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
from torch import nn

from pipeline.core.config import Config, to_dict
from pipeline.core.utils import atomic_path, write_json
from pipeline.provenance import trained_with
from pipeline.rundir import ModelDir, RunDir, without_secrets
from pipeline.training.checkpoints import save_checkpoint, weights_intact

log = logging.getLogger(__name__)

# every result.json, whatever the mode: the training's provenance follows (fingerprint, folds, images, start)
RESULT_KEYS = ("fold", "mode", "best_epoch", "epochs", "metrics", "seconds", "parameters")


class Monitor:
    """Which epoch a fold keeps (``train.monitor``: best held-out accuracy or loss, or the last) and when it
    stops early (``train.early_stopping`` epochs without improvement; never with ``last``)."""

    def __init__(self, kind: str, patience: int = 0) -> None:
        self.kind, self.patience = kind, patience
        self.best, self.best_epoch, self.stale = -math.inf, -1, 0

    def update(self, epoch: int, metrics: dict) -> bool:
        """Record epoch ``epoch``'s (0-based) held-out ``metrics``; True when it is the one to keep."""
        value = {"accuracy": metrics["accuracy"], "loss": -metrics["loss"], "last": float(epoch)}[self.kind]
        improved = value > self.best
        if improved:
            self.best, self.best_epoch, self.stale = value, epoch, 0
        else:
            self.stale += 1
        return improved

    @property
    def stop(self) -> bool:
        return bool(self.patience) and self.stale >= self.patience

    def describe(self) -> str:
        """What is kept so far, for the log (a loss is stored negated)."""
        if self.kind == "last":
            return "keeping the last epoch"
        return f"best {self.kind} {abs(self.best):.4f} at epoch {self.best_epoch + 1}"


class FoldRecord:
    """Writes one fold's (``None``: the refit's) results; made when the fold starts training, so it records what
    the fold was trained with (``cfg`` as configured) and how long it took."""

    def __init__(self, cfg: Config, fold: Optional[int]) -> None:
        self.cfg, self.fold = cfg, fold
        self.dir = RunDir.of(cfg).model(fold)
        self.dir.root.mkdir(parents=True, exist_ok=True)
        self.provenance = trained_with(cfg)
        self.start = time.perf_counter()

    def meta(self, epoch: int, classes: list[str], metrics: dict, **extra) -> dict:
        """The weights' sidecar: the same keys for every mode, then the mode's own (``extra``)."""
        return {"fold": self.fold, "epoch": epoch, "classes": classes, "metrics": _json(metrics),
                "mode": self.cfg.train.mode, "model": self.cfg.model.name, "image_size": self.cfg.data.image_size,
                **extra, "config": to_dict(without_secrets(self.cfg))}

    def keep(self, model: nn.Module, probs: np.ndarray, meta: dict) -> None:
        """The epoch to keep: its weights (``best``) and held-out probabilities (``oof.npy``), atomically."""
        save_checkpoint(self.dir, "best", model, meta)
        with atomic_path(self.dir.predictions("oof")) as tmp:
            np.save(tmp, probs.astype(np.float32))

    def finish(self, best_epoch: int, epochs: int, metrics: dict, parameters: int) -> dict:
        """``result.json``, written last: the fold is done (:data:`RESULT_KEYS` and the provenance)."""
        result = dict(zip(RESULT_KEYS, (self.fold, self.cfg.train.mode, best_epoch, epochs, _json(metrics),
                                        round(time.perf_counter() - self.start, 2), int(parameters))))
        write_json(self.dir.result, {**result, **self.provenance})
        return result


def log_epoch(name: str, epoch: int, epochs: int, train_loss: float, metrics: dict, seconds: float, improved: bool,
              lr: Optional[float] = None) -> None:
    """The one log line of a trained epoch (``*``: the epoch the fold keeps so far), for every mode."""
    log.info("%s epoch %d/%d: train_loss %.4f val_loss %.4f acc %.4f f1 %.4f%s %.1fs%s", name, epoch, epochs,
             train_loss, metrics["loss"], metrics["accuracy"], metrics["macro_f1"],
             "" if lr is None else f" lr {lr:.3g}", seconds, " *" if improved else "")


def _json(metrics: dict) -> dict:
    """Scores as JSON keeps them: the refit's NaN (nothing held out) as null."""
    return {k: None if v != v else v for k, v in metrics.items()}


def damage(folder: ModelDir) -> Optional[Path]:
    """The first file of a finished fold that is missing or not whole (the kept weights; a fold's held-out
    probabilities), or None when all are usable."""
    best = folder.weights("best")
    if not weights_intact(best):
        return best
    if folder.fold is not None and not _array_intact(folder.predictions("oof")):
        return folder.predictions("oof")
    return None


def _array_intact(path: Path) -> bool:
    """True when ``path`` is a complete ``.npy`` file (its header's shape covers the file)."""
    try:
        np.load(path, mmap_mode="r")
        return True
    except (OSError, ValueError, EOFError):
        return False
