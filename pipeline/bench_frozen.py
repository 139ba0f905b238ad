"""The bench of the frozen passes (``train.mode: features`` and ``partial``): how close each engine runs to the
machine's limit, and how close the real pass runs to the best engine.

``python -m pipeline.bench --config configs/photos.yaml`` measures, within its ``--seconds`` bound, on random
tensors and in one process (best of ``--rounds``, engines interleaved so a passing load biases none):

* ``matmul_gflop_s``: a 2048² fp32 matrix product, the machine's practical peak;
* ``engines``: for each engine (:mod:`pipeline.models.engines`: PyTorch at the configured precision, PyTorch
  in fp32, ONNX Runtime where installed) the frozen pass's images/s at each batch of ``BATCHES`` and
  ``infer.batch_size``, its best, and that best as GFLOP/s (2 × the pass's multiply-accumulates × images/s) and
  as a share of the matrix product's; ``best_vs_torch_eager`` (the best engine against PyTorch's best) and
  ``onnxruntime_vs_torch_fp32``;
* ``pipeline_img_s``: view-images/s of the real pass (:func:`pipeline.training.features.embed_views`, with
  ``infer.engine`` choosing as a run does) over ``IMAGES`` random uint8 images, and ``pipeline_ratio``, its
  share of the best engine's images/s at ``infer.batch_size``.

Written to ``runs/<experiment>/bench_frozen.json``.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import numpy as np
import torch

from pipeline.core.config import Config, with_values
from pipeline.core.timing import Effort, timed
from pipeline.core.utils import device_name, resolve_device, write_json
from pipeline.data.cache import cache_side
from pipeline.models.arch import count_macs
from pipeline.models.engines import FrozenPass, onnxruntime_module, torch_run
from pipeline.models.weights import normalization
from pipeline.rundir import RunDir
from pipeline.training import features, partial
from pipeline.training.modes import training_mode
from pipeline.training.precision import compute_settings

log = logging.getLogger(__name__)

BATCHES = (4, 16, 32)
IMAGES = 96  # random images through the real pass
MATMUL = 2048


def frozen_module(cfg: Config, classes: int, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The mode's frozen pass (the pooled backbone, or partial's front) and the name of its graph."""
    if training_mode(cfg).name == "partial":
        cut = f"last{cfg.train.tune_blocks}"
        return partial.frozen_front(cfg, classes, device), features.frozen_key(cfg, cut)
    return features.backbone(cfg, device), features.frozen_key(cfg, "pooled")


def matmul_rate(effort: Effort) -> float:
    """GFLOP/s of a :data:`MATMUL`² fp32 matrix product."""
    a, b = torch.randn(MATMUL, MATMUL), torch.randn(MATMUL, MATMUL)
    return timed(lambda: (a @ b, 1)[1], 1, effort) * 2 * MATMUL ** 3 / 1e9


def engine_runs(module: torch.nn.Module, cfg: Config, key: str, device: torch.device,
                dtype: Optional[torch.dtype], x: torch.Tensor) -> dict[str, Callable]:
    """Every engine worth timing here, by name."""
    runs = {f"torch_{_name(dtype)}": torch_run(module, device, dtype)}
    if dtype is not None:
        runs["torch_fp32"] = torch_run(module, device, None)
    ort = onnxruntime_module(required=False)
    graph = FrozenPass(module, cfg, key, device, dtype).graph(ort, x) if ort and device.type == "cpu" else None
    if graph is not None:
        runs["onnxruntime_fp32"] = graph
    return runs


def run(cfg: Config, rounds: int = 3, seconds: Optional[float] = 120) -> dict:
    """Measure every figure (see the module docstring) and write ``runs/<experiment>/bench_frozen.json``."""
    begin = time.perf_counter()
    device = resolve_device(cfg.train.device)
    dtype, channels_last = compute_settings(cfg, device)
    module, key = frozen_module(cfg, 2, device)
    size = cfg.data.image_size
    batches = sorted({*BATCHES, cfg.infer.batch_size})
    inputs = {b: _random(b, size, channels_last, device) for b in batches}
    runs = engine_runs(module, cfg, key, device, dtype, inputs[batches[0]])
    share = seconds and seconds / (max(1, rounds) * (len(runs) * len(batches) + 2))
    effort = Effort(10_000, share)
    rates = {name: dict.fromkeys(batches, 0.0) for name in runs}
    matmul = 0.0
    for r in range(max(1, rounds)):
        matmul = max(matmul, matmul_rate(effort))
        for name, fn in runs.items():
            for b in batches:
                rates[name][b] = max(rates[name][b], timed(lambda: len(fn(inputs[b])), 1, effort))
        log.info("round %d: matmul %.0f GFLOP/s; %s", r + 1, matmul,
                 "; ".join(f"{n} {max(v.values()):.1f} img/s" for n, v in rates.items()))
    pipeline_rate = real_pass(cfg, module, key, device, effort)
    gflop = 2 * count_macs(module.cpu().float(), size) / 1e9
    engines = {name: {"img_s": {str(b): round(v, 1) for b, v in by.items()}, "best_img_s": round(max(by.values()), 1),
                      "best_batch": max(by, key=by.get), "gflop_s": round(max(by.values()) * gflop, 1),
                      "share_of_matmul": round(max(by.values()) * gflop / matmul, 3)} for name, by in rates.items()}
    at_batch = max(by[cfg.infer.batch_size] for by in rates.values())
    eager = max(max(by.values()) for name, by in rates.items() if name.startswith("torch"))
    result = {"experiment": cfg.experiment, "mode": cfg.train.mode, "model": cfg.model.name, "key": key,
              "device": device_name(device), "threads": torch.get_num_threads(), "image_size": size,
              "infer_batch_size": cfg.infer.batch_size, "gflop_per_image": round(gflop, 3),
              "matmul_gflop_s": round(matmul, 1), "engines": engines,
              "best_engine": max(engines, key=lambda n: engines[n]["best_img_s"]),
              "best_vs_torch_eager": round(max(e["best_img_s"] for e in engines.values()) / eager, 3),
              "onnxruntime_vs_torch_fp32": _ratio(engines, "onnxruntime_fp32", "torch_fp32"),
              "pipeline_img_s": round(pipeline_rate, 1), "pipeline_ratio": round(pipeline_rate / at_batch, 3),
              "seconds": round(time.perf_counter() - begin, 1)}
    write_json(RunDir.of(cfg).bench_frozen, result)
    return result


def real_pass(cfg: Config, module: torch.nn.Module, key: str, device: torch.device, effort: Effort) -> float:
    """View-images/s of :func:`pipeline.training.features.embed_views` (the configured views, ``infer.engine``)
    over :data:`IMAGES` random uint8 images at the cache's side, the second of two runs (the first chooses)."""
    side = cache_side(cfg.data.image_size, cfg.data.crop_pct)
    images = np.random.default_rng(0).integers(0, 256, (IMAGES, side, side, 3), dtype=np.uint8)
    views = features.train_views(with_values(cfg, {"train.crop_views": 0}))
    mean, std = normalization(cfg.model, {"mean": [0.5] * 3, "std": [0.25] * 3})
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        features.embed_views(module, images, views, cfg, mean, std, device, "bench pass", key)
        best = max(best, IMAGES * len(views) / (time.perf_counter() - start))
    return best


def _random(batch: int, size: int, channels_last: bool, device: torch.device) -> torch.Tensor:
    x = torch.randn(batch, 3, size, size, device=device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _ratio(engines: dict, a: str, b: str) -> Optional[float]:
    return round(engines[a]["best_img_s"] / engines[b]["best_img_s"], 3) if a in engines and b in engines else None


def _name(dtype: Optional[torch.dtype]) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
