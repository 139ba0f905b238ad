"""Models by name: compact CNNs registered here, or any timm model.

``create_model(cfg.model, num_classes)`` looks the name up in :data:`MODELS` first (small nets built for
low-resolution images such as CIFAR), builds ``model.spec`` (an architecture spec, :mod:`pipeline.models.arch`, as
the search stage exports) when ``name`` is ``spec``, and otherwise asks ``timm.create_model``.
Pretrained weights are only used when ``model.pretrained`` is true or ``model.weights`` names a file: shipped
weights (``pipeline.models.weights.SHIPPED``, e.g. efficientnet_lite0) and local files load offline; other timm models
are fetched, and offline that fails with a message saying how to get them (``python -m pipeline.models
--download NAME`` on a connected machine).
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import logging
from typing import Optional, Sequence

import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pipeline.models.arch import HEADS, SpecNet, count_macs, cpu_latency_ms, load_spec
from pipeline.core.config import ModelConfig
from pipeline.core.registry import Registry
from pipeline.core.utils import setup_logging
from pipeline.models.weights import load_pretrained, pretrained_source

log = logging.getLogger(__name__)

MODELS: Registry = Registry("model")


def conv_bn(c_in: int, c_out: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.GELU())


class ConvGroup(nn.Module):
    """conv → max-pool → conv (airbench's block): most work happens at the lower resolution."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = conv_bn(c_out, c_out)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.pool(self.conv1(x))))
        return self.conv2(x)


def make_patch_stem(c_in: int, kernel: int) -> nn.Sequential:
    """airbench's stem: a ``kernel``×``kernel`` conv without padding onto 2·c_in·k² channels (room for every
    patch-whitening direction and its negative, ``model.whiten``), with a bias, GELU, no batch norm."""
    return nn.Sequential(nn.Conv2d(c_in, 2 * c_in * kernel * kernel, kernel, padding=0, bias=True), nn.GELU())


class AirNet(nn.Module):
    """A compact CNN for small images in the style of airbench (Keller Jordan's CIFAR-10 speed runs).

    A stem conv, then one :class:`ConvGroup` per width (each halves the resolution), a global max-pool
    and a linear head scaled down (``head_scale``) so logits start small, which suits high learning rates.
    ``patch_stem: k`` (``model.kwargs``) replaces the 3×3 conv-BN stem by airbench's k×k patch conv
    (:func:`make_patch_stem`; ``stem`` is then ignored), made for ``model.whiten``.
    """

    def __init__(self, num_classes: int, widths: Sequence[int] = (64, 256, 256), stem: int = 32,
                 in_chans: int = 3, drop_rate: float = 0.0, head_scale: float = HEADS["airnet"][0],
                 patch_stem: int = 0) -> None:
        super().__init__()
        self.stem = make_patch_stem(in_chans, patch_stem) if patch_stem else conv_bn(in_chans, stem)
        groups, c_in = [], self.stem[0].out_channels
        for width in widths:
            groups.append(ConvGroup(c_in, width))
            c_in = width
        self.groups = nn.Sequential(*groups)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(c_in, num_classes, bias=False)
        self.head_scale = head_scale
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.groups(self.stem(x))).flatten(1)
        return self.head(self.drop(x)) * self.head_scale


@MODELS.register("airnet")
def airnet(num_classes: int, **kwargs) -> nn.Module:
    """AirNet at airbench94's widths (64, 256, 256): ~2M parameters."""
    return AirNet(num_classes, **kwargs)


@MODELS.register("airnet_small")
def airnet_small(num_classes: int, **kwargs) -> nn.Module:
    """AirNet at widths (32, 128, 256): a fraction of the compute, for CPUs."""
    kwargs.setdefault("widths", (32, 128, 256))
    kwargs.setdefault("stem", 24)
    return AirNet(num_classes, **kwargs)


@MODELS.register("airnet_tiny")
def airnet_tiny(num_classes: int, **kwargs) -> nn.Module:
    """AirNet at widths (16, 32, 64): for tests and very small data."""
    kwargs.setdefault("widths", (16, 32, 64))
    kwargs.setdefault("stem", 16)
    return AirNet(num_classes, **kwargs)


def create_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Build ``cfg.name`` with a ``num_classes`` head (registered compact model or timm), every batch norm's
    momentum set to ``model.bn_momentum`` and the first convolution's stride to ``model.stem_stride`` when given."""
    return set_stem_stride(set_bn_momentum(_build(cfg, num_classes), cfg.bn_momentum), cfg.stem_stride)


def architecture_id(cfg: ModelConfig) -> str:
    """A short name of the network's shape, not its weights: the model, a digest of its spec and factory
    arguments where it has them, and its stem's stride when set. Timings and cached passes of one architecture
    are kept under it, so two searched specs or two strides never share them."""
    parts = [cfg.name]
    shape = {"spec": load_spec(cfg.spec) if cfg.spec is not None else None, "kwargs": cfg.kwargs or None}
    if any(shape.values()):
        parts.append(hashlib.sha1(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:10])
    if cfg.stem_stride is not None:
        parts.append(f"stride{cfg.stem_stride}")
    return "-".join(parts)


def set_stem_stride(model: nn.Module, stride: Optional[int]) -> nn.Module:
    """Set the stride of the first convolution the model registers (its stem); None leaves it. The weights are
    unchanged, so a pretrained stem keeps its filters and only sees the image at a finer step."""
    if stride is not None:
        stem = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if stem is None:
            raise ValueError("model.stem_stride: this model has no convolution to set it on")
        stem.stride = (stride, stride)
    return model


def set_bn_momentum(model: nn.Module, momentum: Optional[float]) -> nn.Module:
    """Set the running-statistics momentum (torch convention) of every batch-norm layer; None leaves them."""
    if momentum is not None:
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.momentum = momentum
    return model


def _build(cfg: ModelConfig, num_classes: int) -> nn.Module:
    kwargs = dict(cfg.kwargs)
    if cfg.name == "spec":
        if cfg.spec is None:
            raise ValueError("model.name: 'spec' needs model.spec (a YAML path or the spec inline)")
        return SpecNet(cfg.spec, num_classes, drop_rate=cfg.drop_rate, **kwargs)
    if cfg.name in MODELS:
        if cfg.pretrained or cfg.weights:
            raise ValueError(f"model.pretrained/weights: '{cfg.name}' is a compact model trained from scratch; "
                             "it has no pretrained weights")
        return MODELS.build(cfg.name, num_classes, drop_rate=cfg.drop_rate, **kwargs)
    if not timm.is_model(cfg.name):
        raise KeyError(_unknown_model_message(cfg.name))
    model = _timm_model(cfg, num_classes, kwargs)
    return _zero_head(model) if cfg.zero_head else model


def _timm_model(cfg: ModelConfig, num_classes: int, kwargs: dict) -> nn.Module:
    """timm's ``cfg.name`` with a ``num_classes`` head: from shipped or local weights (offline), timm's download,
    or random; a failed download says how to fetch the weights."""
    local = pretrained_source(cfg)  # shipped (offline) weights or model.weights
    if local is not None:
        model = timm.create_model(cfg.name, pretrained=False, num_classes=num_classes, drop_rate=cfg.drop_rate,
                                  **kwargs)
        load_pretrained(model, local)
        return model
    try:
        return timm.create_model(cfg.name, pretrained=cfg.pretrained, num_classes=num_classes,
                                 drop_rate=cfg.drop_rate, **kwargs)
    except Exception as err:
        if not cfg.pretrained:
            raise
        raise RuntimeError(
            f"could not load pretrained weights for '{cfg.name}' ({type(err).__name__}: {err}). "
            "This machine may be offline: fetch them once on a connected machine with "
            f"`python -m pipeline.models --download {cfg.name}` (they are cached by huggingface_hub, "
            "HF_HOME), or set model.pretrained=false to train from scratch") from err


def _zero_head(model: nn.Module) -> nn.Module:
    """Zero the classifier of a timm model (model.zero_head): it starts predicting the uniform."""
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    return model


def _unknown_model_message(name: str) -> str:
    close = difflib.get_close_matches(name, MODELS.names() + timm.list_models(), n=5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return (f"unknown model '{name}'; compact models: {', '.join(MODELS.names())}; or any timm model "
            f"(python -c \"import timm; print(timm.list_models('resnet*'))\").{hint}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_costs(model: nn.Module, size: int, latency: bool = True) -> dict:
    """Parameters, MACs per image and (optionally) 1-thread CPU latency at the input size."""
    costs = {"params": count_parameters(model), "macs": count_macs(model, size)}
    if latency:
        costs["latency_ms"] = round(cpu_latency_ms(model, size), 4)
    return costs


def download(names: Sequence[str]) -> None:
    """Fetch pretrained weights into the local cache so that offline runs can use pretrained=true."""
    for name in names:
        timm.create_model(name, pretrained=True)
        log.info("cached pretrained weights for %s", name)


def main(argv=None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(description="List models or download pretrained weights.")
    parser.add_argument("--download", nargs="+", metavar="NAME", help="timm model names to fetch")
    parser.add_argument("--list", default=None, metavar="PATTERN", help="list timm models matching a pattern")
    args = parser.parse_args(argv)
    if args.download:
        try:
            download(args.download)
        except Exception as err:
            log.error("download failed (is this machine online?): %s", err)
            return 1
    if not args.download:  # listing is this command's output
        print("\n".join(MODELS.names() + (timm.list_models(args.list) if args.list else [])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
