"""One optimisation step on a batch, under autocast, with accumulation, mixing and EMA."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from pipeline import augment
from pipeline.core.utils import autocast
from pipeline.training.schedulers import Schedule


class TrainStep:
    """One optimisation step on a batch: prepare it (``inputs``: a uint8 batch normalised, or cached
    activations moved to the device), (mix), forward/backward under autocast, step.

    Gradient accumulation: the optimizer steps every ``accum_steps`` calls; the returned loss is the
    unscaled batch loss. ``model`` is what runs forward; the weight average follows ``averaged`` (the whole
    network when ``model`` is a trained part of it).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                 schedule: Optional[Schedule], device: torch.device, dtype: Optional[torch.dtype],
                 inputs: Callable[[torch.Tensor], torch.Tensor], accum_steps: int = 1,
                 mixer: Optional[Callable] = None, ema: Optional[nn.Module] = None,
                 averaged: Optional[nn.Module] = None) -> None:
        self.model, self.optimizer, self.loss_fn, self.schedule = model, optimizer, loss_fn, schedule
        self.ema, self.updates = ema, 0  # weight average updated after every optimizer step
        self.averaged = averaged if averaged is not None else model
        self.device, self.dtype, self.inputs = device, dtype, inputs
        self.accum_steps, self.mixer = max(1, accum_steps), mixer
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.calls = 0

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, size: Optional[int] = None) -> float:
        x = self.inputs(images)
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
                self.ema.update(self.averaged, step=self.updates)
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
