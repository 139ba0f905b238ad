"""Architecture specs: a compact CNN described as plain data (YAML), built from timm's blocks.

A spec is what the search stage samples and what ``model.spec`` (a YAML path or the mapping inline) trains
through the normal K-fold pipeline::

    width_multiplier: 1.0      # channels × this, rounded to a multiple of 4
    depth_multiplier: 1.0      # repeats × this, rounded up
    blocks:                    # the search uses 7 slots; Pass skips a slot (never the first)
      - {type: Conv, repeats: 1, out: 16, kernel: 3, stride: 1}
      - {type: InvertedResidualv2, repeats: 2, out: 24, kernel: 3, stride: 2, expansion: 4}
      - {type: InvertedResidualv3, repeats: 2, out: 40, kernel: 5, stride: 2, expansion: 3, se: true,
         act: hardswish}
      - {type: ConvPool, repeats: 2, out: 64, kernel: 3, stride: 2, skip: true}
      - {type: Pass}
    pool: avg                  # the head's global pool: avg or max
    head: linear               # linear, or airnet: bias-free with logits × 1/9 (airnet_*'s head)

The head is fixed: global pool (``pool``), dropout (``model.drop_rate``), linear (``head``). Block types map onto timm's
``_efficientnet_blocks`` (ConvBnAct, DepthwiseSeparableConv, InvertedResidual with SqueezeExcite) and, for
ConvPool, airbench's conv → max-pool → BN → GELU (the pool, not a strided conv, halves the resolution, so the
conv sees every pixel; airnet_* are stacks of these). The first repeat of a block carries its stride, the others
keep the resolution (and get timm's residual connection where timm's block has one; a ConvPool block's with
``skip: true``, airbench96's identity around a group's later convs, free in parameters).
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any, Union

import torch
import yaml
from timm.layers import get_act_layer
from timm.models._efficientnet_blocks import ConvBnAct, DepthwiseSeparableConv, InvertedResidual, SqueezeExcite
from torch import nn

BLOCK_TYPES = ("Conv", "DWConv", "InvertedResidualv2", "InvertedResidualv3", "ConvPool", "Pass")
DEFAULT_ACT = {"Conv": "relu", "DWConv": "relu", "InvertedResidualv2": "relu6", "InvertedResidualv3": "hard_swish",
               "ConvPool": "gelu"}
POOLS = {"avg": nn.AdaptiveAvgPool2d, "max": nn.AdaptiveMaxPool2d}
# head → (logit scale, bias): airnet_*'s small bias-free head suits SGD at lr 0.1 (2 points on a 543k ConvPool net)
HEADS = {"linear": (1.0, True), "airnet": (1 / 9, False)}
_BLOCK_KEYS = {"type", "repeats", "out", "kernel", "stride", "expansion", "se", "act", "skip"}
_SPEC_KEYS = {"blocks", "width_multiplier", "depth_multiplier", "max_downsample", "pool", "head"}


class SpecError(ValueError):
    """A spec is malformed; the message names the block and key."""


def load_spec(spec: Union[str, Path, dict]) -> dict:
    """The spec mapping from a YAML path or a mapping (validated)."""
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"model.spec: {path} not found")
        spec = yaml.safe_load(path.read_text())
    validate_spec(spec)
    return spec


def validate_spec(spec: Any) -> None:
    """Reject unknown keys/types, Pass in the first slot, odd kernels and a downsampling over the cap."""
    if not isinstance(spec, dict) or not isinstance(spec.get("blocks"), list) or not spec["blocks"]:
        raise SpecError("model.spec: expected a mapping with a non-empty 'blocks' list")
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise SpecError(f"model.spec: unknown key(s) {sorted(unknown)}; valid: {sorted(_SPEC_KEYS)}")
    for i, block in enumerate(spec["blocks"]):
        where = f"model.spec.blocks[{i}]"
        if not isinstance(block, dict) or block.get("type") not in BLOCK_TYPES:
            raise SpecError(f"{where}: 'type' must be one of {list(BLOCK_TYPES)}, got {block!r}")
        if set(block) - _BLOCK_KEYS:
            raise SpecError(f"{where}: unknown key(s) {sorted(set(block) - _BLOCK_KEYS)}")
        if block["type"] == "Pass":
            if i == 0:
                raise SpecError(f"{where}: the first block cannot be Pass")
            continue
        if int(block.get("out", 0)) <= 0 or int(block.get("repeats", 1)) <= 0:
            raise SpecError(f"{where}: 'out' and 'repeats' must be positive")
        if int(block.get("kernel", 3)) % 2 == 0 or int(block.get("stride", 1)) not in (1, 2):
            raise SpecError(f"{where}: 'kernel' must be odd and 'stride' 1 or 2")
        if block.get("skip", False) not in (True, False) or (block.get("skip") and block["type"] != "ConvPool"):
            raise SpecError(f"{where}: 'skip' is true or false, and only for ConvPool (timm's blocks have their own)")
    if spec.get("pool", "avg") not in POOLS:
        raise SpecError(f"model.spec.pool: must be one of {list(POOLS)}, got {spec['pool']!r}")
    if spec.get("head", "linear") not in HEADS:
        raise SpecError(f"model.spec.head: must be one of {list(HEADS)}, got {spec['head']!r}")
    cap = spec.get("max_downsample")
    if cap is not None and downsampling(spec) > cap:
        raise SpecError(f"model.spec: total downsampling {downsampling(spec)} exceeds max_downsample {cap}")


def downsampling(spec: dict) -> int:
    """The product of the blocks' strides (the input side divided by the final feature map's side)."""
    return math.prod(int(b.get("stride", 1)) for b in spec["blocks"] if b["type"] != "Pass")


def scaled_channels(out: int, width: float) -> int:
    return max(4, int(round(out * width / 4)) * 4)


class ConvPool(nn.Sequential):
    """airbench's downsampling conv: conv → max-pool (stride 2 only) → BN → activation."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, act_layer: type[nn.Module]) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
                         nn.MaxPool2d(2) if stride == 2 else nn.Identity(), nn.BatchNorm2d(c_out), act_layer())


class Residual(nn.Module):
    """``x + fn(x)``: the identity around a ConvPool repeat that keeps the shape (airbench96's groups)."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(x)


def make_block(block: dict, c_in: int, c_out: int, stride: int) -> nn.Module:
    """One repeat of a spec block as the matching timm block (ConvPool: :class:`ConvPool`)."""
    kind, kernel = block["type"], int(block.get("kernel", 3))
    act = get_act_layer(block.get("act") or DEFAULT_ACT[kind])
    if kind == "ConvPool":
        layer = ConvPool(c_in, c_out, kernel, stride, act)
        return Residual(layer) if block.get("skip") and stride == 1 and c_in == c_out else layer
    se = partial(SqueezeExcite, rd_ratio=0.25, gate_layer="hard_sigmoid") if block.get("se") else None
    if kind == "Conv":
        return ConvBnAct(c_in, c_out, kernel, stride=stride, act_layer=act)
    if kind == "DWConv":
        return DepthwiseSeparableConv(c_in, c_out, dw_kernel_size=kernel, stride=stride, act_layer=act,
                                      se_layer=se)
    expansion = float(block.get("expansion", 4))
    return InvertedResidual(c_in, c_out, dw_kernel_size=kernel, stride=stride, exp_ratio=expansion,
                            act_layer=act, se_layer=se if kind == "InvertedResidualv3" else None)


class SpecNet(nn.Module):
    """The network a spec describes: the blocks in order, then a fixed pool → dropout → linear head (× a logit
    scale for ``head: airnet``)."""

    def __init__(self, spec: dict, num_classes: int, in_chans: int = 3, drop_rate: float = 0.0) -> None:
        super().__init__()
        spec = load_spec(spec)
        width = float(spec.get("width_multiplier", 1.0))
        depth = float(spec.get("depth_multiplier", 1.0))
        layers, c_in = [], in_chans
        for block in spec["blocks"]:
            if block["type"] == "Pass":
                continue
            c_out = scaled_channels(int(block["out"]), width)
            for r in range(max(1, math.ceil(int(block.get("repeats", 1)) * depth))):
                layers.append(make_block(block, c_in, c_out, int(block.get("stride", 1)) if r == 0 else 1))
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = POOLS[spec.get("pool", "avg")](1)
        self.drop = nn.Dropout(drop_rate)
        self.head_scale, bias = HEADS[spec.get("head", "linear")]
        self.head = nn.Linear(c_in, num_classes, bias=bias)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.pool(self.features(x)).flatten(1))) * self.head_scale


def count_macs(model: nn.Module, input_size: int, in_chans: int = 3) -> int:
    """Multiply-accumulates of one forward pass on one image (torch's FLOP counter, FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, in_chans, input_size, input_size))
    model.train(was_training)
    return counter.get_total_flops() // 2


def cpu_latency_ms(model: nn.Module, input_size: int, in_chans: int = 3, runs: int = 20) -> float:
    """Median wall time (ms) of one-image forward passes on one CPU thread, after warm-up runs.

    One thread: batch-1 latency is what a deployed compact model sees, and on a shared machine two threads
    spin against the other jobs (measured 64 ms vs 0.6 ms for the same small net on a busy 2-core host)."""
    import time

    was_training, threads = model.training, torch.get_num_threads()
    model.eval()
    torch.set_num_threads(1)
    x = torch.zeros(1, in_chans, input_size, input_size)
    times = []
    with torch.no_grad():
        for i in range(runs + 3):
            start = time.perf_counter()
            model(x)
            if i >= 3:
                times.append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    model.train(was_training)
    return float(sorted(times)[len(times) // 2] * 1000)
