"""Fine-tuning recipes for pretrained backbones, used by the training recipe.

* ``train.freeze_epochs``: the first epochs train only the classifier; the frozen backbone runs in eval mode
  (its batch-norm statistics and dropout untouched), then everything trains.
* ``train.backbone_lr_mult``: the backbone's learning rate is the head's times this (a new head learns fast,
  pretrained features should move little).
* ``train.ema_decay``: an exponential moving average of the weights (timm's ``ModelEmaV3`` with warm-up, so it
  also helps short runs); the average is what is evaluated and kept as the fold's best model.
* ``train.head_init: linear_probe``: the classifier starts as a logistic regression fitted on the frozen
  pretrained features of the fold's training rows (LP-FT), so fine-tuning starts from a good head.
* ``train.bn: frozen``: batch-norm layers keep their pretrained running statistics (eval mode) while the rest
  trains, so tiny batches (a few photos per step on a CPU) cannot corrupt them.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pipeline.core.config import Config, TrainConfig
from pipeline.training import features

log = logging.getLogger(__name__)


def head_module(model: nn.Module) -> Optional[nn.Module]:
    """The classifier of a timm model (``get_classifier``) or a compact model (``head``); None if unknown."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        return head if isinstance(head, nn.Module) else None
    return getattr(model, "head", None)


def param_groups(cfg: TrainConfig, model: nn.Module) -> list[dict]:
    """Optimizer groups: weight decay on weights only (not norms, biases), and the backbone's learning rate
    scaled by ``backbone_lr_mult`` (the head keeps ``lr``)."""
    head = head_module(model)
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    groups = []
    for is_head in (False, True):
        lr = cfg.lr * (1.0 if is_head else cfg.backbone_lr_mult)
        params = [p for p in model.parameters() if (id(p) in head_ids) == is_head]
        groups += [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay, "lr": lr},
                   {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr": lr}]
    return [g for g in groups if g["params"]]


def train_mode(model: nn.Module, cfg: TrainConfig, epoch: int) -> bool:
    """Put ``model`` in training mode for ``epoch``: frozen backbone during ``freeze_epochs`` (only the head
    trains, the backbone in eval mode), batch norm in eval mode with ``bn: frozen``. Returns whether frozen."""
    model.train()
    head = head_module(model)
    frozen = epoch < cfg.freeze_epochs
    if frozen and head is None:
        raise ValueError(f"train.freeze_epochs: cannot find the classifier of {type(model).__name__} to train alone")
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    for p in model.parameters():
        p.requires_grad_(not frozen or id(p) in head_ids)
    if frozen:
        model.eval()
        head.train()
    elif cfg.bn == "frozen":
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.eval()
    return frozen


def build_ema(cfg: TrainConfig, model: nn.Module):
    """timm's ``ModelEmaV3`` of ``model`` (decay ``ema_decay`` reached after a warm-up), or None when off."""
    if cfg.ema_decay <= 0:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)


@torch.no_grad()
def linear_probe_head(cfg: Config, model: nn.Module, manifest: dict, train_rows: np.ndarray, labels: np.ndarray,
                      device: torch.device) -> None:
    """Set the classifier of ``model`` to a logistic regression fitted on the frozen features of ``train_rows``
    (every TTA view, as the features mode does; embeddings cached and shared with it). Held-out rows unused."""
    head = head_module(model)
    feats = features.embeddings(cfg, manifest, "train", features.train_views(cfg), device)
    x = np.concatenate([f[train_rows] for f in feats.values()])
    probe = features.HEADS.build("logreg", cfg, x, np.tile(labels[train_rows], len(feats)), len(manifest["classes"]))
    if not isinstance(head, nn.Linear) or head.weight.shape != probe.weight.shape:
        raise ValueError(f"train.head_init=linear_probe: the classifier of {type(model).__name__} is not a linear "
                         f"layer of shape {tuple(probe.weight.shape)} on the pooled features")
    head.weight.copy_(probe.weight.to(head.weight))
    head.bias.copy_(probe.bias.to(head.bias))
    log.info("train.head_init: classifier set to a logistic regression on %d×%d frozen features", *x.shape)
