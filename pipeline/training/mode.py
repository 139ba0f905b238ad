"""What a training mode is (``train.mode``): one registered object that every caller looks up by name.

A mode answers the few questions the train, infer and plan stages ask, so none of them branches on its name:

* which ``train.*`` / ``augment.*`` settings it cannot honour (:attr:`TrainMode.refused`: an error naming the key
  when one is set) and which it has no use for (:attr:`TrainMode.unused`: named once in the log);
* what it computes once before the folds (:meth:`TrainMode.prepare`: embeddings, cached activations or nothing)
  and how it fits one fold on that (:meth:`TrainMode.fit_fold`, writing through
  :class:`pipeline.training.record.FoldRecord`);
* how a fold's model predicts rows of a split under TTA views (:meth:`TrainMode.predictor`);
* what a member in this mode costs on this machine (:meth:`TrainMode.cost`, for the planner) and which of its
  passes a later member can reuse (:meth:`TrainMode.cache_key`).

Adding a mode is one module that subclasses :class:`TrainMode`, registers it in :data:`TRAIN_MODES` and is imported
by :mod:`pipeline.training.modes`, which also checks a config against its mode (:func:`pipeline.training.modes.check`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import numpy as np
import pandas as pd
import torch

from pipeline.core.config import AugmentConfig, Config, changed, with_values
from pipeline.core.registry import Registry
from pipeline.provenance import fold_done
from pipeline.rundir import RunDir
from pipeline.training.record import damage

log = logging.getLogger(__name__)

TRAIN_MODES: Registry = Registry("training mode")
FOLD_OVERHEAD_S = 2.0  # a fold's model building and checkpoints, in the planner's estimates

Predict = Callable[[str, np.ndarray, list[str]], np.ndarray]  # (split, rows, views) -> mean probabilities


@dataclass(frozen=True)
class Cost:
    """A member's seconds on this machine: ``fixed`` plus ``per_epoch`` for each training epoch. Two parts of
    ``fixed`` fall outside the folds: ``once``, spent before the first fold trains (decoding, caching the training
    images' passes), and ``infer``, the infer stage's after the last (held-out and test predictions under the TTA
    views, the test split's passes); the rest is spread evenly over the folds."""
    fixed: float
    per_epoch: float = 0.0
    once: float = 0.0
    infer: float = 0.0

    def seconds(self, epochs: int) -> float:
        return self.fixed + self.per_epoch * epochs

    def first_fold(self, epochs: int, folds: int) -> float:
        """Seconds until the first fold is trained: what is done once, and a fold's share of the training."""
        once = min(self.once, self.fixed)
        return once + (self.seconds(epochs) - once - min(self.infer, self.fixed - once)) / max(folds, 1)

    def scaled(self, factor: float) -> "Cost":
        """Every part times ``factor`` (a correction from the run's own timings)."""
        return Cost(*(factor * value for value in dataclasses.astuple(self)))


def epochs_for_min_steps(cfg: Config, rows: float) -> int:
    """``train.epochs``, or more when they would make fewer than ``train.min_steps`` optimizer steps over ``rows``
    training rows (a few hundred photos get more than a dozen steps)."""
    steps = max(1, math.ceil(rows / cfg.train.batch_size) // max(1, cfg.train.accum_steps))
    return max(cfg.train.epochs, math.ceil(cfg.train.min_steps / steps))


def with_min_steps(cfg: Config, rows: int) -> Config:
    """``cfg`` with :func:`epochs_for_min_steps` epochs (logged when that is more than ``train.epochs``)."""
    epochs = epochs_for_min_steps(cfg, rows)
    if epochs == cfg.train.epochs:
        return cfg
    log.info("%d epochs instead of %d, for train.min_steps=%d optimizer steps over %d rows", epochs,
             cfg.train.epochs, cfg.train.min_steps, rows)
    return with_values(cfg, {"train.epochs": epochs})


def stretch(cfg: Config, rows: float) -> float:
    """How many times ``train.epochs`` a fold of ``rows`` training rows trains for ``train.min_steps``."""
    return epochs_for_min_steps(cfg, rows) / max(cfg.train.epochs, 1)


def cached_pass_refusals(augmentation: str, learner: str) -> dict[str, str]:
    """What a mode that trains on cached passes of a frozen backbone cannot honour: every ``augment.*`` setting
    (the passes are fixed views: ``augmentation`` says what augments instead), a refit on images, and
    distillation (``learner`` fits hard labels)."""
    refusals = {f"augment.{f.name}": augmentation for f in dataclasses.fields(AugmentConfig)}
    refusals["train.refit"] = "a refit trains the whole network on images (train.mode=finetune)"
    for key in ("train.teacher", "train.distill_alpha", "train.distill_temperature"):
        refusals[key] = f"{learner} fits hard labels (distillation: train.mode=finetune)"
    return refusals


class Rates(Protocol):
    """The planner's measurements a mode's cost is made of (:class:`pipeline.plan.costs.Estimator`)."""
    facts: Any  # pipeline.eda.suggest.Facts: the EDA's image counts
    effort: Any  # pipeline.core.timing.Effort: how long each measurement runs
    device: torch.device

    def measured(self, key: tuple, measure: Callable[[], tuple[float, ...]],
                 margin: float = ...) -> tuple[float, ...]: ...

    def forward_rate(self, cfg: Config) -> float: ...

    def frozen_rate(self, cfg: Config, part: str, build: Callable[[], torch.nn.Module]) -> float: ...

    def train_rate(self, cfg: Config) -> float: ...

    def new_images(self, cfg: Config, before: set[tuple], splits: tuple[str, ...] = ("train", "test")) -> float: ...


@dataclass
class FoldData:
    """What every mode's folds train on: the preprocessed train split, its folds and the run's device."""
    cfg: Config
    manifest: dict
    images: np.ndarray  # uint8 N×S×S×3, memory-mapped
    index: pd.DataFrame
    folds: pd.DataFrame
    device: torch.device
    targets: Optional[np.ndarray] = None  # soft targets per row (distillation), else None

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def labels(self) -> np.ndarray:
        return self.index["label_idx"].to_numpy()

    def rows(self, fold: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
        """(training rows, held-out rows) of ``fold``; the refit (``None``) trains on every row."""
        held = self.folds["fold"].to_numpy() == fold if fold is not None else np.zeros(len(self.folds), bool)
        return np.flatnonzero(~held), np.flatnonzero(held)


class TrainMode:
    """One way of training a fold; subclasses register in :data:`TRAIN_MODES` under their ``train.mode`` name."""
    name = ""
    refused: dict[str, str] = {}  # settings it cannot honour -> why: set away from the default, an error
    unused: tuple[str, ...] = ()  # settings it has no use for (a shared config sets them for another mode)
    verb = "trained"

    def unused_set(self, cfg: Config) -> list[str]:
        """The :attr:`unused` settings ``cfg`` sets away from their defaults, as ``key=value``."""
        return [f"{key}={value!r}" for key, value in changed(cfg, self.unused).items()]

    def fit_folds(self, data: FoldData, wanted: list[Optional[int]]) -> int:
        """Fit every wanted fold (``None``: the refit) not already done, undamaged, with these settings, on what
        :meth:`prepare` computes once (only when a fold needs it); return how many were fitted."""
        todo = [f for f in wanted if not self.done(data.cfg, f)]
        for fold in (f for f in wanted if f not in todo):
            log.info("%s already %s with these settings: skipped", RunDir.of(data.cfg).model(fold).name, self.verb)
        if todo:
            prepared = self.prepare(data)
            for fold in todo:
                self.fit_fold(data, fold, prepared)
        return len(todo)

    def done(self, cfg: Config, fold: Optional[int]) -> bool:
        """True when the fold finished with these settings and its files are whole; a damaged fold is trained
        again from the start (its resume state goes with it)."""
        if not fold_done(cfg, fold):
            return False
        folder = RunDir.of(cfg).model(fold)
        broken = damage(folder)
        if broken is None:
            return True
        log.warning("%s: %s is missing or damaged: training the fold again", folder.name, broken)
        folder.last_state.unlink(missing_ok=True)  # from the start: its kept epoch is lost
        return False

    def prepare(self, data: FoldData) -> Any:
        """What every fold of this run shares, computed once before the first fold that trains."""
        return None

    def fit_fold(self, data: FoldData, fold: Optional[int], prepared: Any) -> dict:
        """Train fold ``fold`` and write its files; return its ``result.json``."""
        raise NotImplementedError

    def predictor(self, cfg: Config, fold: Optional[int], manifest: dict, device: torch.device) -> Predict:
        """``predict(split, rows, views)``: the fold's probabilities for ``rows`` of ``split``, mean over ``views``."""
        raise NotImplementedError

    def cost(self, rates: Rates, cfg: Config, before: set[tuple]) -> Cost:
        """A member's seconds in this mode, given the work ``before`` members leave cached (the planner's)."""
        raise NotImplementedError

    def cache_key(self, cfg: Config) -> Optional[tuple]:
        """What names this mode's per-view cache (a later member with the same key and view reuses it); None:
        nothing cached per view."""
        return None

