"""``train.mode: finetune``: one fold's model (or the refit's) trained on images with the shared recipe, evaluated,
checkpointed and resumed exactly (:class:`FoldRun`), and the mode's registration (:class:`FinetuneMode`)."""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Optional

import numpy as np
import torch
from sklearn.metrics import confusion_matrix
from torch import nn

from pipeline import augment
from pipeline.core import rng as rngs
from pipeline.core.config import Config
from pipeline.core.utils import read_json
from pipeline.evaluation.metrics import score
from pipeline.evaluation.tta import configured_views, predict_tta
from pipeline.models.engines import FrozenPass
from pipeline.models.factory import architecture_id, count_parameters, create_model
from pipeline.models.weights import normalization
from pipeline.provenance import data_change, same_training
from pipeline.report.figures import confusion_figure, figure_array
from pipeline.rundir import RunDir, file_sha1, load_split
from pipeline.training.checkpoints import load_state, load_weights, save_checkpoint, save_state
from pipeline.training.losses import build_loss
from pipeline.training.mode import FOLD_OVERHEAD_S, TRAIN_MODES, Cost, FoldData, Predict, Rates, TrainMode, \
    stretch, with_min_steps
from pipeline.training.precision import compute_settings
from pipeline.training.recipe import build_training
from pipeline.training.record import FoldRecord, Monitor, log_epoch

log = logging.getLogger(__name__)


class FoldRun:
    """Everything one fold needs; :meth:`fit` trains it (resuming if a last checkpoint exists).

    ``fold=None`` is the refit (``train.refit``): one model on every training row in ``refit/``, nothing held
    out, so it keeps its last epoch and has no validation scores."""

    def __init__(self, data: FoldData, fold: Optional[int]) -> None:
        cfg, self.fold = data.cfg, fold
        self.cfg, self.images, self.device, self.classes, self.labels = cfg, data.images, data.device, data.classes, \
            data.labels
        self.train_rows, self.valid_rows = data.rows(fold)
        self.record = FoldRecord(cfg, fold)  # what the fold is trained with: recorded in every checkpoint
        self.dir, self.name = self.record.dir, self.record.dir.name
        seed = cfg.seed + (fold if fold is not None else cfg.folds.n_splits)
        recipe = with_min_steps(cfg, len(self.train_rows))  # train.min_steps may add epochs
        self.epochs = recipe.train.epochs
        self.training = build_training(recipe, data.images, self.labels, self.train_rows, data.manifest, data.device,
                                       seed, data.targets)
        self.eval_loss = build_loss(cfg.train, self.labels[self.train_rows], len(self.classes))
        # the refit holds nothing out, so it keeps its last epoch
        self.monitor = Monitor(cfg.train.monitor if len(self.valid_rows) else "last", cfg.train.early_stopping)
        self.epoch = 0

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
        m = self.monitor
        self.epoch, m.best, m.best_epoch, m.stale = state["epoch"], state["best"], state["best_epoch"], state["stale"]
        self.restore_random(state["rng"])
        log.info("%s: resuming after epoch %d (%s)", self.name, self.epoch, m.describe())

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
        t, m = self.training, self.monitor
        meta = self.record.meta(self.epoch, self.classes, metrics, image_size=t.size, mean=t.mean, std=t.std)
        if improved:
            self.record.keep(t.eval_model, probs, meta)
        save_checkpoint(self.dir, "last", t.model, meta)
        if t.ema is not None:
            save_checkpoint(self.dir, "last_ema", t.ema.module, meta)
        save_state(self.dir.last_state, {  # one atomic file: whatever else a kill interrupts, this is whole
            "model": _cpu(t.model), "ema": None if t.ema is None else _cpu(t.ema.module),
            "optimizer": t.optimizer.state_dict(), "scheduler": t.schedule.state_dict(),
            "step": t.step.state_dict(), "rng": self.random_state(),
            "epoch": self.epoch, "best": m.best, "best_epoch": m.best_epoch, "stale": m.stale,
            **self.record.provenance, "updates": t.step.updates})

    def fit(self) -> dict:
        from torch.utils.tensorboard import SummaryWriter  # heavy: loaded only when a model trains

        self.resume()
        writer = SummaryWriter(str(RunDir.of(self.cfg).tb(self.dir.root.name)), purge_step=self.purge_step)
        if self.epoch == 0:  # once per training, from its start (a resumed fold keeps the preview it logged)
            log_preview(writer, self.images, self.train_rows, self.cfg, self.training.size)
        while self.epoch < self.epochs:
            t0 = time.perf_counter()
            desc = f"{self.name} epoch {self.epoch + 1}/{self.epochs}"
            train_loss, _ = self.training.run_epoch(self.epoch, desc)
            probs, metrics = self.evaluate()
            self.training.schedule.step_epoch(metrics["loss"])
            improved = self.monitor.update(self.epoch, metrics)
            self.epoch += 1
            lr = self.training.optimizer.param_groups[0]["lr"]
            log_epoch(self.name, self.epoch, self.epochs, train_loss, metrics, time.perf_counter() - t0, improved,
                      lr)
            for key, val in {"loss/train": train_loss, "loss/valid": metrics["loss"], "lr": lr,
                             "valid/accuracy": metrics["accuracy"], "valid/macro_f1": metrics["macro_f1"],
                             "valid/log_loss": metrics["log_loss"]}.items():
                writer.add_scalar(key, val, self.epoch)
            self.checkpoint(probs, metrics, improved)
            if self.monitor.stop:
                log.info("%s: early stop, no improvement for %d epochs", self.name, self.monitor.stale)
                break
        if len(self.valid_rows):
            kept = np.load(self.dir.predictions("oof"))
            log_confusion(writer, self.labels[self.valid_rows], kept, self.classes, self.epoch)
        writer.close()
        best = read_json(self.dir.meta("best"))
        return self.record.finish(best["epoch"], self.epoch, best["metrics"], count_parameters(self.training.model))


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


@TRAIN_MODES.register("finetune")
class FinetuneMode(TrainMode):
    """``train.mode: finetune``: every fold trains the whole network on images with the recipe
    (:func:`~pipeline.training.recipe.build_training`), resumable by epoch; the refit (``train.refit``) too."""
    name = "finetune"
    unused = ("infer.engine",)  # it runs no frozen pass: its networks predict through PyTorch
    refused = {
        "train.tune_blocks": "the partial mode's cut: finetune trains every block",
        "train.crop_views": "cached crop views augment the frozen modes: finetune augments with augment.policy",
        "train.head": "the features mode's head: finetune trains the model's own classifier",
        "train.head_hidden": "the features mode's mlp head",
        "train.head_steps": "the features mode's mlp head",
    }

    def fit_fold(self, data: FoldData, fold: Optional[int], prepared: Any) -> dict:
        return FoldRun(data, fold).fit()

    def predictor(self, cfg: Config, fold: Optional[int], manifest: dict, device: torch.device) -> Predict:
        model = load_fold_model(cfg, fold, len(manifest["classes"]), device)
        mean, std = normalization(cfg.model, manifest)
        dtype, channels_last = compute_settings(cfg, device)
        key, choice_key = network_keys(cfg, fold, len(manifest["classes"]))
        net = FrozenPass(model, cfg, key, device, dtype, choice_key=choice_key)

        def predict(split: str, rows: np.ndarray, views: list[str]) -> np.ndarray:
            images, _ = load_split(cfg.run_dir, split, manifest)
            return predict_tta(net, images, rows, views, mean=mean, std=std, device=device,  # net sets the dtype
                               channels_last=channels_last, dtype=None, batch_size=cfg.infer.batch_size,
                               size=cfg.data.image_size).numpy()

        return predict

    def cost(self, rates: Rates, cfg: Config, before: set[tuple]) -> Cost:
        """Every fold trains on the others each epoch and scores its own; infer predicts the held-out rows and
        the test set per fold under every TTA view."""
        n, t, k = rates.facts.images, rates.facts.test_images, cfg.folds.n_splits
        train, forward = rates.train_rate(cfg), rates.forward_rate(cfg)
        views = len(configured_views(cfg.infer))
        per_epoch = (n * (k - 1) / train + n / forward) * stretch(cfg, n * (k - 1) / k)
        infer = (n + k * t) * views / forward
        return Cost(infer + k * FOLD_OVERHEAD_S, per_epoch, infer=infer)


def network_keys(cfg: Config, fold: Optional[int], num_classes: int) -> tuple[str, str]:
    """(graph key, choice key) of a fold's network for :class:`FrozenPass`: the graph is named by the kept
    weights' content, the engines' timing by the architecture, so ``auto`` times the first fold only."""
    digest = file_sha1(RunDir.of(cfg).model(fold).weights("best"))[:16]
    network = f"{architecture_id(cfg.model)}-{num_classes}cls-{cfg.data.image_size}px"
    return f"{network}-{digest}", f"{network}-network"


def load_fold_model(cfg: Config, fold: Optional[int], num_classes: int, device: torch.device) -> nn.Module:
    """A fold's (``None``: the refit's) kept network, in eval mode on ``device``."""
    path = RunDir.of(cfg).model(fold).weights("best")
    model = load_weights(create_model(cfg.model, num_classes), path).to(device).eval()
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
