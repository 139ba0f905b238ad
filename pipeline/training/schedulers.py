"""Learning-rate schedulers by name, all from ``torch.optim.lr_scheduler``.

``cosine`` (linear warmup, then cosine to ``min_lr``) and ``onecycle`` step every optimizer step;
``plateau`` (ReduceLROnPlateau on the validation loss) steps once per epoch. :class:`Schedule` hides the
difference from the training loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch.optim import Optimizer
from torch.optim import lr_scheduler as S

from pipeline.core.config import TrainConfig
from pipeline.core.registry import Registry

SCHEDULERS: Registry = Registry("scheduler")


@dataclass
class Schedule:
    scheduler: object
    per_step: bool

    def step_batch(self) -> None:
        if self.per_step:
            self.scheduler.step()

    def step_epoch(self, val_loss: Optional[float]) -> None:
        if not self.per_step:
            self.scheduler.step(val_loss)

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


@SCHEDULERS.register("cosine")
def _cosine(cfg: TrainConfig, opt: Optimizer, steps_per_epoch: int) -> Schedule:
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
    cosine = S.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=cfg.min_lr)
    if warmup <= 0:
        return Schedule(cosine, per_step=True)
    ramp = S.LinearLR(opt, start_factor=1.0 / (warmup + 1), end_factor=1.0, total_iters=warmup)
    return Schedule(S.SequentialLR(opt, [ramp, cosine], milestones=[warmup]), per_step=True)


@SCHEDULERS.register("onecycle")
def _onecycle(cfg: TrainConfig, opt: Optimizer, steps_per_epoch: int) -> Schedule:
    pct = min(max(cfg.warmup_epochs / max(cfg.epochs, 1), 0.01), 0.99) if cfg.warmup_epochs else 0.25
    return Schedule(S.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
                                 pct_start=pct), per_step=True)


@SCHEDULERS.register("plateau")
def _plateau(cfg: TrainConfig, opt: Optimizer, steps_per_epoch: int) -> Schedule:
    return Schedule(S.ReduceLROnPlateau(opt, mode="min", factor=cfg.plateau_factor,
                                        patience=cfg.plateau_patience, min_lr=cfg.min_lr), per_step=False)


def build_scheduler(cfg: TrainConfig, opt: Optimizer, steps_per_epoch: int) -> Schedule:
    return SCHEDULERS.build(cfg.scheduler, cfg, opt, steps_per_epoch)
