"""Partial fine-tuning on cached activations (``train.mode: partial``), shared by the train and infer stages.

The step between the frozen-feature probe and a full fine-tune: the pretrained backbone is cut before its last
``train.tune_blocks`` blocks. The frozen front (stem and early blocks) runs once per image and view, and its
output is cached in half precision under ``<data.cache_dir>/activations/`` (keyed like the embeddings, plus the
cut), so every fold, a second run or another schedule reuses it. Per fold, the last blocks, the head convolution
and a new classifier (from a linear probe with ``train.head_init: linear_probe``) train on the cached
activations of the other folds with the configured optimizer, schedule, loss and EMA, batch norm frozen with
``train.bn: frozen``. One epoch is one pass over the training rows, each under one of the cached training views
(identity, the TTA views and ``train.crop_views`` random resized crops) drawn at random: more views are more
augmentation at no cost per epoch. A fold saves the whole network (front + tuned back) like any checkpoint,
so it also predicts from images; infer predicts from the cached test activations instead.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from timm.models.efficientnet import EfficientNet
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm import tqdm

from pipeline.core.config import Config, ConfigError, to_dict, with_values
from pipeline.core.utils import atomic_path, seed_everything, write_json
from pipeline.evaluation.metrics import score
from pipeline.models.factory import create_model
from pipeline.models.weights import is_pretrained, normalization, weights_id
from pipeline.provenance import trained_with
from pipeline.rundir import RunDir, load_split, without_secrets
from pipeline.training import features, finetune
from pipeline.training.checkpoints import load_weights, save_checkpoint
from pipeline.training.losses import build_loss
from pipeline.training.recipe import build_optimizer
from pipeline.training.schedulers import build_scheduler

log = logging.getLogger(__name__)


def flat_blocks(model: nn.Module) -> list[nn.Module]:
    """The backbone's blocks in order (every stage's), of a timm EfficientNet-family model."""
    if not isinstance(model, EfficientNet):
        raise ConfigError(f"train.mode=partial: needs an EfficientNet-family backbone (tf_efficientnet_lite0/1/2, "
                          f"efficientnet_b0, ...); {type(model).__name__} has no block list to cut")
    return [block for stage in model.blocks for block in stage]


def split_backbone(model: nn.Module, tune_blocks: int) -> tuple[nn.Module, nn.Module]:
    """(front, back) sharing ``model``'s modules: ``back(front(x)) == model(x)``. The back is the last
    ``tune_blocks`` blocks, the head convolution and its norm, the pooling, dropout and classifier."""
    blocks = flat_blocks(model)
    if not 1 <= tune_blocks <= len(blocks):
        raise ConfigError(f"train.tune_blocks: {model.default_cfg.get('architecture', 'the model')} has "
                          f"{len(blocks)} blocks, got {tune_blocks}")
    cut = len(blocks) - tune_blocks
    front = nn.Sequential(model.conv_stem, model.bn1, *blocks[:cut])
    back = nn.Sequential(*blocks[cut:], model.conv_head, model.bn2, model.global_pool, nn.Dropout(model.drop_rate),
                         model.classifier)
    return front, back


def pooled(back: nn.Module) -> nn.Module:
    """The back without its dropout and classifier: pooled features, as the linear probe sees them."""
    return back[:-2]


def activations_path(cfg: Config, manifest: dict, split: str, view: str) -> Path:
    """Where the front's output for ``split`` under ``view`` lives; the key names everything it depends on."""
    key = (f"{split}-{cfg.model.name}-{weights_id(cfg.model)}-{cfg.data.image_size}px-last{cfg.train.tune_blocks}-"
           f"{view.replace('+', '_')}-{manifest[split]['signature'][:12]}")
    return Path(cfg.data.cache_dir) / "activations" / f"{key}.npy"


def pretrained_model(cfg: Config, num_classes: int) -> nn.Module:
    if not is_pretrained(cfg.model):
        raise ConfigError("train.mode=partial: needs a pretrained backbone: set model.pretrained=true "
                          "(tf_efficientnet_lite0/1/2 ship offline) or model.weights=PATH")
    return create_model(cfg.model, num_classes)


def activations(cfg: Config, manifest: dict, split: str, views: list[str], device: torch.device) -> np.ndarray:
    """V×N×C×H×W float16: the frozen front's output for every image of ``split`` under each of ``views``,
    computed once per view and cached."""
    paths = [activations_path(cfg, manifest, split, v) for v in views]
    missing = [v for v, p in zip(views, paths) if not p.is_file()]
    if missing:
        images, _ = load_split(cfg.run_dir, split, manifest)
        front, _ = split_backbone(pretrained_model(cfg, len(manifest["classes"])), cfg.train.tune_blocks)
        front = front.to(device).eval().requires_grad_(False)
        mean, std = normalization(cfg.model, manifest)
        start = time.perf_counter()
        arrays = features.embed_views(front, images, missing, cfg, mean, std, device, f"cache {split}", np.float16)
        seconds = time.perf_counter() - start
        for view, array in zip(missing, arrays):
            path = activations_path(cfg, manifest, split, view)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                np.save(tmp, array)
        log.info("partial: %s %d images × %d view(s) %s through the frozen front in %.1fs (%.1f img/s), "
                 "activations %s", split, len(images), len(missing), missing, seconds,
                 len(images) * len(missing) / max(seconds, 1e-9), tuple(arrays[0].shape[1:]))
    return np.stack([np.load(p) for p in paths])


@torch.no_grad()
def run_back(back: nn.Module, acts: np.ndarray, rows: np.ndarray, batch_size: int,
             device: torch.device) -> torch.Tensor:
    """``back``'s output (float32, CPU) for ``rows`` of one view's activations, in eval mode."""
    back.eval()
    out = [back(torch.from_numpy(acts[rows[i:i + batch_size]].astype(np.float32)).to(device)).float().cpu()
           for i in range(0, len(rows), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def set_train_mode(model: nn.Module, back: nn.Module, cfg: Config) -> None:
    """The front in eval mode (frozen), the back training, its batch norm frozen with ``train.bn: frozen``."""
    model.eval()
    back.train()
    if cfg.train.bn == "frozen":
        for module in back.modules():
            if isinstance(module, _BatchNorm):
                module.eval()


def probe_head(cfg: Config, model: nn.Module, back: nn.Module, acts: np.ndarray, rows: np.ndarray,
               labels: np.ndarray, device: torch.device) -> None:
    """Set the classifier to a logistic regression on the pooled pretrained features of ``rows`` (every
    cached view), as ``train.head_init: linear_probe`` does for a full fine-tune."""
    feats = np.concatenate([run_back(pooled(back), view, rows, cfg.train.batch_size, device).numpy()
                            for view in acts])
    probe = features.HEADS.build("logreg", cfg, feats, np.tile(labels[rows], len(acts)), model.num_classes)
    with torch.no_grad():
        model.classifier.weight.copy_(probe.weight)
        model.classifier.bias.copy_(probe.bias)
    log.info("partial: classifier from a logistic regression on %d×%d pooled features", *feats.shape)


def fit_folds(cfg: Config, wanted: list[int], index: pd.DataFrame, folds: pd.DataFrame, classes: list[str],
              manifest: dict, device: torch.device) -> int:
    """Train the back of every wanted fold not already done with these settings; return how many trained."""
    return features.fit_cached_folds(
        cfg, wanted, lambda: activations(cfg, manifest, "train", features.train_views(cfg), device),
        lambda fold, acts: fit_fold(cfg, fold, acts, index, folds, classes, device), "trained")


def _epoch(cfg: Config, parts: dict, acts: np.ndarray, rows: np.ndarray, labels: np.ndarray,
           rng: np.random.Generator, desc: str) -> float:
    """One pass over ``rows`` in random order, each row under a random cached view; the mean training loss."""
    model, back, optimizer, schedule, loss_fn, ema = (parts[k] for k in ("model", "back", "optimizer", "schedule",
                                                                          "loss", "ema"))
    set_train_mode(model, back, cfg)
    order, views = rng.permutation(rows), rng.integers(len(acts), size=len(rows))
    total, bs = 0.0, cfg.train.batch_size
    for start in tqdm(range(0, len(order), bs), desc=desc, unit="batch", leave=False, mininterval=1.0):
        batch, view = order[start:start + bs], views[start:start + bs]
        x = torch.from_numpy(acts[view, batch].astype(np.float32)).to(parts["device"])
        y = torch.from_numpy(labels[batch]).to(parts["device"])
        loss = loss_fn(back(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step_batch()
        parts["updates"] += 1
        if ema is not None:
            ema.update(model, step=parts["updates"])
        total += loss.item() * len(batch)
    return total / max(len(order), 1)


def build_parts(cfg: Config, acts: np.ndarray, labels: np.ndarray, train_rows: np.ndarray, n_classes: int,
                device: torch.device, seed: int) -> dict:
    """The fold's network (front frozen, back trainable), optimizer over the back, schedule, loss and EMA."""
    seed_everything(seed)
    model = pretrained_model(cfg, n_classes).to(device)
    front, back = split_backbone(model, cfg.train.tune_blocks)
    model.requires_grad_(False)
    back.requires_grad_(True)
    if cfg.train.head_init == "linear_probe":
        probe_head(cfg, model, back, acts, train_rows, labels, device)
    optimizer = build_optimizer(cfg.train, model)  # frozen parameters get no gradient, so they never move
    schedule = build_scheduler(cfg.train, optimizer, math.ceil(len(train_rows) / cfg.train.batch_size))
    ema = finetune.build_ema(cfg.train, model)
    return {"model": model, "back": back, "optimizer": optimizer, "schedule": schedule, "ema": ema,
            "loss": build_loss(cfg.train, labels[train_rows], n_classes).to(device), "device": device, "updates": 0}


def _evaluate(cfg: Config, parts: dict, acts: np.ndarray, rows: np.ndarray, labels: np.ndarray) -> tuple:
    """Held-out probabilities (identity view) and scores of what the fold keeps (the EMA when on)."""
    model = parts["ema"].module if parts["ema"] is not None else parts["model"]
    _, back = split_backbone(model, cfg.train.tune_blocks)
    logits = run_back(back, acts[0], rows, cfg.train.batch_size, parts["device"])
    probs = logits.softmax(1).numpy()
    metrics = score(labels[rows], probs)
    metrics["loss"] = float(parts["loss"](logits, torch.from_numpy(labels[rows]))) if len(rows) else math.nan
    return model, probs, metrics


def with_min_steps(cfg: Config, rows: int) -> Config:
    """``cfg`` with enough epochs for ``train.min_steps`` optimizer steps over ``rows`` training rows."""
    steps = math.ceil(rows / cfg.train.batch_size)
    epochs = max(cfg.train.epochs, math.ceil(cfg.train.min_steps / steps))
    if epochs == cfg.train.epochs:
        return cfg
    log.info("partial: %d epochs instead of %d, for train.min_steps=%d steps of %d rows", epochs, cfg.train.epochs,
             cfg.train.min_steps, rows)
    return with_values(cfg, {"train.epochs": epochs})


def fit_fold(cfg: Config, fold: int, acts: np.ndarray, index: pd.DataFrame, folds: pd.DataFrame,
             classes: list[str], device: torch.device) -> dict:
    """Train fold ``fold``'s back on the other folds' cached activations, keep the epoch ``train.monitor`` picks
    (its weights, held-out probabilities and result), as the train stage does for a full fine-tune."""
    start = time.perf_counter()
    labels = index["label_idx"].to_numpy()
    held = folds["fold"].to_numpy() == fold
    train_rows, valid_rows = np.flatnonzero(~held), np.flatnonzero(held)
    seed, provenance = cfg.seed + fold, trained_with(cfg)
    cfg = with_min_steps(cfg, len(train_rows))
    parts = build_parts(cfg, acts, labels, train_rows, len(classes), device, seed)
    folder = RunDir.of(cfg).model(fold)
    folder.root.mkdir(parents=True, exist_ok=True)
    rng, best, kept = np.random.default_rng(seed), -math.inf, {}
    for epoch in range(cfg.train.epochs):
        t0 = time.perf_counter()
        loss = _epoch(cfg, parts, acts, train_rows, labels, rng, f"fold{fold} epoch {epoch + 1}/{cfg.train.epochs}")
        model, probs, metrics = _evaluate(cfg, parts, acts, valid_rows, labels)
        parts["schedule"].step_epoch(metrics["loss"])
        value = {"accuracy": metrics["accuracy"], "loss": -metrics["loss"], "last": float(epoch)}[cfg.train.monitor]
        improved = value > best
        log.info("fold%d epoch %d/%d: train_loss %.4f val_loss %.4f acc %.4f f1 %.4f %.1fs%s", fold, epoch + 1,
                 cfg.train.epochs, loss, metrics["loss"], metrics["accuracy"], metrics["macro_f1"],
                 time.perf_counter() - t0, " *" if improved else "")
        if improved:
            best, kept = value, {"epoch": epoch, "metrics": metrics}
            meta = {"fold": fold, "epoch": epoch, "classes": classes, "metrics": metrics, "model": cfg.model.name,
                    "image_size": cfg.data.image_size, "tune_blocks": cfg.train.tune_blocks,
                    "config": to_dict(without_secrets(cfg))}
            save_checkpoint(folder, "best", model, meta)
            with atomic_path(folder.predictions("oof")) as tmp:
                np.save(tmp, probs.astype(np.float32))
    result = {"fold": fold, "best_epoch": kept["epoch"], "metrics": kept["metrics"],
              "seconds": round(time.perf_counter() - start, 1),
              "parameters": sum(p.numel() for p in parts["back"].parameters()), **provenance}
    write_json(folder.result, result)
    return result


def predict_fold(cfg: Config, fold: int, manifest: dict, split: str, rows: np.ndarray, views: list[str],
                 device: torch.device) -> np.ndarray:
    """A fold's probabilities for ``rows`` of ``split``, averaged over the TTA ``views``, from cached activations."""
    acts = activations(cfg, manifest, split, views, device)
    model = load_weights(pretrained_model(cfg, len(manifest["classes"])), RunDir.of(cfg).model(fold).weights("best"))
    _, back = split_backbone(model.to(device), cfg.train.tune_blocks)
    return np.mean([run_back(back, view, rows, cfg.train.batch_size, device).softmax(1).numpy() for view in acts],
                   axis=0)
