"""Patch-whitening initialisation of a model's first convolution (``model.whiten``), as airbench does it.

The first conv's filters become the eigenvectors of the (uncentred) covariance of k×k patches of the training
images, normalised exactly as the model sees them, each scaled by 1/sqrt(eigenvalue + ``model.whiten_eps``),
in ± pairs (the strongest directions first): the layer then outputs decorrelated, unit-variance patch
components, which lets a small network learn faster. Only the rows a fold trains on are read, so the held-out
images never shape the model. With ``model.whiten_freeze`` the filters stay fixed during training, and
``model.whiten_bias_epochs`` stops training the layer's bias after that many epochs (airbench: 3).
Used by the training recipe (:func:`pipeline.training.recipe.build_training`); the result lives in the weights.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.config import ModelConfig
from pipeline.data.dataset import center_crop, gather, to_float

log = logging.getLogger(__name__)


def first_conv(model: nn.Module, in_chans: int = 3, size: int = 32) -> nn.Conv2d:
    """The first ``nn.Conv2d`` the model applies to an image (found with forward hooks on one blank image in
    eval mode: no statistics change, no random numbers drawn); checked to be whitenable."""
    seen: list[nn.Module] = []
    hooks = [m.register_forward_pre_hook(lambda mod, _args: seen.append(mod) if not seen else None)
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, in_chans, size, size, device=next(model.parameters()).device))
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    if not seen:
        raise ValueError(f"model.whiten: {type(model).__name__} applies no Conv2d to the image; whitening needs one "
                         "(an airnet model, e.g. with model.kwargs={patch_stem: 2})")
    conv = seen[0]
    k = conv.kernel_size[0] * conv.kernel_size[1]
    limit = 2 * conv.in_channels * k
    if conv.groups != 1 or conv.in_channels != in_chans or conv.out_channels % 2 or conv.out_channels > limit:
        raise ValueError(
            f"model.whiten: the first conv of {type(model).__name__} ({conv}) cannot be whitened: it needs groups=1, "
            f"{in_chans} input channels and an even number of outputs <= 2 x in_channels x kernel area = {limit} "
            f"(it has {conv.out_channels}); airnet models take model.kwargs={{patch_stem: 2}} (airbench's stem)")
    return conv


@torch.no_grad()
def patch_covariance(images: np.ndarray, rows: np.ndarray, mean, std, kernel: tuple[int, int], size: int,
                     batch_size: int = 500) -> torch.Tensor:
    """The uncentred covariance (float64, D×D with D = C·kh·kw, conv weight order) of every kernel-sized patch
    of the normalised ``rows`` of the cache (centre ``size`` square), accumulated a batch at a time."""
    total, count = None, 0
    for start in range(0, len(rows), batch_size):
        batch = center_crop(torch.from_numpy(gather(images, rows[start:start + batch_size])).permute(0, 3, 1, 2), size)
        x = to_float(batch, mean, std, torch.device("cpu"))
        patches = F.unfold(x, kernel).transpose(1, 2).reshape(-1, x.shape[1] * kernel[0] * kernel[1]).double()
        gram = patches.T @ patches
        total = gram if total is None else total + gram
        count += len(patches)
    if total is None:
        raise ValueError("model.whiten: no training images to compute the patch covariance from")
    return total / count


@torch.no_grad()
def whiten_conv(conv: nn.Conv2d, covariance: torch.Tensor, eps: float) -> torch.Tensor:
    """Set ``conv``'s filters to the top out/2 whitening directions and their negatives; returns the
    eigenvalues (descending). A bias, if any, is zeroed."""
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1).T  # strongest direction first
    half = conv.out_channels // 2
    filters = eigenvectors[:half] / torch.sqrt(eigenvalues[:half].clamp_min(0) + eps)[:, None]
    filters = torch.cat([filters, -filters]).reshape(conv.weight.shape)
    conv.weight.copy_(filters.to(conv.weight.dtype))  # copy_ keeps the weight's memory format
    if conv.bias is not None:
        conv.bias.zero_()
    return eigenvalues


def freeze_whitening(cfg: ModelConfig, conv: nn.Conv2d, epoch: int) -> None:
    """Before training ``epoch`` (after anything that unfreezes parameters): the whitened filters stay fixed with
    ``model.whiten_freeze``, and the conv's bias (airbench's patch stem has one) trains only for the first
    ``model.whiten_bias_epochs`` epochs."""
    if cfg.whiten_freeze:
        conv.weight.requires_grad_(False)
    if conv.bias is not None and cfg.whiten_bias_epochs is not None and epoch >= cfg.whiten_bias_epochs:
        conv.bias.requires_grad_(False)


def init_whitening(cfg: ModelConfig, model: nn.Module, images: np.ndarray, rows: np.ndarray, mean, std,
                   size: int) -> nn.Conv2d:
    """``model.whiten``: whiten the first conv of ``model`` from the training ``rows`` only; returns the conv."""
    if cfg.pretrained or cfg.weights:
        raise ValueError("model.whiten: it would overwrite the pretrained first layer; use it for models "
                         "trained from scratch (model.pretrained=false, no model.weights)")
    conv = first_conv(model, images.shape[-1], size)
    eigenvalues = whiten_conv(conv, patch_covariance(images, rows, mean, std, conv.kernel_size, size), cfg.whiten_eps)
    log.info("whitened the first conv (%d filters, %dx%d patches of %d training images; eigenvalues %.3g..%.3g)%s",
             conv.out_channels, *conv.kernel_size, len(rows), eigenvalues[0], eigenvalues[-1],
             ", frozen" if cfg.whiten_freeze else "")
    return conv
