"""What each member of a plan costs on this machine: throughputs measured in seconds on random tensors (the
bench's timing, :mod:`pipeline.core.timing`), turned into minutes with the EDA's image counts. Each training mode
says what its members cost from these rates (:meth:`pipeline.training.mode.TrainMode.cost`)."""
from __future__ import annotations

import logging
from typing import Callable

import torch

from pipeline import bench
from pipeline.core.config import Config, with_values
from pipeline.core.timing import Effort
from pipeline.data.cache import cache_side
from pipeline.eda.suggest import Facts
from pipeline.evaluation.tta import configured_views
from pipeline.models.engines import FrozenPass
from pipeline.preprocess import decode_rate
from pipeline.training.features import frozen_key, train_views
from pipeline.training.mode import Cost  # noqa: F401 - the planner's unit, re-exported
from pipeline.training.modes import training_mode
from pipeline.training.precision import compute_settings

log = logging.getLogger(__name__)

SAFETY = 1.2  # floors timed on random tensors run ahead of a real run (first batches, loaders, bookkeeping)
# the training step is timed through the train stage's own recipe and loader, so it needs no margin: its floor
# runs behind a real epoch (small CIFAR-10 on a 2-core EPYC: 3.71 and 3.89 s a fold-epoch from the floor, 3.52 and
# 3.54 s run)
TRAIN_SAFETY = 1.0
MEMBER_OVERHEAD_S = 5.0  # a member's stage start-ups, folds and tables
DECODE_SAMPLE = (48, 0.5)  # source images decoded to time the preprocess stage, 4x more until a sample takes 0.5 s
EFFORT = Effort(batches=4, seconds=3.0)  # each timed measurement


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
        cost = training_mode(cfg).cost(self, cfg, before)
        decode = ("decode", cache_side(cfg.data.image_size, cfg.data.crop_pct), cfg.data.resize)
        preprocess = 0.0 if decode in before else (self.facts.images + self.facts.test_images) / self.decode_rate(cfg)
        return Cost(cost.fixed + preprocess + MEMBER_OVERHEAD_S, cost.per_epoch,
                    cost.once + preprocess + MEMBER_OVERHEAD_S, cost.infer)

    def work(self, cfg: Config) -> set[tuple]:
        """What a member leaves cached for later ones: decoded images and, per view, embeddings or activations."""
        side = cache_side(cfg.data.image_size, cfg.data.crop_pct)
        return {("decode", side, cfg.data.resize)} | set(self.cached_passes(cfg))

    @staticmethod
    def cached_passes(cfg: Config) -> dict[tuple, str]:
        """The member's cached passes (its mode's :meth:`~pipeline.training.mode.TrainMode.cache_key`, a split and a
        view), each with its split; none for a mode that caches nothing."""
        key = training_mode(cfg).cache_key(cfg)
        if key is None:
            return {}
        train, test = member_views(cfg)
        return {(*key, split, v): split for split, views in (("train", train), ("test", test)) for v in views}

    def new_images(self, cfg: Config, before: set[tuple], splits: tuple[str, ...] = ("train", "test")) -> float:
        """Images × views of ``splits`` a features or partial member still has to embed or cache."""
        count = {"train": self.facts.images, "test": self.facts.test_images}
        return float(sum(count[split] for key, split in self.cached_passes(cfg).items()
                         if key not in before and split in splits))

    def rate(self, key: tuple, measure: Callable[[], float], margin: float = SAFETY) -> float:
        """A throughput, measured once per key (:meth:`measured`)."""
        return self.measured(key, lambda: (measure(),), margin)[0]

    def measured(self, key: tuple, measure: Callable[[], tuple[float, ...]],
                 margin: float = SAFETY) -> tuple[float, ...]:
        """Throughputs measured together, once per key: each the better of two measurements, as the bench keeps
        its best round (a cold start or a passing load slows one down, nothing speeds one up), planned ``margin``
        times slower than measured."""
        if key not in self.rates:
            self.rates[key] = tuple(max(a, b, 1e-3) for a, b in zip(measure(), measure()))
            log.info("plan: %s %s img/s", " ".join(map(str, key)), " / ".join(f"{r:.1f}" for r in self.rates[key]))
        return tuple(rate / margin for rate in self.rates[key])

    def decode_rate(self, cfg: Config) -> float:
        return self.rate(("decode img",), lambda: decode_rate(cfg, *DECODE_SAMPLE) or 50.0)

    def forward_rate(self, cfg: Config) -> float:
        """Images/s of the member's model forward at its input size and ``infer.batch_size`` (the bench's
        inference floor): the batch the stages run, since a CPU's images/s depends on it (caches)."""
        def measure() -> float:
            data = bench.synthetic(self.facts.classes, cfg.infer.batch_size, cfg.data.image_size)
            return bench.tta_floor(cfg, data, self.device, *compute_settings(cfg, self.device), self.effort)
        return self.rate(("forward img", cfg.model.name, cfg.data.image_size, cfg.infer.batch_size), measure)

    def frozen_rate(self, cfg: Config, part: str, build: Callable[[], torch.nn.Module]) -> float:
        """Images/s of a frozen pass (``part`` of the backbone, ``build()`` makes it) at ``infer.batch_size``
        through the engine the member will run (``infer.engine``; ``auto``: the faster, as the stages choose)."""
        def measure() -> float:
            dtype, channels_last = compute_settings(cfg, self.device)
            x = torch.randn(cfg.infer.batch_size, 3, cfg.data.image_size, cfg.data.image_size, device=self.device)
            x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            return FrozenPass(build(), cfg, frozen_key(cfg, part), self.device, dtype).planned_rate(x)
        key = ("frozen img", cfg.model.name, cfg.data.image_size, part, cfg.infer.batch_size, cfg.infer.engine)
        return self.rate(key, measure)

    def train_rate(self, cfg: Config) -> float:
        """Images/s of the train stage's recipe and loader on random images (the bench's training pipeline)."""
        def measure() -> float:
            probe = with_values(cfg, {"train.head_init": "random"})
            side = cache_side(cfg.data.image_size, cfg.data.crop_pct)
            data = bench.synthetic(self.facts.classes, cfg.train.batch_size * (self.effort.batches + 5), side)
            return bench.train_pipeline(probe, data, self.device, *compute_settings(cfg, self.device), self.effort)
        key = ("train img", cfg.model.name, str(cfg.model.spec), cfg.data.image_size, cfg.train.batch_size,
               cfg.augment.policy, cfg.data.loader)
        return self.rate(key, measure, TRAIN_SAFETY)
