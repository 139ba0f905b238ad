"""The training recipe: :func:`build_training` builds everything one model's training needs from the config.

The train stage's folds, every search trial and the bench call it, so all three run one recipe: the model (its
head from a linear probe, whitening), the loader and augmentation policy, the optimizer, the schedule, the loss,
mixing, the weight average (EMA), the frozen backbone or batch norm of fine-tuning and progressive resizing.
A caller that cannot honour a setting refuses it (:func:`refuse`), naming the key, instead of ignoring it.
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from timm.optim import Lookahead
from torch import nn
from tqdm import tqdm

from pipeline import augment
from pipeline.core.config import Config, ConfigError, TrainConfig, changed
from pipeline.core.utils import configure_backends, seed_everything
from pipeline.data.dataset import to_float
from pipeline.evaluation.tta import predict_logits
from pipeline.models.factory import create_model
from pipeline.models.weights import normalization
from pipeline.models.whiten import freeze_whitening, init_whitening
from pipeline.training import finetune
from pipeline.training.loaders import make_fold_loader
from pipeline.training.losses import build_loss
from pipeline.training.precision import compute_settings
from pipeline.training.schedulers import Schedule, build_scheduler
from pipeline.training.step import TrainStep

log = logging.getLogger(__name__)
ESTIMATE_AFTER = 3  # the cost estimate is logged after this many batches of the first epoch (and one more)


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
        opt = Lookahead(opt, alpha=cfg.lookahead_alpha, k=cfg.lookahead_k)
    return opt


@dataclass
class Training:
    """One model's training, as :func:`build_training` made it."""
    cfg: Config
    device: torch.device
    model: nn.Module
    policy: Any  # the augmentation policy (its random state is part of an exact resume)
    loader: Any  # ChunkedLoader or DeviceLoader
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    ema: Optional[nn.Module]
    step: TrainStep
    whitened: Optional[nn.Module]
    mean: tuple
    std: tuple
    dtype: Optional[torch.dtype]
    channels_last: bool
    size: int

    @property
    def eval_model(self) -> nn.Module:
        """What is evaluated and kept: the weight average when EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    def run_epoch(self, epoch: int, desc: str, deadline: Optional[float] = None) -> tuple[float, bool]:
        """One pass over the loader as the recipe trains ``epoch`` (frozen backbone or batch norm, whitening
        bias, input size); (mean training loss, whether it stopped at ``deadline``, a ``time.monotonic`` value)."""
        finetune.train_mode(self.model, self.cfg.train, epoch)
        if self.whitened is not None:
            freeze_whitening(self.cfg.model, self.whitened, epoch)
        size = augment.size_at_epoch(self.cfg.augment, epoch, self.size)
        total, n = 0.0, 0
        self.loader.set_epoch(epoch)
        start = time.perf_counter()
        for i, (images, targets) in enumerate(tqdm(self.loader, desc=desc, unit="batch", leave=False,
                                                   mininterval=1.0)):
            total += self.step(images, targets, size) * len(targets)
            n += len(targets)
            if i == ESTIMATE_AFTER and epoch == 0:
                self.log_cost((time.perf_counter() - start) / (i + 1))
            if deadline is not None and time.monotonic() > deadline:
                return total / max(n, 1), True
        return total / max(n, 1), False

    def log_cost(self, seconds_per_batch: float) -> None:
        """What one epoch and the whole training cost on this machine, from the first batches' pace."""
        epoch = seconds_per_batch * len(self.loader)
        log.info("cost on this machine: %.2fs per batch (first %d), about %.0fs per epoch, %.1f min for %d epochs",
                 seconds_per_batch, ESTIMATE_AFTER + 1, epoch, epoch * self.cfg.train.epochs / 60,
                 self.cfg.train.epochs)

    def predict(self, images: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        """Logits of :attr:`eval_model` for ``rows`` of a uint8 cache, centre view (float32, CPU)."""
        return predict_logits(self.eval_model, images, rows, self.mean, self.std, self.device, self.dtype,
                              self.channels_last, self.cfg.infer.batch_size, self.size)


def build_training(cfg: Config, images: np.ndarray, labels: np.ndarray, train_rows: np.ndarray, manifest: dict,
                   device: torch.device, seed: int, targets: Optional[np.ndarray] = None,
                   precision: Optional[tuple[Optional[torch.dtype], bool]] = None,
                   probe: bool = True) -> Training:
    """Everything that trains a model on ``train_rows`` of ``images`` (``labels``: class index per row; ``targets``:
    soft targets per row instead, for distillation), seeded with ``seed``.

    ``precision`` (autocast dtype, channels_last) overrides the configured one (the bench times each);
    ``probe=False`` starts the head at random instead of ``train.head_init: linear_probe`` (the bench: the head's
    start does not change throughput, and the probe costs a pass over the data)."""
    mean, std = normalization(cfg.model, manifest)
    dtype, channels_last = precision or compute_settings(cfg, device)
    size, n_classes = cfg.data.image_size, len(manifest["classes"])
    configure_backends(cfg.train.deterministic)
    seed_everything(seed)
    model = create_model(cfg.model, n_classes).to(device)
    if probe and cfg.train.head_init == "linear_probe":
        finetune.linear_probe_head(cfg, model, manifest, train_rows, labels, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    whitened = init_whitening(cfg.model, model, images, train_rows, mean, std, size) if cfg.model.whiten else None
    train_targets = (labels if targets is None else targets)[train_rows]
    policy, loader = make_fold_loader(cfg, images, train_rows, train_targets, size, seed, device)
    inputs = functools.partial(to_float, mean=mean, std=std, device=device, channels_last=channels_last)
    optimizer, schedule, ema, step = build_optimization(
        cfg, model, model, labels[train_rows], n_classes, len(loader), device, dtype, inputs,
        augment.build_mixer(cfg.augment, n_classes, seed=seed))
    return Training(cfg, device, model, policy, loader, optimizer, schedule, ema, step, whitened, mean, std, dtype,
                    channels_last, size)


def build_optimization(cfg: Config, model: nn.Module, trained: nn.Module, train_labels: np.ndarray, n_classes: int,
                       batches: int, device: torch.device, dtype: Optional[torch.dtype],
                       inputs: Callable[[torch.Tensor], torch.Tensor], mixer: Optional[Callable] = None
                       ) -> tuple[torch.optim.Optimizer, Schedule, Optional[nn.Module], TrainStep]:
    """The recipe's optimisation of ``model`` whatever it trains on: the optimizer over its trainable weights, the
    schedule (``batches`` a pass, ``train.accum_steps`` a step), the loss (``train_labels`` weigh its classes), the
    weight average and the step that runs ``trained`` (``model`` or a part of it) on ``inputs(batch)``."""
    optimizer = build_optimizer(cfg.train, model)  # frozen parameters get no gradient, so they never move
    schedule = build_scheduler(cfg.train, optimizer, max(1, batches // max(1, cfg.train.accum_steps)))
    loss_fn = build_loss(cfg.train, train_labels, n_classes).to(device)
    ema = finetune.build_ema(cfg.train, model)
    step = TrainStep(trained, optimizer, loss_fn, schedule, device, dtype, inputs, cfg.train.accum_steps, mixer, ema,
                     averaged=model)
    return optimizer, schedule, ema, step


def refuse(cfg: Config, caller: str, keys: dict[str, str]) -> None:
    """Raise a ConfigError naming every ``section.key`` in ``keys`` that ``cfg`` sets away from its default:
    ``caller`` cannot honour it (``keys`` maps each to why), and a setting is never silently ignored."""
    found = [f"{key}={value!r} ({keys[key]})" for key, value in changed(cfg, keys).items()]
    if found:
        raise ConfigError(f"{caller} cannot honour {'; '.join(found)}: unset it for this command")

