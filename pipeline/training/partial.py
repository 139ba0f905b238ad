"""Partial fine-tuning on cached activations (``train.mode: partial``), shared by the train and infer stages.

The step between the frozen-feature probe and a full fine-tune: the pretrained backbone is cut before its last
``train.tune_blocks`` blocks. The frozen front (stem and early blocks) runs once per image and view, and its
output is cached in half precision under ``<data.cache_dir>/activations/`` (keyed like the embeddings, plus the
cut), so every fold, a second run or another schedule reuses it. Per fold, the last blocks, the head convolution
and a new classifier (from a linear probe with ``train.head_init: linear_probe``) train on the cached
activations of the other folds through the recipe's optimisation (optimizer, schedule, loss, EMA, the training
step with its precision and ``train.accum_steps``; :func:`pipeline.training.recipe.build_optimization`), batch
norm frozen with ``train.bn: frozen``, the kept epoch chosen and stopped early as in a full fine-tune. Image
augmentation and mixing cannot reach cached activations: :class:`PartialMode` refuses them. One epoch is one
pass over the training rows, each under one of the cached training views (identity, the TTA views and
``train.crop_views`` random resized crops) drawn at random: more views are more augmentation at no cost per
epoch. A fold saves the whole network (front + tuned back) like any checkpoint,
so it also predicts from images; infer predicts from the cached test activations instead.
"""
from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from timm.models.efficientnet import EfficientNet
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm import tqdm

from pipeline.core.config import Config, ConfigError
from pipeline.core.timing import Effort, timed
from pipeline.core.utils import atomic_path, autocast, configure_backends, seed_everything
from pipeline.evaluation.metrics import score
from pipeline.evaluation.tta import configured_views
from pipeline.models.factory import create_model
from pipeline.models.weights import is_pretrained, normalization
from pipeline.rundir import RunDir, load_split
from pipeline.training import features
from pipeline.training.checkpoints import load_weights
from pipeline.training.mode import FOLD_OVERHEAD_S, TRAIN_MODES, Cost, FoldData, Predict, Rates, TrainMode, \
    cached_pass_refusals, stretch, with_min_steps
from pipeline.training.precision import compute_settings
from pipeline.training.recipe import build_optimization
from pipeline.training.record import FoldRecord, Monitor, log_epoch
from pipeline.training.schedulers import Schedule
from pipeline.training.step import TrainStep

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
    front = features.frozen_key(cfg, f"last{cfg.train.tune_blocks}")
    key = f"{split}-{front}-{features.pass_setting(cfg)}-{view.replace('+', '_')}-{manifest[split]['signature'][:12]}"
    return Path(cfg.data.cache_dir) / "activations" / f"{key}.npy"


def pretrained_model(cfg: Config, num_classes: int) -> nn.Module:
    if not is_pretrained(cfg.model):
        raise ConfigError("train.mode=partial: needs a pretrained backbone: set model.pretrained=true "
                          "(tf_efficientnet_lite0/1/2 ship offline) or model.weights=PATH")
    return create_model(cfg.model, num_classes)


def activations(cfg: Config, manifest: dict, split: str, views: list[str], device: torch.device) -> np.ndarray:
    """V×N×C×H×W float16: the frozen front's output for every image of ``split`` under each of ``views``,
    computed once per view and cached (again when a cached file is damaged)."""
    paths = [activations_path(cfg, manifest, split, v) for v in views]
    cached = {v: features.read_cached(p, manifest[split]["n"]) for v, p in zip(views, paths)}
    missing = [v for v, array in cached.items() if array is None]
    if missing:
        images, _ = load_split(cfg.run_dir, split, manifest)
        front = frozen_front(cfg, len(manifest["classes"]), device)
        mean, std = normalization(cfg.model, manifest)
        start = time.perf_counter()
        arrays = features.embed_views(front, images, missing, cfg, mean, std, device, f"cache {split}",
                                      features.frozen_key(cfg, f"last{cfg.train.tune_blocks}"), np.float16)
        seconds = time.perf_counter() - start
        for view, array in zip(missing, arrays):
            cached[view] = array
            path = activations_path(cfg, manifest, split, view)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                np.save(tmp, array)
        log.info("partial: %s %d images × %d view(s) %s through the frozen front in %.1fs (%.1f img/s), "
                 "activations %s", split, len(images), len(missing), missing, seconds,
                 len(images) * len(missing) / max(seconds, 1e-9), tuple(arrays[0].shape[1:]))
    return np.stack([cached[v] for v in views])


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


@dataclass
class Tuning:
    """One fold's partial fine-tune: the network (front frozen, back trainable) and the recipe's optimisation of
    it (:func:`~pipeline.training.recipe.build_optimization`: optimizer, schedule, loss, EMA and step)."""
    cfg: Config
    model: nn.Module
    back: nn.Module
    schedule: Schedule
    ema: Optional[nn.Module]
    step: TrainStep
    device: torch.device

    def run_epoch(self, acts: np.ndarray, rows: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                  desc: str) -> float:
        """One pass over ``rows`` in random order, each row under a random cached view; the mean training loss."""
        set_train_mode(self.model, self.back, self.cfg)
        order, views = rng.permutation(rows), rng.integers(len(acts), size=len(rows))
        total, bs = 0.0, self.cfg.train.batch_size
        for start in tqdm(range(0, len(order), bs), desc=desc, unit="batch", leave=False, mininterval=1.0):
            batch, view = order[start:start + bs], views[start:start + bs]
            x = torch.from_numpy(acts[view, batch].astype(np.float32))
            total += self.step(x, torch.from_numpy(labels[batch])) * len(batch)
        return total / max(len(order), 1)

    def evaluate(self, acts: np.ndarray, rows: np.ndarray, labels: np.ndarray) -> tuple[nn.Module, np.ndarray, dict]:
        """What the fold keeps (the EMA when on), its held-out probabilities (identity view) and scores."""
        model = self.ema.module if self.ema is not None else self.model
        _, back = split_backbone(model, self.cfg.train.tune_blocks)
        logits = run_back(back, acts[0], rows, self.cfg.train.batch_size, self.device)
        probs = logits.softmax(1).numpy()
        metrics = score(labels[rows], probs)
        loss = self.step.loss_fn(logits, torch.from_numpy(labels[rows])) if len(rows) else math.nan
        return model, probs, {**metrics, "loss": float(loss)}


def build_tuning(cfg: Config, acts: np.ndarray, labels: np.ndarray, train_rows: np.ndarray, n_classes: int,
                 device: torch.device, seed: int) -> Tuning:
    """The fold's network (front frozen, back trainable, the classifier from a linear probe with
    ``train.head_init: linear_probe``) and the recipe's optimisation of its back on cached activations."""
    configure_backends(cfg.train.deterministic)
    seed_everything(seed)
    model = pretrained_model(cfg, n_classes).to(device)
    _, back = split_backbone(model, cfg.train.tune_blocks)
    model.requires_grad_(False)
    back.requires_grad_(True)
    if cfg.train.head_init == "linear_probe":
        probe_head(cfg, model, back, acts, train_rows, labels, device)
    dtype, channels_last = compute_settings(cfg, device)
    # train.channels_last holds for the back in fp32 (its step measured 1.35x on a CPU); in bf16 it measured
    # 0.93x (docs/RESULTS.md), so there the back stays contiguous
    channels_last = channels_last and dtype is None
    if channels_last:
        model.to(memory_format=torch.channels_last)
    batches = math.ceil(len(train_rows) / cfg.train.batch_size)
    _, schedule, ema, step = build_optimization(cfg, model, back, labels[train_rows], n_classes, batches, device,
                                                dtype, functools.partial(_inputs, device=device, cl=channels_last))
    return Tuning(cfg, model, back, schedule, ema, step, device)


def _inputs(x: torch.Tensor, device: torch.device, cl: bool) -> torch.Tensor:
    """A batch of cached activations on the device, channels-last when the network is."""
    x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if cl else x


def fit_fold(data: FoldData, fold: int, acts: np.ndarray) -> dict:
    """Train fold ``fold``'s back on the other folds' cached activations, keep the epoch ``train.monitor`` picks
    (stopping early with ``train.early_stopping``), as the train stage does for a full fine-tune."""
    cfg, labels = data.cfg, data.labels
    record = FoldRecord(cfg, fold)
    train_rows, valid_rows = data.rows(fold)
    recipe = with_min_steps(cfg, len(train_rows))
    epochs = recipe.train.epochs
    tuning = build_tuning(recipe, acts, labels, train_rows, len(data.classes), data.device, cfg.seed + fold)
    monitor, kept = Monitor(cfg.train.monitor, cfg.train.early_stopping), {}
    rng = np.random.default_rng(cfg.seed + fold)
    for epoch in range(epochs):
        t0 = time.perf_counter()
        loss = tuning.run_epoch(acts, train_rows, labels, rng, f"fold{fold} epoch {epoch + 1}/{epochs}")
        model, probs, metrics = tuning.evaluate(acts, valid_rows, labels)
        tuning.schedule.step_epoch(metrics["loss"])
        improved = monitor.update(epoch, metrics)
        log_epoch(record.dir.name, epoch + 1, epochs, loss, metrics, time.perf_counter() - t0, improved)
        if improved:
            kept = metrics
            record.keep(model, probs, record.meta(epoch, data.classes, metrics, tune_blocks=cfg.train.tune_blocks))
        if monitor.stop:
            log.info("%s: early stop, no improvement for %d epochs", record.dir.name, monitor.stale)
            break
    return record.finish(monitor.best_epoch, epoch + 1, kept, sum(p.numel() for p in tuning.back.parameters()))


def predict_fold(cfg: Config, fold: int, manifest: dict, split: str, rows: np.ndarray, views: list[str],
                 device: torch.device) -> np.ndarray:
    """A fold's probabilities for ``rows`` of ``split``, averaged over the TTA ``views``, from cached activations."""
    acts = activations(cfg, manifest, split, views, device)
    model = load_weights(pretrained_model(cfg, len(manifest["classes"])), RunDir.of(cfg).model(fold).weights("best"))
    _, back = split_backbone(model.to(device), cfg.train.tune_blocks)
    return np.mean([run_back(back, view, rows, cfg.train.batch_size, device).softmax(1).numpy() for view in acts],
                   axis=0)


def frozen_front(cfg: Config, classes: int, device: torch.device) -> nn.Module:
    """The pretrained backbone's frozen front (before its last ``train.tune_blocks`` blocks), in eval mode."""
    front, _ = split_backbone(pretrained_model(cfg, classes), cfg.train.tune_blocks)
    return front.to(device).eval().requires_grad_(False)


def measure_back(cfg: Config, classes: int, device: torch.device, effort: Effort) -> tuple[float, float]:
    """Images/s of ``train.mode: partial``'s tuned back on random activations: its forward + backward + AdamW
    step on a training batch, and its forward alone."""
    model = create_model(cfg.model, classes).to(device).eval()
    front, back = split_backbone(model, cfg.train.tune_blocks)
    x = torch.randn(1, 3, cfg.data.image_size, cfg.data.image_size, device=device)
    with torch.no_grad():
        acts = front(x).float().repeat(cfg.train.batch_size, 1, 1, 1)
    labels = torch.arange(len(acts), device=device) % classes
    optimizer = torch.optim.AdamW(back.parameters(), lr=1e-4)
    dtype = compute_settings(cfg, device)[0]

    def step() -> int:
        back.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = torch.nn.functional.cross_entropy(back(acts), labels)
        loss.backward()
        optimizer.step()
        return len(acts)

    @torch.no_grad()
    def forward_back() -> int:
        back.eval()
        back(acts)
        return len(acts)

    return timed(step, 1, effort), timed(forward_back, 1, effort)


# what the back trains on is cached activations, not images: image augmentation and mixing cannot reach them
_IMAGES = "partial trains on cached activations: its augmentation is the cached views (train.crop_views, infer.tta)"


@TRAIN_MODES.register("partial")
class PartialMode(TrainMode):
    """``train.mode: partial``: the frozen front cached once per view, the last ``train.tune_blocks`` blocks,
    head convolution and a new classifier trained per fold on the cache with the recipe's optimisation."""
    name = "partial"
    unused = ("train.resume",)  # a fold trains from its start: its epochs are minutes on a cache
    refused = {
        **cached_pass_refusals(_IMAGES, "the back"),
        "train.freeze_epochs": "the back trains from its first step (a classifier-only start: train.head_init)",
        "train.head": "the features mode's head: partial trains the network's own classifier",
        "train.head_hidden": "the features mode's mlp head",
        "train.head_steps": "the features mode's mlp head",
    }

    def prepare(self, data: FoldData) -> np.ndarray:
        return activations(data.cfg, data.manifest, "train", features.train_views(data.cfg), data.device)

    def fit_fold(self, data: FoldData, fold: Optional[int], prepared: np.ndarray) -> dict:
        return fit_fold(data, fold, prepared)

    def predictor(self, cfg: Config, fold: Optional[int], manifest: dict, device: torch.device) -> Predict:
        return lambda split, rows, views: predict_fold(cfg, fold, manifest, split, rows, views, device)

    def cache_key(self, cfg: Config) -> tuple:
        return ("partial", cfg.model.name, cfg.data.image_size, cfg.train.tune_blocks)

    def cost(self, rates: Rates, cfg: Config, before: set[tuple]) -> Cost:
        """The front once per image and view not cached before; per fold the linear probe's pass over the
        training rows' views, then each epoch a training pass over the other folds' rows and one over its own,
        and the held-out rows and test set under every TTA view."""
        n, t, k = rates.facts.images, rates.facts.test_images, cfg.folds.n_splits
        train, test = features.train_views(cfg), configured_views(cfg.infer)
        cut = f"last{cfg.train.tune_blocks}"
        front = rates.frozen_rate(cfg, cut, lambda: frozen_front(cfg, rates.facts.classes, rates.device))
        key = ("partial back img (step / forward)", cfg.model.name, cfg.data.image_size, cut, cfg.train.batch_size)
        step, back = rates.measured(key, lambda: measure_back(cfg, rates.facts.classes, rates.device, rates.effort))
        probe = (k - 1) * n * len(train) / back if cfg.train.head_init == "linear_probe" else 0.0
        new, train_new = rates.new_images(cfg, before), rates.new_images(cfg, before, ("train",))
        infer = (new - train_new) / front + (n + k * t) * len(test) / back
        return Cost(train_new / front + probe + infer + k * FOLD_OVERHEAD_S,
                    (n * (k - 1) / step + n / back) * stretch(cfg, n * (k - 1) / k), once=train_new / front,
                    infer=infer)
