"""One fold's model (or the refit's): train, evaluate, checkpoint and resume exactly, on the shared recipe."""
from __future__ import annotations

import logging
import math
import time
from typing import Optional

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import confusion_matrix
from torch import nn

from pipeline import augment
from pipeline.core import rng as rngs
from pipeline.core.config import Config, to_dict
from pipeline.core.utils import atomic_path, read_json, write_json
from pipeline.evaluation.metrics import score
from pipeline.models.factory import count_parameters
from pipeline.report.figures import confusion_figure, figure_array
from pipeline.provenance import data_change, same_training, trained_with
from pipeline.rundir import RunDir, without_secrets
from pipeline.training.checkpoints import load_state, save_checkpoint, save_state
from pipeline.training.losses import build_loss
from pipeline.training.recipe import build_training

log = logging.getLogger(__name__)


class FoldRun:
    """Everything one fold needs; :meth:`fit` trains it (resuming if a last checkpoint exists).

    ``fold=None`` is the refit (``train.refit``): one model on every training row in ``refit/``, nothing held
    out, so it keeps its last epoch and has no validation scores."""

    def __init__(self, cfg: Config, fold: Optional[int], images: np.ndarray, index: pd.DataFrame, folds: pd.DataFrame,
                 manifest: dict, device: torch.device, targets: Optional[np.ndarray] = None) -> None:
        """``targets``: soft training targets per train-index row (distillation); None trains on the labels."""
        self.cfg, self.fold, self.images, self.device = cfg, fold, images, device
        self.classes = manifest["classes"]
        self.labels = index["label_idx"].to_numpy()
        held = folds["fold"].to_numpy() == fold if fold is not None else np.zeros(len(folds), dtype=bool)
        self.train_rows, self.valid_rows = np.flatnonzero(~held), np.flatnonzero(held)
        self.dir = RunDir.of(cfg).model(fold)
        self.name = self.dir.name
        seed = cfg.seed + (fold if fold is not None else cfg.folds.n_splits)
        self.dir.root.mkdir(parents=True, exist_ok=True)
        self.provenance = trained_with(cfg)  # recorded in every checkpoint and the result: computed once
        self.training = build_training(cfg, images, self.labels, self.train_rows, manifest, device, seed, targets)
        self.eval_loss = build_loss(cfg.train, self.labels[self.train_rows], len(self.classes))
        self.epoch, self.best, self.best_epoch, self.stale = 0, -math.inf, -1, 0

    def evaluate(self) -> tuple[np.ndarray, dict]:
        if not len(self.valid_rows):  # the refit: nothing held out
            return np.zeros((0, len(self.classes)), np.float32), dict.fromkeys(("accuracy", "macro_f1", "log_loss",
                                                                                 "loss"), math.nan)
        logits = self.training.predict(self.images, self.valid_rows)
        y = torch.from_numpy(self.labels[self.valid_rows])
        probs = logits.softmax(1).numpy()
        metrics = score(self.labels[self.valid_rows], probs)
        metrics["loss"] = float(self.eval_loss(logits, y))
        return probs, metrics

    @property
    def monitor(self) -> str:
        """``train.monitor``, or ``last`` for the refit, which holds nothing out."""
        return self.cfg.train.monitor if len(self.valid_rows) else "last"

    def monitor_value(self, metrics: dict) -> float:
        """Higher is better; with ``monitor: last`` every epoch improves on the one before."""
        return {"accuracy": metrics["accuracy"], "loss": -metrics["loss"], "last": float(self.epoch)}[self.monitor]

    def resume(self) -> None:
        """Continue from ``last_state.pt`` when it exists and was made with the same config: weights, optimizer,
        scheduler, counters and every random stream, so the rest of the fold is what it would have been."""
        state_path = self.dir.last_state
        if not (self.cfg.train.resume and state_path.is_file()):
            return
        try:
            state = load_state(state_path)
        except Exception as err:  # noqa: BLE001 - truncated/garbled files raise many types; the fold restarts
            log.warning("%s: %s is damaged (%s: %s); starting the fold over", self.name, state_path,
                        type(err).__name__, err)
            return
        if not same_training(state.get("fingerprint"), self.cfg,
                             weights_by_content=state.get("start_weights") is not None):
            log.warning("%s: last checkpoint was made with other training settings; starting over", self.name)
            return
        change = data_change(state, self.cfg)
        if change:
            log.warning("%s: last checkpoint was made on %s; starting over", self.name, change)
            return
        if not {"model", "step", "rng"} <= set(state):
            log.warning("%s: %s predates exact resume (no random state); starting over", self.name, state_path)
            return
        t = self.training
        t.model.load_state_dict(state["model"])
        if t.ema is not None:
            t.ema.module.load_state_dict(state["ema"])
        t.step.updates = int(state.get("updates", 0))
        t.optimizer.load_state_dict(state["optimizer"])
        t.schedule.load_state_dict(state["scheduler"])
        t.step.load_state_dict(state["step"])
        self.epoch, self.best, self.best_epoch, self.stale = (state["epoch"], state["best"], state["best_epoch"],
                                                              state["stale"])
        self.restore_random(state["rng"])
        kept = "keeping the last epoch" if self.monitor == "last" else \
            f"best {self.monitor} {abs(self.best):.4f} at epoch {self.best_epoch + 1}"  # loss is stored negated
        log.info("%s: resuming after epoch %d (%s)", self.name, self.epoch, kept)

    @property
    def purge_step(self) -> int:
        """The first TensorBoard step this training writes: events of earlier trainings from there on are hidden.

        Epoch ``k`` logs at step ``k``: a fold resumed after epoch ``k`` writes from ``k + 1`` (what a killed run
        logged past its checkpoint is dropped); a fold trained from the start (a new fold, changed settings,
        a damaged checkpoint) purges from step 0, so one model's curves are never drawn twice."""
        return self.epoch + 1 if self.epoch else 0

    def random_state(self) -> dict:
        """Every random stream training draws from (see :mod:`pipeline.core.rng`)."""
        t = self.training
        return {"global": rngs.global_state(), "loader": rngs.generator_state(t.loader.generator),
                "policy": rngs.collect(t.policy), "mixer": rngs.collect(t.step.mixer)}

    def restore_random(self, state: dict) -> None:
        rngs.set_global_state(state["global"])
        t = self.training
        rngs.set_generator_state(t.loader.generator, state["loader"])
        rngs.restore(t.policy, state["policy"])
        rngs.restore(t.step.mixer, state["mixer"])

    def checkpoint(self, probs: np.ndarray, metrics: dict, improved: bool) -> None:
        t = self.training
        metrics = {k: None if v != v else v for k, v in metrics.items()}  # the refit's NaN scores: JSON null
        meta = {"fold": self.fold, "epoch": self.epoch, "classes": self.classes, "metrics": metrics,
                "model": self.cfg.model.name, "image_size": t.size, "mean": t.mean, "std": t.std,
                "config": to_dict(without_secrets(self.cfg))}
        if improved:
            save_checkpoint(self.dir, "best", t.eval_model, meta)
            with atomic_path(self.dir.predictions("oof")) as tmp:
                np.save(tmp, probs.astype(np.float32))
        save_checkpoint(self.dir, "last", t.model, meta)
        if t.ema is not None:
            save_checkpoint(self.dir, "last_ema", t.ema.module, meta)
        save_state(self.dir.last_state, {  # one atomic file: whatever else a kill interrupts, this is whole
            "model": _cpu(t.model), "ema": None if t.ema is None else _cpu(t.ema.module),
            "optimizer": t.optimizer.state_dict(), "scheduler": t.schedule.state_dict(),
            "step": t.step.state_dict(), "rng": self.random_state(),
            "epoch": self.epoch, "best": self.best, "best_epoch": self.best_epoch, "stale": self.stale,
            **self.provenance, "updates": t.step.updates})

    def fit(self) -> dict:
        from torch.utils.tensorboard import SummaryWriter  # heavy: loaded only when a model trains

        self.resume()
        writer = SummaryWriter(str(RunDir.of(self.cfg).tb(self.dir.root.name)), purge_step=self.purge_step)
        if self.epoch == 0:  # once per training, from its start (a resumed fold keeps the preview it logged)
            log_preview(writer, self.images, self.train_rows, self.cfg, self.training.size)
        start = time.perf_counter()
        while self.epoch < self.cfg.train.epochs:
            t0 = time.perf_counter()
            desc = f"{self.name} epoch {self.epoch + 1}/{self.cfg.train.epochs}"
            train_loss, _ = self.training.run_epoch(self.epoch, desc)
            probs, metrics = self.evaluate()
            self.training.schedule.step_epoch(metrics["loss"])
            value = self.monitor_value(metrics)
            improved = value > self.best
            if improved:
                self.best, self.best_epoch, self.stale = value, self.epoch, 0
            else:
                self.stale += 1
            self.epoch += 1
            lr = self.training.optimizer.param_groups[0]["lr"]
            log.info("%s epoch %d/%d: train_loss %.4f val_loss %.4f acc %.4f f1 %.4f lr %.3g %.1fs%s",
                     self.name, self.epoch, self.cfg.train.epochs, train_loss, metrics["loss"],
                     metrics["accuracy"], metrics["macro_f1"], lr, time.perf_counter() - t0,
                     " *" if improved else "")
            for key, val in {"loss/train": train_loss, "loss/valid": metrics["loss"], "lr": lr,
                             "valid/accuracy": metrics["accuracy"], "valid/macro_f1": metrics["macro_f1"],
                             "valid/log_loss": metrics["log_loss"]}.items():
                writer.add_scalar(key, val, self.epoch)
            self.checkpoint(probs, metrics, improved)
            if self.cfg.train.early_stopping and self.stale >= self.cfg.train.early_stopping:  # never with "last"
                log.info("%s: early stop, no improvement for %d epochs", self.name, self.stale)
                break
        if len(self.valid_rows):
            kept = np.load(self.dir.predictions("oof"))
            log_confusion(writer, self.labels[self.valid_rows], kept, self.classes, self.epoch)
        writer.close()
        best = read_json(self.dir.meta("best"))
        result = {"fold": self.fold, "best_epoch": best["epoch"], "metrics": best["metrics"],
                  "seconds": round(time.perf_counter() - start, 1), "parameters": count_parameters(self.training.model),
                  **self.provenance}
        write_json(self.dir.result, result)
        return result


def log_preview(writer, images: np.ndarray, rows: np.ndarray, cfg: Config, size: int) -> None:
    """Log one grid of augmented training samples per fold (the policy's preview)."""
    if len(rows) == 0:
        return
    pick = np.sort(np.random.default_rng(cfg.seed).choice(rows, size=min(32, len(rows)), replace=False))
    grid = augment.preview_grid(np.asarray(images[pick]), cfg.augment, size, n=len(pick), seed=cfg.seed)
    writer.add_image("augmented_samples", grid, 0, dataformats="HWC")


def log_confusion(writer, labels: np.ndarray, probs: np.ndarray, classes: list[str], step: int) -> None:
    """The fold's confusion matrix (of the kept OOF predictions) as a TensorBoard image."""
    cm = confusion_matrix(labels, probs.argmax(1), labels=np.arange(len(classes)))
    writer.add_image("confusion_matrix", figure_array(confusion_figure(cm, classes)), step, dataformats="HWC")


def _cpu(model: nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
