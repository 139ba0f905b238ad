"""Test-time augmentation views by name, applied to normalised float batches (N, C, H, W).

Each view is a deterministic transform; predictions are the mean of the softmax over the views. Views
compose with ``+`` (``hflip+shift_left``). Shifts move the image by 1/16 of its side with reflection
padding; ``scale_up`` zooms in by 1/8 and ``scale_down`` out by 1/8, keeping the size.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.registry import Registry
from pipeline.core.utils import autocast
from pipeline.data.dataset import iter_batches, to_float
from pipeline.evaluation.metrics import metric_loss, score

View = Callable[[torch.Tensor], torch.Tensor]
VIEWS: Registry[View] = Registry("TTA view")


def _shift(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    s = max(1, x.shape[-1] // 16)
    dx, dy = dx * s, dy * s
    padded = F.pad(x, (s, s, s, s), mode="reflect")
    h, w = x.shape[-2:]
    return padded[..., s - dy:s - dy + h, s - dx:s - dx + w]


def _zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    h, w = x.shape[-2:]
    if factor > 1:
        ch, cw = round(h / factor), round(w / factor)
        top, left = (h - ch) // 2, (w - cw) // 2
        return F.interpolate(x[..., top:top + ch, left:left + cw], size=(h, w), mode="bilinear",
                             align_corners=False, antialias=False)
    small = F.interpolate(x, size=(round(h * factor), round(w * factor)), mode="bilinear", antialias=True,
                          align_corners=False)
    ph, pw = h - small.shape[-2], w - small.shape[-1]
    return F.pad(small, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="replicate")


VIEWS.register("identity")(lambda x: x)
VIEWS.register("hflip")(lambda x: x.flip(-1))
VIEWS.register("vflip")(lambda x: x.flip(-2))
VIEWS.register("shift_left")(lambda x: _shift(x, -1, 0))
VIEWS.register("shift_right")(lambda x: _shift(x, 1, 0))
VIEWS.register("shift_up")(lambda x: _shift(x, 0, -1))
VIEWS.register("shift_down")(lambda x: _shift(x, 0, 1))
VIEWS.register("scale_up")(lambda x: _zoom(x, 1.125))
VIEWS.register("scale_down")(lambda x: _zoom(x, 0.875))


def get_view(name: str) -> View:
    """A view by name; ``a+b`` applies ``a`` then ``b``."""
    parts = [VIEWS.get(p.strip()) for p in name.split("+")]

    def composed(x: torch.Tensor) -> torch.Tensor:
        for part in parts:
            x = part(x)
        return x

    return parts[0] if len(parts) == 1 else composed


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


@torch.no_grad()
def predict_tta(model: Callable[[torch.Tensor], torch.Tensor], images, rows, names: list[str], mean, std,
                device: torch.device, dtype=None, channels_last: bool = True, batch_size: int = 512,
                size: Optional[int] = None) -> torch.Tensor:
    """Mean softmax over the TTA views ``names`` for ``rows`` of a uint8 N×H×W×3 cache (float32, CPU).

    Each batch is read (its centre ``size`` square when the cache holds a margin) and normalised once, then
    goes through every view, so extra views cost only their forward passes. ``model`` is a network (put in
    eval mode) or any pass over it (an engine's, :class:`pipeline.models.engines.FrozenPass`).
    """
    if not names:
        raise ValueError("infer.tta needs at least one view (e.g. [identity])")
    views = [get_view(n) for n in names]
    if isinstance(model, nn.Module):
        model.eval()
    out = []
    for batch in iter_batches(images, np.asarray(rows), batch_size, size):
        x = to_float(batch, mean, std, device, channels_last)
        with autocast(device, dtype):
            probs = sum(model(view(x)).float().softmax(1) for view in views) / len(views)
        out.append(probs.cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


def configured_views(infer_cfg) -> list[str]:
    """The views ``infer.tta`` names; with ``auto``, every candidate (what selection may use)."""
    return list(infer_cfg.tta_candidates if infer_cfg.tta == "auto" else infer_cfg.tta)


def select_views(view_probs: dict[str, np.ndarray], labels: np.ndarray, metric: str = "accuracy") -> tuple[list[str], dict]:
    """Greedy forward selection of TTA views on OOF probabilities (one (N, C) array per candidate view).

    Starts from ``identity`` (or the first candidate) and adds, one at a time, the view whose addition most
    improves ``metric`` on the averaged probabilities; stops when no view improves it, so the result is never
    worse than identity alone on the OOF. Returns the chosen views and a report: every view's score alone
    and added to identity alone (its own effect), and the selection steps.
    """
    names = list(view_probs)
    start = "identity" if "identity" in view_probs else names[0]
    chosen, total = [start], view_probs[start].astype(np.float64)  # total: the sum of the chosen views
    best = metric_loss(metric, labels, total)
    steps = [{"views": [start], **score(labels, total), "kept": True}]
    while True:
        trials = {v: metric_loss(metric, labels, (total + view_probs[v]) / (len(chosen) + 1))
                  for v in names if v not in chosen}
        if not trials:
            break
        view = min(trials, key=trials.get)
        candidate = (total + view_probs[view]) / (len(chosen) + 1)
        kept = trials[view] < best
        steps.append({"views": chosen + [view], **score(labels, candidate), "kept": kept})
        if not kept:
            break
        chosen.append(view)
        total, best = total + view_probs[view], trials[view]
    base = view_probs[start]
    effect = {v: {"alone": score(labels, p), f"with_{start}": score(labels, (base + p) / 2)}
              for v, p in view_probs.items()}
    return chosen, {"candidates": names, "metric": metric, "chosen": chosen, "steps": steps, "views": effect}
