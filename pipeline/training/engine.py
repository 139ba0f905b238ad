"""The training engine shared by the train, search, infer and bench stages (a stage never imports another).

Building blocks: the optimizer, the chunked shuffled loader, :class:`TrainStep` (one optimisation step under
autocast), prediction over the uint8 cache, checkpoints (safetensors + JSON, atomic), :class:`FoldRun`
(one fold: train, evaluate, checkpoint, resume), the training fingerprint that decides when a fold is up to
date, and the out-of-fold table and CV report.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline import augment
from pipeline.training import finetune
from pipeline.core import rng as rngs
from pipeline.models.arch import load_spec
from pipeline.core.config import Config, TrainConfig, to_dict
from pipeline.data.cache import MANIFEST
from pipeline.data.dataset import ImageDataset, center_crop, gather, to_float
from pipeline.data.device import DeviceLoader, fits_on_device
from pipeline.training.distill import teacher_signature
from pipeline.training.losses import build_loss
from pipeline.evaluation.metrics import score
from pipeline.models.factory import count_parameters, create_model
from pipeline.training.schedulers import Schedule, build_scheduler
from pipeline.models.weights import normalization, start_digest
from pipeline.models.whiten import freeze_whitening, init_whitening
from pipeline.core.utils import (atomic_path, autocast, compute_settings, configure_backends, read_json, seed_everything,
                    write_json)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- building blocks


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW; no weight decay on norm layers and biases; the backbone's learning
    rate scaled by ``train.backbone_lr_mult``; wrapped in timm's Lookahead when ``train.lookahead_k`` > 0 (it
    shares the inner optimizer's param groups, so schedulers work, and keeps its slow weights and step counter
    in the inner optimizer's state dict, so ``last_state.pt`` resumes it exactly)."""
    groups = finetune.param_groups(cfg, model)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.lookahead_k > 0:
        from timm.optim import Lookahead

        opt = Lookahead(opt, alpha=cfg.lookahead_alpha, k=cfg.lookahead_k)
    return opt


class ChunkedLoader:
    """Batches of ``batch_size`` cut from a loader that reads and augments ``chunk`` batches at a time.

    The loader's sampler is a uniform random permutation, so consecutive slices of a big shuffled batch are
    ordinary shuffled batches; augmenting 4× more images per call divides the per-call overhead of the
    augmentation library (which dominates on small images, see ``python -m pipeline.bench``) by 4.
    """

    def __init__(self, loader: DataLoader, batch_size: int, drop_last: bool) -> None:
        self.loader, self.batch_size, self.drop_last = loader, batch_size, drop_last
        self.dataset, self.generator = loader.dataset, loader.generator

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do: the per-image policy does not depend on the epoch (the device loader's flip does)."""

    def __len__(self) -> int:
        n = len(self.loader.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        for images, targets in self.loader:
            for start in range(0, len(targets), self.batch_size):
                if self.drop_last and start + self.batch_size > len(targets):
                    break  # the tail of the epoch, as drop_last would drop it
                yield images[start:start + self.batch_size], targets[start:start + self.batch_size]


def make_train_loader(images: np.ndarray, rows: np.ndarray, labels: np.ndarray, cfg: Config,
                      transform: Optional[Callable] = None, drop_last: bool = True, chunk: int = 4,
                      pin_memory: bool = False):
    """Shuffled uint8 batches of ``rows``, read and augmented ``chunk`` batches at a time (in workers if
    configured), in page-locked memory with ``pin_memory`` (for an asynchronous copy to a GPU).

    On 2 cores ``num_workers: 0`` measured fastest: a worker process, or a prefetch thread, competes with
    torch's own threads for the cores (see ``python -m pipeline.bench``)."""
    dataset = ImageDataset(images, rows, labels, transform)
    workers, batch_size = cfg.data.num_workers, cfg.train.batch_size
    drop_last = drop_last and len(rows) > batch_size
    loader = DataLoader(dataset, batch_size=batch_size * chunk, shuffle=True, drop_last=False,
                        num_workers=workers, persistent_workers=workers > 0,
                        prefetch_factor=4 if workers > 0 else None, pin_memory=pin_memory,
                        generator=torch.Generator().manual_seed(cfg.seed))
    return ChunkedLoader(loader, batch_size, drop_last)


def make_fold_loader(cfg: Config, images: np.ndarray, rows: np.ndarray, targets: np.ndarray, size: int,
                     seed: int, device: torch.device) -> tuple[Callable, object]:
    """(augmentation, loader) training on ``rows``: the per-image policy in a DataLoader, or with
    ``data.loader: device`` the batched policy on the rows held on ``device`` (:mod:`pipeline.data.device`)."""
    if cfg.data.loader == "device":
        if images.shape[1] != size:
            raise ValueError(f"data.loader: device trains on the cached {images.shape[1]} px images as they are; "
                             f"it needs data.crop_pct: 1 (the cache holds {images.shape[1]} px, image_size {size})")
        nbytes = len(rows) * int(np.prod(images.shape[1:])) * images.itemsize
        if fits_on_device(nbytes, device, cfg.data.device_memory_fraction):
            policy = augment.BatchAugment(cfg.augment, size, seed=seed)
            return policy, DeviceLoader(images, rows, targets, cfg.train.batch_size, device, policy, seed=cfg.seed)
        log.warning("data.loader: device: the fold's %d images (%.2f GB) exceed data.device_memory_fraction %.2f "
                    "of %s's free memory; streaming them from pinned host memory with the per-image policy "
                    "(data.num_workers > 0 prefetches)", len(rows), nbytes / 1e9, cfg.data.device_memory_fraction,
                    device)
    policy = augment.build_policy(cfg.augment, size, seed=seed)
    return policy, make_train_loader(images, rows, targets, cfg, policy, pin_memory=device.type == "cuda")


class TrainStep:
    """One optimisation step on a uint8 batch: normalise, (mix), forward/backward under autocast, step.

    Gradient accumulation: the optimizer steps every ``accum_steps`` calls; the returned loss is the
    unscaled batch loss.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                 schedule: Optional[Schedule], device: torch.device, dtype: Optional[torch.dtype],
                 mean, std, channels_last: bool = True, accum_steps: int = 1,
                 mixer: Optional[Callable] = None, ema: Optional[nn.Module] = None) -> None:
        self.model, self.optimizer, self.loss_fn, self.schedule = model, optimizer, loss_fn, schedule
        self.ema, self.updates = ema, 0  # weight average updated after every optimizer step
        self.device, self.dtype, self.mean, self.std = device, dtype, mean, std
        self.channels_last, self.accum_steps, self.mixer = channels_last, max(1, accum_steps), mixer
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.calls = 0

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, size: Optional[int] = None) -> float:
        x = to_float(images, self.mean, self.std, self.device, self.channels_last)
        if size is not None and size != x.shape[-1]:
            x = augment.resize_batch(x, size)
        y = targets.to(self.device, non_blocking=True)
        if self.mixer is not None:
            x, y = self.mixer(x, y)
        with autocast(self.device, self.dtype):
            loss = self.loss_fn(self.model(x), y)
        self.scaler.scale(loss / self.accum_steps).backward()
        self.calls += 1
        if self.calls % self.accum_steps == 0:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.updates += 1
            if self.ema is not None:
                self.ema.update(self.model, step=self.updates)
            if self.schedule is not None:
                self.schedule.step_batch()
        return float(loss.detach())

    def state_dict(self) -> dict:
        """The step counter, the gradient scaler and any gradients accumulated towards the next step."""
        pending = self.calls % self.accum_steps != 0
        grads = [p.grad for p in self.model.parameters()] if pending else []
        return {"calls": self.calls, "scaler": self.scaler.state_dict(), "grads": grads}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        for param, grad in zip(self.model.parameters(), state["grads"]):
            param.grad = None if grad is None else grad.to(param.device)


def iter_batches(images: np.ndarray, rows: np.ndarray, batch_size: int, size: Optional[int] = None):
    """uint8 N×C×H×W tensors of ``rows`` in order, each gathered from the memory map in one sorted read;
    the centre ``size`` square when the cache holds a margin (``data.crop_pct``)."""
    for start in range(0, len(rows), batch_size):
        yield center_crop(torch.from_numpy(gather(images, rows[start:start + batch_size])).permute(0, 3, 1, 2), size)


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray, rows: np.ndarray, mean, std, device: torch.device,
                   dtype: Optional[torch.dtype], channels_last: bool = True, batch_size: int = 512,
                   size: Optional[int] = None) -> torch.Tensor:
    """Logits (float32, CPU) for ``rows`` of the cache, centre ``size`` (TTA views: :func:`pipeline.evaluation.tta.predict_tta`)."""
    model.eval()
    out = []
    for batch in iter_batches(images, rows, batch_size, size):
        x = to_float(batch, mean, std, device, channels_last)
        with autocast(device, dtype):
            out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(fold_dir: Path, name: str, model: nn.Module, meta: dict) -> None:
    """Weights as safetensors plus a JSON sidecar; both written atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(fold_dir / f"{name}.safetensors") as tmp:
        save_file(state, str(tmp))
    write_json(fold_dir / f"{name}.json", meta)


def weights_intact(path: Path) -> bool:
    """True when ``path`` is a complete safetensors file (its header covers the file exactly: a truncated
    or garbled file fails); reads only the header."""
    try:
        with safe_open(str(path), "pt") as handle:
            handle.keys()
        return True
    except Exception:  # noqa: BLE001 - SafetensorError, OSError, ...: not usable either way
        return False


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load a safetensors checkpoint; a damaged one is an error naming the file and the stage to re-run."""
    try:
        state = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - SafetensorError and OSError: the file is not usable
        raise ValueError(f"{path} is damaged ({err}): re-run the train stage (it retrains that fold)") from None
    model.load_state_dict(state)
    return model


def save_state(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- one fold


class FoldRun:
    """Everything one fold needs; :meth:`fit` trains it (resuming if a last checkpoint exists).

    ``fold=None`` is the refit (``train.refit``): one model on every training row in ``refit/``, nothing held
    out, so it keeps its last epoch and has no validation scores."""

    def __init__(self, cfg: Config, fold: Optional[int], images: np.ndarray, index: pd.DataFrame, folds: pd.DataFrame,
                 manifest: dict, device: torch.device, targets: Optional[np.ndarray] = None) -> None:
        """``targets``: soft training targets per train-index row (distillation); None trains on the labels."""
        self.cfg, self.fold, self.images, self.device = cfg, fold, images, device
        self.classes = manifest["classes"]
        self.mean, self.std = normalization(cfg.model, manifest)
        self.labels = index["label_idx"].to_numpy()
        held = folds["fold"].to_numpy() == fold if fold is not None else np.zeros(len(folds), dtype=bool)
        self.train_rows, self.valid_rows = np.flatnonzero(~held), np.flatnonzero(held)
        self.name, self.dir = f"fold {fold}" if fold is not None else "refit", model_dir(cfg, fold)
        seed = cfg.seed + (fold if fold is not None else cfg.folds.n_splits)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.provenance = trained_with(cfg)  # recorded in every checkpoint and the result: computed once
        self.dtype, self.channels_last = compute_settings(cfg, device)
        self.size = cfg.data.image_size
        configure_backends(cfg.train.deterministic)
        seed_everything(seed)
        self.model = create_model(cfg.model, len(self.classes)).to(device)
        if cfg.train.head_init == "linear_probe":
            finetune.linear_probe_head(cfg, self.model, manifest, self.train_rows, self.labels, device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.whitened = None  # the whitened first conv (frozen per model.whiten_freeze, whiten_bias_epochs)
        if cfg.model.whiten:  # from this fold's training rows only
            self.whitened = init_whitening(cfg.model, self.model, images, self.train_rows, self.mean, self.std,
                                           self.size)
        train_targets = (self.labels if targets is None else targets)[self.train_rows]
        self.policy, self.loader = make_fold_loader(cfg, images, self.train_rows, train_targets, self.size, seed,
                                                    device)
        self.optimizer = build_optimizer(cfg.train, self.model)
        steps = max(1, len(self.loader) // max(1, cfg.train.accum_steps))
        self.schedule = build_scheduler(cfg.train, self.optimizer, steps)
        loss_fn = build_loss(cfg.train, self.labels[self.train_rows], len(self.classes)).to(device)
        self.ema = finetune.build_ema(cfg.train, self.model)
        self.step = TrainStep(self.model, self.optimizer, loss_fn, self.schedule, device, self.dtype, self.mean,
                              self.std, self.channels_last, cfg.train.accum_steps,
                              augment.build_mixer(cfg.augment, len(self.classes), seed=seed), self.ema)
        self.eval_loss = build_loss(cfg.train, self.labels[self.train_rows], len(self.classes))
        self.epoch, self.best, self.best_epoch, self.stale = 0, -math.inf, -1, 0

    @property
    def eval_model(self) -> nn.Module:
        """What is evaluated and kept as the best model: the weight average when EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    def train_epoch(self, epoch: int) -> float:
        finetune.train_mode(self.model, self.cfg.train, epoch)
        if self.whitened is not None:
            freeze_whitening(self.cfg.model, self.whitened, epoch)
        size = augment.size_at_epoch(self.cfg.augment, epoch, self.size)
        total, n = 0.0, 0
        self.loader.set_epoch(epoch)
        bar = tqdm(self.loader, desc=f"{self.name} epoch {epoch + 1}/{self.cfg.train.epochs}",
                   unit="batch", leave=False, mininterval=1.0)
        for images, targets in bar:
            total += self.step(images, targets, size) * len(targets)
            n += len(targets)
        return total / max(n, 1)

    def evaluate(self) -> tuple[np.ndarray, dict]:
        if not len(self.valid_rows):  # the refit: nothing held out
            return np.zeros((0, len(self.classes)), np.float32), dict.fromkeys(("accuracy", "macro_f1", "log_loss",
                                                                                 "loss"), math.nan)
        logits = predict_logits(self.eval_model, self.images, self.valid_rows, self.mean, self.std, self.device,
                                self.dtype, self.channels_last, self.cfg.infer.batch_size, self.size)
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
        state_path = self.dir / "last_state.pt"
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
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.step.updates = int(state.get("updates", 0))
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        self.step.load_state_dict(state["step"])
        self.epoch, self.best, self.best_epoch, self.stale = (state["epoch"], state["best"], state["best_epoch"],
                                                              state["stale"])
        self.restore_random(state["rng"])
        kept = "keeping the last epoch" if self.monitor == "last" else \
            f"best {self.monitor} {abs(self.best):.4f} at epoch {self.best_epoch + 1}"  # loss is stored negated
        log.info("%s: resuming after epoch %d (%s)", self.name, self.epoch, kept)

    def random_state(self) -> dict:
        """Every random stream training draws from (see :mod:`pipeline.core.rng`)."""
        return {"global": rngs.global_state(), "loader": rngs.generator_state(self.loader.generator),
                "policy": rngs.collect(self.policy), "mixer": rngs.collect(self.step.mixer)}

    def restore_random(self, state: dict) -> None:
        rngs.set_global_state(state["global"])
        rngs.set_generator_state(self.loader.generator, state["loader"])
        rngs.restore(self.policy, state["policy"])
        rngs.restore(self.step.mixer, state["mixer"])

    def checkpoint(self, probs: np.ndarray, metrics: dict, improved: bool) -> None:
        metrics = {k: None if v != v else v for k, v in metrics.items()}  # the refit's NaN scores: JSON null
        meta = {"fold": self.fold, "epoch": self.epoch, "classes": self.classes, "metrics": metrics,
                "model": self.cfg.model.name, "image_size": self.size, "mean": self.mean, "std": self.std,
                "config": to_dict(self.cfg)}
        if improved:
            save_checkpoint(self.dir, "best", self.eval_model, meta)
            with atomic_path(self.dir / "oof.npy") as tmp:
                np.save(tmp, probs.astype(np.float32))
        save_checkpoint(self.dir, "last", self.model, meta)
        if self.ema is not None:
            save_checkpoint(self.dir, "last_ema", self.ema.module, meta)
        save_state(self.dir / "last_state.pt", {  # one atomic file: whatever else a kill interrupts, this is whole
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "ema": None if self.ema is None else {k: v.detach().cpu() for k, v in self.ema.module.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.schedule.state_dict(),
            "step": self.step.state_dict(), "rng": self.random_state(),
            "epoch": self.epoch, "best": self.best, "best_epoch": self.best_epoch, "stale": self.stale,
            **self.provenance, "updates": self.step.updates})

    def fit(self) -> dict:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(self.cfg.run_dir / "tb" / self.dir.name))
        log_preview(writer, self.images, self.train_rows, self.cfg, self.size)
        self.resume()  # after anything that draws random numbers before the first epoch
        start = time.perf_counter()
        while self.epoch < self.cfg.train.epochs:
            t0 = time.perf_counter()
            train_loss = self.train_epoch(self.epoch)
            probs, metrics = self.evaluate()
            self.schedule.step_epoch(metrics["loss"])
            value = self.monitor_value(metrics)
            improved = value > self.best
            if improved:
                self.best, self.best_epoch, self.stale = value, self.epoch, 0
            else:
                self.stale += 1
            self.epoch += 1
            lr = self.optimizer.param_groups[0]["lr"]
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
            log_confusion(writer, self.labels[self.valid_rows], np.load(self.dir / "oof.npy"), self.classes, self.epoch)
        writer.close()
        best = read_json(self.dir / "best.json")
        result = {"fold": self.fold, "best_epoch": best["epoch"], "metrics": best["metrics"],
                  "seconds": round(time.perf_counter() - start, 1), "parameters": count_parameters(self.model),
                  **self.provenance}
        write_json(self.dir / "result.json", result)
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
    from sklearn.metrics import confusion_matrix

    from pipeline.report.figures import confusion_figure, figure_array

    cm = confusion_matrix(labels, probs.argmax(1), labels=np.arange(len(classes)))
    writer.add_image("confusion_matrix", figure_array(confusion_figure(cm, classes)), step, dataformats="HWC")


# --------------------------------------------------------------------------- the stage


# settings that cannot change a fold's weights: changing them must not retrain anything
# (train.refit adds a model: the folds stay valid, and the refit is fingerprinted with the same settings)
_NOT_TRAINING = {"data": ("cache_dir", "num_workers"), "train": ("folds", "resume", "threads", "device", "refit")}


def training_fingerprint(cfg: Config) -> str:
    """The config sections that shape the trained weights (not inference, ensembling or paths), as YAML."""
    full = to_dict(cfg)
    keep = {k: full[k] for k in ("seed", "data", "folds", "model", "augment", "train")}
    for section, keys in _NOT_TRAINING.items():
        keep[section] = {k: v for k, v in keep[section].items() if k not in keys}
    if isinstance(cfg.model.spec, str):  # the architecture, not its file's name: editing the file retrains
        keep["model"]["spec"] = load_spec(cfg.model.spec)
    if cfg.train.teacher:  # the teacher's predictions themselves: a retrained teacher retrains the student
        keep["train"]["teacher_oof_sha1"] = teacher_signature(cfg)
    return yaml.safe_dump(keep, sort_keys=True)


def same_training(stored: Optional[str], cfg: Config, weights_by_content: bool = False) -> bool:
    """True when a stored fingerprint describes the same training as ``cfg``.

    A key the stored fingerprint lacks (added to the config after that fold was trained) counts as the same
    when ``cfg`` leaves it at its default: a new option's default keeps the old behaviour, so adding one must
    not retrain every finished experiment. With ``weights_by_content`` (the model recorded its starting file's
    digest, checked by :func:`data_change`) ``model.weights``' path may differ: a moved file is the same start."""
    if stored is None:
        return False
    current = yaml.safe_load(training_fingerprint(cfg))
    default = yaml.safe_load(training_fingerprint(Config()))
    old = yaml.safe_load(stored)
    if weights_by_content and old.get("model", {}).get("weights") and current["model"]["weights"]:
        old["model"]["weights"] = current["model"]["weights"]
    for section, values in current.items():
        if isinstance(values, dict) and isinstance(old.get(section), dict):
            for key in set(values) - set(old[section]):
                if values[key] == default[section].get(key):
                    old[section][key] = values[key]
    return old == current


def split_signature(cfg: Config) -> Optional[str]:
    """The folds stage's fingerprint (``folds.json``: every id, its label, the fold settings); None without it."""
    try:
        return read_json(cfg.run_dir / "folds.json").get("fingerprint")
    except (OSError, ValueError):
        return None


def images_signature(cfg: Config) -> Optional[str]:
    """The preprocess stage's digest of the decoded train pixels (``preprocess.json``); None without it."""
    try:
        return read_json(cfg.run_dir / MANIFEST)["train"].get("content")
    except (OSError, ValueError, KeyError, AttributeError):
        return None


def trained_with(cfg: Config) -> dict:
    """What a fold's model depends on, stored with it: the training settings, the folds it was split by, the
    pixels it saw and the weights it started from."""
    return {"fingerprint": training_fingerprint(cfg), "folds": split_signature(cfg), "images": images_signature(cfg),
            "start_weights": start_digest(cfg.model)}


def data_change(stored: dict, cfg: Config) -> Optional[str]:
    """What a stored model was trained on that the run no longer holds, or None. Other folds: a label fixed in
    train.csv or new fold settings remake ``folds.csv``, and a model trained on the old split would leak into the
    new one's held-out rows. Other images: an image replaced in place. Other starting weights: ``model.weights``
    replaced under the same name (a deleted one changes nothing). Models saved before any of these was recorded
    count as the same."""
    for key, now, what in (("folds", split_signature(cfg), "other folds (labels or fold settings changed)"),
                           ("images", images_signature(cfg), "other images (an image was replaced)"),
                           ("start_weights", start_digest(cfg.model) or stored.get("start_weights"),
                            "other starting weights (model.weights or the shipped file changed)")):
        if stored.get(key) is not None and stored[key] != now:
            return what
    return None


def model_dir(cfg: Config, fold: Optional[int]) -> Path:
    """Where a fold's model lives (``fold<k>/``), or the refit's (``refit/``) for ``fold=None``."""
    return cfg.run_dir / (f"fold{fold}" if fold is not None else "refit")


def fold_done(cfg: Config, fold: Optional[int]) -> Optional[dict]:
    """The fold's (``None``: the refit's) result when it finished with the same training settings (then it is
    skipped)."""
    path = model_dir(cfg, fold) / "result.json"
    if not path.is_file():
        return None
    try:
        result = read_json(path)
    except (OSError, ValueError):
        log.warning("%s: %s is damaged: stale until the train stage trains it again",
                    "refit" if fold is None else f"fold {fold}", path)
        return None
    change = data_change(result, cfg)
    if change:
        log.info("%s was trained on %s: stale until the train stage trains it again",
                 "the refit" if fold is None else f"fold {fold}", change)
        return None
    by_content = result.get("start_weights") is not None
    return result if same_training(result.get("fingerprint"), cfg, weights_by_content=by_content) else None


def counted_folds(cfg: Config, fold_of: np.ndarray) -> list[int]:
    """Folds whose results count: in ``folds.csv``, in ``train.folds`` (when set) and finished with the
    current training settings. A fold dropped from ``train.folds``, trained with other settings or left
    unfinished never mixes into the OOF score or the test predictions."""
    wanted = set(cfg.train.folds) if cfg.train.folds is not None else None
    return [int(f) for f in sorted(set(fold_of)) if (wanted is None or f in wanted) and fold_done(cfg, int(f))]


def collect_oof(cfg: Config, index: pd.DataFrame, folds: pd.DataFrame, classes: list[str],
                name: str = "oof.npy") -> tuple[pd.DataFrame, np.ndarray]:
    """Stitch the held-out probabilities of every fold that counts (:func:`counted_folds`) into one table
    aligned with the train index; rows of other folds are NaN."""
    probs = np.full((len(index), len(classes)), np.nan, dtype=np.float32)
    fold_of = folds["fold"].to_numpy()
    for fold in counted_folds(cfg, fold_of):
        path = cfg.run_dir / f"fold{fold}" / name
        if path.is_file():
            probs[fold_of == fold] = np.load(path)
    frame = pd.DataFrame(probs, columns=classes)
    frame.insert(0, "fold", fold_of)
    frame.insert(0, "label", index["label"].to_numpy())
    frame.insert(0, "id", index["id"].to_numpy())
    return frame, probs


def cv_report(cfg: Config, index: pd.DataFrame, folds: pd.DataFrame, probs: np.ndarray) -> dict:
    """Accuracy, macro-F1 and log loss per fold and over all scored rows."""
    labels, fold_of = index["label_idx"].to_numpy(), folds["fold"].to_numpy()
    done = ~np.isnan(probs).any(axis=1)
    per_fold = {int(f): score(labels[(fold_of == f) & done], probs[(fold_of == f) & done])
                for f in sorted(set(fold_of[done]))}
    return {"experiment": cfg.experiment, "model": cfg.model.name, "folds": per_fold,
            "oof": score(labels[done], probs[done]) if done.any() else {}, "scored_rows": int(done.sum()),
            "total_rows": len(labels)}
