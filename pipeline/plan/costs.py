"""What each member of a plan costs on this machine: throughputs measured in seconds on random tensors (the
bench's timing, :mod:`pipeline.core.timing`), turned into minutes with the EDA's image counts."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from pipeline import bench
from pipeline.core.config import Config, with_values
from pipeline.core.timing import Effort, timed
from pipeline.core.utils import autocast
from pipeline.data.cache import cache_side
from pipeline.eda.suggest import Facts
from pipeline.evaluation.tta import configured_views
from pipeline.models.factory import create_model
from pipeline.training.features import train_views
from pipeline.training.partial import split_backbone
from pipeline.training.precision import compute_settings

log = logging.getLogger(__name__)

SAFETY = 1.2  # floors timed on random tensors run ahead of a real run (first batches, loaders, bookkeeping)
MEMBER_OVERHEAD_S = 5.0  # a member's stage start-ups, folds and tables
FOLD_OVERHEAD_S = 2.0  # a fold's model building and checkpoints
HEAD_S = (1.0, 1e-3)  # a feature head per fold: 1 s + 1 ms per training row and view (logistic regression)
DECODE_SAMPLE = 48  # source images decoded to time the preprocess stage
EFFORT = Effort(batches=4, seconds=3.0)  # each timed measurement


@dataclass(frozen=True)
class Cost:
    """A member's seconds: ``fixed`` plus ``per_epoch`` for each training epoch."""
    fixed: float
    per_epoch: float = 0.0

    def seconds(self, epochs: int) -> float:
        return self.fixed + self.per_epoch * epochs


Estimate = Callable[[Config, list[Config]], Cost]  # (member, members planned before it) -> its cost


def member_views(cfg: Config) -> tuple[list[str], list[str]]:
    """(training views, test views) a member embeds or caches: the head trains on every training view."""
    return train_views(cfg), configured_views(cfg.infer)


class Estimator:
    """Seconds per member on this machine, from throughputs measured once each (:data:`EFFORT`) and the EDA's
    image counts; work a member shares with one planned before it (decoded images, embeddings, cached
    activations of the same backbone, size and view) is not counted twice."""

    def __init__(self, facts: Facts, device: torch.device, effort: Effort = EFFORT) -> None:
        self.facts, self.device, self.effort = facts, device, effort
        self.rates: dict[tuple, tuple[float, ...]] = {}

    def __call__(self, cfg: Config, planned: list[Config]) -> Cost:
        before = set().union(*(self.work(c) for c in planned))
        cost = COSTS[cfg.train.mode](self, cfg, before)
        decode = ("decode", cache_side(cfg.data.image_size, cfg.data.crop_pct), cfg.data.resize)
        preprocess = 0.0 if decode in before else (self.facts.images + self.facts.test_images) / self.decode_rate(cfg)
        return Cost(SAFETY * (cost.fixed + preprocess) + MEMBER_OVERHEAD_S, SAFETY * cost.per_epoch)

    def work(self, cfg: Config) -> set[tuple]:
        """What a member leaves cached for later ones: decoded images and, per view, embeddings or activations."""
        side = cache_side(cfg.data.image_size, cfg.data.crop_pct)
        keys = {("decode", side, cfg.data.resize)}
        if cfg.train.mode != "finetune":
            train, test = member_views(cfg)
            keys |= {self.view_key(cfg, split, v) for split, views in (("train", train), ("test", test)) for v in views}
        return keys

    @staticmethod
    def view_key(cfg: Config, split: str, view: str) -> tuple:
        cut = cfg.train.tune_blocks if cfg.train.mode == "partial" else None
        return (cfg.train.mode, cfg.model.name, cfg.data.image_size, cut, split, view)

    def new_images(self, cfg: Config, before: set[tuple]) -> float:
        """Images × views a features or partial member still has to embed or cache."""
        train, test = member_views(cfg)
        count = {"train": self.facts.images, "test": self.facts.test_images}
        return float(sum(count[split] for split, views in (("train", train), ("test", test)) for v in views
                         if self.view_key(cfg, split, v) not in before))

    def rate(self, key: tuple, measure: Callable[[], float]) -> float:
        """A throughput, measured once per key (:meth:`measured`)."""
        return self.measured(key, lambda: (measure(),))[0]

    def measured(self, key: tuple, measure: Callable[[], tuple[float, ...]]) -> tuple[float, ...]:
        """Throughputs measured together, once per key: each the better of two measurements, as the bench keeps
        its best round (a cold start or a passing load slows one down, nothing speeds one up)."""
        if key not in self.rates:
            self.rates[key] = tuple(max(a, b, 1e-3) for a, b in zip(measure(), measure()))
            log.info("plan: %s %s img/s", " ".join(map(str, key)), " / ".join(f"{r:.1f}" for r in self.rates[key]))
        return self.rates[key]

    def decode_rate(self, cfg: Config) -> float:
        return self.rate(("decode img",), lambda: bench.preprocess_rate(cfg, DECODE_SAMPLE) or 50.0)

    def forward_rate(self, cfg: Config) -> float:
        """Images/s of the member's model forward at its input size and ``infer.batch_size`` (the bench's
        inference floor): the batch the stages run, since a CPU's images/s depends on it (caches)."""
        def measure() -> float:
            data = bench.synthetic(self.facts.classes, cfg.infer.batch_size, cfg.data.image_size)
            return bench.tta_floor(cfg, data, self.device, *compute_settings(cfg, self.device), self.effort)
        return self.rate(("forward img", cfg.model.name, cfg.data.image_size, cfg.infer.batch_size), measure)

    def train_rate(self, cfg: Config) -> float:
        """Images/s of the train stage's recipe and loader on random images (the bench's training pipeline)."""
        def measure() -> float:
            probe = with_values(cfg, {"train.head_init": "random"})
            side = cache_side(cfg.data.image_size, cfg.data.crop_pct)
            data = bench.synthetic(self.facts.classes, cfg.train.batch_size * (self.effort.batches + 5), side)
            return bench.train_pipeline(probe, data, self.device, *compute_settings(cfg, self.device), self.effort)
        key = ("train img", cfg.model.name, str(cfg.model.spec), cfg.data.image_size, cfg.train.batch_size,
               cfg.augment.policy, cfg.data.loader)
        return self.rate(key, measure)

    def partial_rates(self, cfg: Config) -> tuple[float, float, float]:
        """Images/s of the frozen front, and of the tuned back's training step and forward pass."""
        key = ("partial img (front / back step / back forward)", cfg.model.name, cfg.data.image_size,
               cfg.train.tune_blocks, cfg.train.batch_size, cfg.infer.batch_size)
        front, step, back = self.measured(key, lambda: measure_partial(cfg, self.facts.classes, self.device,
                                                                       self.effort))
        return front, step, back


def measure_partial(cfg: Config, classes: int, device: torch.device, effort: Effort) -> tuple[float, float, float]:
    """Time ``train.mode: partial``'s parts on random tensors: the frozen front's forward at ``infer.batch_size``,
    the back's forward + backward + AdamW step on a training batch of activations, and its forward alone."""
    dtype, channels_last = compute_settings(cfg, device)
    model = create_model(cfg.model, classes).to(device).eval()
    front, back = split_backbone(model, cfg.train.tune_blocks)
    x = torch.randn(cfg.infer.batch_size, 3, cfg.data.image_size, cfg.data.image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x

    @torch.no_grad()
    def forward_front() -> int:
        with autocast(device, dtype):
            front(x)
        return len(x)

    front_rate = timed(forward_front, 1, effort)
    with torch.no_grad(), autocast(device, dtype):
        acts = front(x).float()
    acts = acts.repeat(math.ceil(cfg.train.batch_size / len(acts)), 1, 1, 1)[:cfg.train.batch_size]
    labels = torch.arange(len(acts), device=device) % classes
    optimizer = torch.optim.AdamW(back.parameters(), lr=1e-4)

    def step() -> int:
        back.train()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(back(acts), labels).backward()
        optimizer.step()
        return len(acts)

    @torch.no_grad()
    def forward_back() -> int:
        back.eval()
        back(acts)
        return len(acts)

    return front_rate, timed(step, 1, effort), timed(forward_back, 1, effort)


def finetune_cost(est: Estimator, cfg: Config, before: set[tuple]) -> Cost:
    """Every fold trains on the others each epoch and scores its own; infer predicts the held-out rows and the
    test set per fold under every TTA view."""
    n, t, k = est.facts.images, est.facts.test_images, cfg.folds.n_splits
    train, forward = est.train_rate(cfg), est.forward_rate(cfg)
    views = len(configured_views(cfg.infer))
    return Cost((n + k * t) * views / forward + k * FOLD_OVERHEAD_S, n * (k - 1) / train + n / forward)


def features_cost(est: Estimator, cfg: Config, before: set[tuple]) -> Cost:
    """Every image embedded once per view not embedded before, then a head per fold."""
    k, rows, new = cfg.folds.n_splits, est.facts.images * len(member_views(cfg)[0]), est.new_images(cfg, before)
    head = HEAD_S[0] + HEAD_S[1] * rows * (k - 1) / k
    return Cost((new / est.forward_rate(cfg) if new else 0.0) + k * (head + FOLD_OVERHEAD_S))


def partial_cost(est: Estimator, cfg: Config, before: set[tuple]) -> Cost:
    """The front once per image and view not cached before; per fold the linear probe's pass over the training
    rows' views, then each epoch a training pass over the other folds' rows and one over its own, and the
    held-out rows and test set under every TTA view."""
    n, t, k = est.facts.images, est.facts.test_images, cfg.folds.n_splits
    train, test = member_views(cfg)
    new = est.new_images(cfg, before)
    front, step, back = est.partial_rates(cfg)
    probe = (k - 1) * n * len(train) / back if cfg.train.head_init == "linear_probe" else 0.0
    fixed = new / front + probe + (n + k * t) * len(test) / back + k * FOLD_OVERHEAD_S
    steps = max(1, math.ceil(n * (k - 1) / k / cfg.train.batch_size))  # a fold's optimizer steps per epoch
    stretch = max(1.0, math.ceil(cfg.train.min_steps / steps) / max(cfg.train.epochs, 1))  # train.min_steps
    return Cost(fixed, (n * (k - 1) / step + n / back) * stretch)


COSTS: dict[str, Callable[[Estimator, Config, set], Cost]] = {
    "finetune": finetune_cost, "features": features_cost, "partial": partial_cost}
