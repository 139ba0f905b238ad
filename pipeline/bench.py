"""Input-pipeline benchmark: does data loading and augmentation keep up with the model?

``python -m pipeline.bench --config CONFIG [--set …] [--batches N] [--seconds S]`` measures within ``S`` seconds
(120 by default), on the configured data (a fresh config is preprocessed first) and model, and prints as JSON
(also ``runs/<experiment>/bench.json``):

* ``train_floor_img_s``: optimisation steps (normalise, forward, backward, step) on uint8 batches already in
  memory, at the configured precision and memory format; ``floors`` has every fp32/bf16 ×
  contiguous/channels_last combination (bf16 only where the device runs it natively) and ``best_floor``
  the fastest (what the train stage should use);
* ``train_img_s``: the same steps fed by the train stage's own loader (cache read, augmentation policy,
  collation) and mixer; ``train_ratio`` = train / floor (≥ 0.9: the pipeline does not starve training);
* ``tta_floor_img_s``: forward passes on an in-memory batch at ``infer.batch_size``; ``tta_img_s``:
  view-images per second of :func:`pipeline.evaluation.tta.predict_tta` over the cached test set, i.e. test images/s ×
  the number of views (``tta_test_img_s`` is test images/s); ``tta_ratio`` = tta / floor;
* ``--infer-batches 4,16,64`` measures only the forward-only floor at each ``infer.batch_size`` on random
  images (``bench_batches.json``: images/s and the ratio to the largest batch; on a CPU small batches can be
  faster, their activations staying in its caches);
* ``preprocess_img_s``: decoding and resizing source images into the cache, as the preprocess stage does
  (:func:`pipeline.preprocess.decode_rate`);
* ``augment``: images/s of the configured policy on ``train.batch_size × 4`` cached images per call, per
  image (albumentations, as the DataLoader path runs it: ``per_image_img_s``) and batched on the device
  (:class:`pipeline.augment.BatchAugment`, what ``data.loader: device`` runs: ``batched_img_s``; None for a
  policy without a batched form); ``--augment-only`` measures just this, in seconds;
* on CUDA also ``gpu_busy_pct`` (mean of ``torch.cuda.utilization()`` sampled while the training pipeline
  runs; needs pynvml) and ``gpu_peak_mem_mb`` (peak memory allocated by torch over the whole run).

``train_img_s`` uses the configured ``data.loader`` (``dataloader`` or ``device``). A config whose training mode
runs frozen passes (features, partial) measures those instead (:mod:`pipeline.bench_frozen`).

Training and inference call the train stage's building blocks (:func:`~pipeline.training.recipe.build_training`,
``predict_tta``) rather than copies of them, so the figures are those of a real run. The timing
(:mod:`pipeline.core.timing`) and these measurements also turn the planner's members into minutes
(:mod:`pipeline.plan.costs`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from pipeline import augment, bench_frozen
from pipeline.cli import build_parser, stage_main
from pipeline.core.config import Config, with_values
from pipeline.core.jobs import training_slot
from pipeline.core.timing import Effort, timed
from pipeline.core.utils import (autocast, configure_backends, device_name, resolve_device, resolve_precision,
                                 seed_everything, write_json)
from pipeline.data.dataset import gather, to_float
from pipeline.evaluation.tta import configured_views, predict_tta
from pipeline.models.factory import create_model
from pipeline.preprocess import decode_rate
from pipeline.training.modes import training_mode
from pipeline.preprocess import run as preprocess
from pipeline.rundir import RunDir, load_manifest, load_split
from pipeline.training.precision import compute_settings
from pipeline.training.recipe import Training, build_training

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- training


def build_step(cfg: Config, data: dict, device: torch.device, dtype: Optional[torch.dtype],
               channels_last: bool) -> Training:
    """The train stage's recipe (:func:`~pipeline.training.recipe.build_training`) on every cached training row, at
    the given precision; its head starts at random (``train.head_init`` does not change throughput)."""
    if cfg.train.head_init != "random":
        log.info("bench: train.head_init: %s does not change throughput; the head starts at random here",
                 cfg.train.head_init)
    rows = np.arange(len(data["labels"]))
    training = build_training(cfg, data["images"], data["labels"], rows, data["manifest"], device, cfg.seed,
                              precision=(dtype, channels_last), probe=False)
    training.model.train()
    return training


def memory_batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
                   count: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of cached images as uint8 NCHW tensors (what the loader yields), held in memory."""
    out = []
    for k in range(count):
        start = (k * batch_size) % max(1, len(images) - batch_size + 1)
        stop = min(start + batch_size, len(images))
        x = torch.from_numpy(np.array(images[start:stop])).permute(0, 3, 1, 2)
        out.append((x, torch.from_numpy(labels[start:stop].astype(np.int64))))
    return out


def train_floor(cfg: Config, data: dict, device: torch.device, dtype: Optional[torch.dtype], channels_last: bool,
                effort: Effort) -> float:
    """Training images/s on batches kept in memory: the compute floor the pipeline must match."""
    step = build_step(cfg, data, device, dtype, channels_last).step
    held = memory_batches(data["images"], data["labels"], cfg.train.batch_size)
    size = augment.size_at_epoch(cfg.augment, 0, cfg.data.image_size)
    calls = 0

    def one() -> int:
        nonlocal calls
        x, y = held[calls % len(held)]
        calls += 1
        step(x, y, size)
        return len(y)

    return timed(one, min(3, effort.batches), effort)


def train_pipeline(cfg: Config, data: dict, device: torch.device, dtype: Optional[torch.dtype],
                   channels_last: bool, effort: Effort) -> float:
    """Training images/s fed by the train stage's loader (``data.loader``), policy and mixer."""
    training = build_step(cfg, data, device, dtype, channels_last)
    step, loader = training.step, training.loader
    size = augment.size_at_epoch(cfg.augment, 0, cfg.data.image_size)
    effort = Effort(min(effort.batches, max(1, len(loader) - 3)), effort.seconds)
    it = iter(loader)

    def one() -> int:
        nonlocal it
        try:
            images, targets = next(it)
        except StopIteration:
            it = iter(loader)
            images, targets = next(it)
        step(images, targets, size)
        return len(targets)

    try:
        return timed(one, min(3, effort.batches), effort)
    finally:
        del it, loader, training  # stop the workers


def augment_rates(cfg: Config, data: dict, device: torch.device, effort: Effort) -> dict:
    """Images/s of the configured policy per image (albumentations on a gathered NHWC batch, the DataLoader
    path) and batched (:class:`~pipeline.augment.BatchAugment` on the same images as an NCHW uint8 tensor on
    ``device``), ``train.batch_size × 4`` images per call (the DataLoader path's chunk)."""
    rows = np.arange(min(len(data["images"]), cfg.train.batch_size * 4))
    nhwc = gather(data["images"], rows)
    policy = augment.build_policy(cfg.augment, cfg.data.image_size, seed=cfg.seed)
    per_image = timed(lambda: len(policy.batch(nhwc)), 1, effort)
    batched = None
    if cfg.augment.policy in augment.BATCHED_POLICIES:
        aug = augment.BatchAugment(cfg.augment, cfg.data.image_size, seed=cfg.seed)
        x = torch.from_numpy(nhwc).permute(0, 3, 1, 2).contiguous().to(device)
        ids = torch.from_numpy(rows)

        def one() -> int:
            aug(x, ids, 0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return len(rows)

        batched = timed(one, 1, effort)
    return {"policy": cfg.augment.policy, "images_per_call": len(rows), "per_image_img_s": _round(per_image),
            "batched_img_s": _round(batched), "speedup": None if batched is None else round(batched / per_image, 2)}


def gpu_busy(fn: Callable[[], float], device: torch.device, every: float = 0.05) -> tuple[float, Optional[float]]:
    """``fn()`` and, on CUDA with pynvml, the mean GPU utilisation (%) sampled every ``every`` s meanwhile."""
    if device.type != "cuda":
        return fn(), None
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every):
            try:
                samples.append(torch.cuda.utilization(device))
            except Exception:  # noqa: BLE001 - no pynvml / NVML: utilisation is not available
                return

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        value = fn()
    finally:
        done.set()
        thread.join()
    return value, (round(sum(samples) / len(samples), 1) if samples else None)


# --------------------------------------------------------------------------- inference


def eval_model(cfg: Config, num_classes: int, device: torch.device, channels_last: bool) -> torch.nn.Module:
    model = create_model(cfg.model, num_classes).to(device).eval()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def tta_floor(cfg: Config, data: dict, device: torch.device, dtype: Optional[torch.dtype], channels_last: bool,
              effort: Effort) -> float:
    """Forward-only images/s on one normalised batch already in memory."""
    model = eval_model(cfg, data["num_classes"], device, channels_last)
    x, _ = memory_batches(data["test"], np.zeros(len(data["test"]), dtype=np.int64), cfg.infer.batch_size, 1)[0]
    x = to_float(x, data["manifest"]["mean"], data["manifest"]["std"], device, channels_last)

    @torch.no_grad()
    def one() -> int:
        with autocast(device, dtype):
            model(x)
        return len(x)

    return timed(one, min(2, effort.batches), effort)


def tta_pipeline(cfg: Config, data: dict, device: torch.device, dtype: Optional[torch.dtype],
                 channels_last: bool, effort: Effort) -> float:
    """View-images/s of the inference stage's TTA prediction over the cached test set, a slice of
    ``infer.batch_size / views`` images a call (one batch of view-images)."""
    model = eval_model(cfg, data["num_classes"], device, channels_last)
    views = configured_views(cfg.infer)
    step = max(1, cfg.infer.batch_size // max(1, len(views)))
    kwargs = dict(mean=data["manifest"]["mean"], std=data["manifest"]["std"], device=device, dtype=dtype,
                  channels_last=channels_last, batch_size=cfg.infer.batch_size)
    calls = 0

    def one() -> int:
        nonlocal calls
        start = (calls * step) % max(1, len(data["test"]) - step + 1)
        rows = np.arange(start, min(start + step, len(data["test"])))
        calls += 1
        predict_tta(model, data["test"], rows, views, **kwargs)
        return len(rows) * len(views)

    return timed(one, 1, effort)


# --------------------------------------------------------------------------- the tool


def load_data(cfg: Config) -> dict:
    """The cached train and test arrays; on a fresh config the preprocess stage runs first to make them."""
    try:
        manifest = load_manifest(cfg.run_dir)
    except FileNotFoundError:
        log.info("bench: %s has no preprocessed cache yet: running the preprocess stage first", cfg.run_dir)
        manifest = preprocess(cfg)
    images, index = load_split(cfg.run_dir, "train", manifest)
    test, _ = load_split(cfg.run_dir, "test", manifest)
    return {"manifest": manifest, "images": images, "test": test, "num_classes": len(manifest["classes"]),
            "labels": index["label_idx"].to_numpy().astype(np.int64)}


def combos(device: torch.device, dtype: Optional[torch.dtype], channels_last: bool,
           compare: bool = True) -> dict[str, tuple]:
    """The configured precision × memory format, plus (``compare``) every fp32/bf16 × contiguous/channels_last
    setting worth measuring here."""
    names = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    wanted = {(dtype, channels_last)}
    if compare:
        wanted |= {(None, False), (None, True)}
    if compare and (device.type != "cpu" or resolve_precision("auto", device) is not None):  # emulated bf16: slow
        wanted |= {(torch.bfloat16, False), (torch.bfloat16, True)}
    return {f"{names[d]}{'_channels_last' if cl else ''}": (d, cl)
            for d, cl in sorted(wanted, key=lambda c: (str(c[0]), c[1]))}


def run(cfg: Config, batches: int = 30, preprocess_images: int = 2000, rounds: int = 3,
        compare: bool = True, augment_only: bool = False, seconds: Optional[float] = 120,
        batch_sizes: Sequence[int] = ()) -> dict:
    """Measure every figure (see the module docstring) and write ``runs/<experiment>/bench.json``.

    Every figure is measured ``rounds`` times, floors and pipelines alternately, and the best kept, so that
    a passing background load biases neither side of a ratio. ``seconds`` bounds the whole measurement (None:
    ``batches`` calls each, however long): each measurement gets its share, and no round starts past it.
    """
    with training_slot(cfg, "bench") as threads:
        torch.set_num_threads(threads)
        if training_mode(cfg).cache_key(cfg) is not None and not batch_sizes:  # features, partial: frozen passes
            return bench_frozen.run(cfg, rounds, seconds)
        if augment_only:
            return _measure_augment(cfg, Effort(batches, seconds and seconds / 2))
        if batch_sizes:
            share = seconds and seconds / (max(1, rounds) * len(batch_sizes))
            return infer_batches(cfg, batch_sizes, rounds, Effort(batches, share))
        return _measure(cfg, batches, preprocess_images, rounds, compare, seconds)


def synthetic(classes: int, rows: int, side: int) -> dict:
    """Random uint8 images and labels shaped like :func:`load_data`'s (for measurements without the data)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (rows, side, side, 3), dtype=np.uint8)
    manifest = {"classes": [str(c) for c in range(classes)], "mean": [0.5] * 3, "std": [0.25] * 3}
    return {"images": images, "test": images, "labels": (np.arange(rows) % classes).astype(np.int64),
            "manifest": manifest, "num_classes": classes}


def infer_batches(cfg: Config, sizes: Sequence[int], rounds: int, effort: Effort) -> dict:
    """Forward-only images/s of the configured model at each ``infer.batch_size`` in ``sizes`` (random images
    at ``data.image_size``), best of ``rounds`` alternating passes; written to ``bench_batches.json``."""
    device = resolve_device(cfg.train.device)
    dtype, channels_last = compute_settings(cfg, device)
    rates = dict.fromkeys(sizes, 0.0)
    for _ in range(max(1, rounds)):
        for size in sizes:
            probe = with_values(cfg, {"infer.batch_size": size})
            rate = tta_floor(probe, synthetic(2, size, cfg.data.image_size), device, dtype, channels_last, effort)
            rates[size] = max(rates[size], rate)
    largest = rates[max(sizes)]
    result = {"experiment": cfg.experiment, "model": cfg.model.name, "image_size": cfg.data.image_size,
              "device": device_name(device), "threads": torch.get_num_threads(), "channels_last": channels_last,
              "forward_img_s": {str(k): round(v, 1) for k, v in rates.items()},
              "ratio_to_largest": {str(k): round(v / largest, 3) for k, v in rates.items()},
              "best_batch": max(rates, key=rates.get)}
    write_json(RunDir.of(cfg).bench_batches, result)
    return result


def _measure_augment(cfg: Config, effort: Effort) -> dict:
    """Only the augmentation comparison (``--augment-only``), written to ``bench_augment.json``."""
    device = resolve_device(cfg.train.device)
    result = {"experiment": cfg.experiment, "device": device_name(device), "threads": torch.get_num_threads(),
              "augment": augment_rates(cfg, load_data(cfg), device, effort)}
    write_json(RunDir.of(cfg).bench_augment, result)
    return result


def _measure(cfg: Config, batches: int, preprocess_images: int, rounds: int, compare: bool,
             seconds: Optional[float]) -> dict:
    begin = time.perf_counter()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.train.device)
    configure_backends(cfg.train.deterministic)
    # train.precision: bench reads what this measures; measure it from the automatic choice
    dtype = resolve_precision("auto" if cfg.train.precision == "bench" else cfg.train.precision, device)
    channels_last = cfg.train.channels_last and device.type != "mps"
    data = load_data(cfg)
    settings = combos(device, dtype, channels_last, compare)
    configured = next(k for k, v in settings.items() if v == (dtype, channels_last))
    share = seconds and seconds / (max(1, rounds) * (len(settings) + 3) + 2)  # + augmentation and decoding
    effort = Effort(batches, share)
    floors = dict.fromkeys(settings, 0.0)
    train = t_floor = tta = 0.0
    busy: list[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for r in range(max(1, rounds)):
        if r and seconds is not None and time.perf_counter() - begin > seconds * r / max(1, rounds):
            log.info("bench: %d of %d rounds fit in the %.0f s bound (--seconds)", r, rounds, seconds)
            break
        for key, (d, cl) in settings.items():
            floors[key] = max(floors[key], train_floor(cfg, data, device, d, cl, effort))
        rate, pct = gpu_busy(lambda: train_pipeline(cfg, data, device, dtype, channels_last, effort), device)
        train = max(train, rate)
        busy += [pct] if pct is not None else []
        t_floor = max(t_floor, tta_floor(cfg, data, device, dtype, channels_last, effort))
        tta = max(tta, tta_pipeline(cfg, data, device, dtype, channels_last, effort))
        log.info("round %d: train floor %.0f, pipeline %.0f img/s; inference floor %.0f, TTA %.0f view-img/s",
                 r + 1, floors[configured], train, t_floor, tta)
    result = summary(cfg, device, dtype, channels_last, floors, configured, train, t_floor, tta)
    result["augment"] = augment_rates(cfg, data, device, effort)
    if device.type == "cuda":
        result["gpu_busy_pct"] = max(busy) if busy else None
        result["gpu_peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    result["preprocess_img_s"] = _round(decode_rate(cfg, preprocess_images))
    result["seconds"] = round(time.perf_counter() - begin, 1)
    write_json(RunDir.of(cfg).bench, result)
    return result


def summary(cfg: Config, device: torch.device, dtype: Optional[torch.dtype], channels_last: bool,
            floors: dict[str, float], configured: str, train: float, t_floor: float, tta: float) -> dict:
    """The JSON record: the set-up, the figures and their ratios."""
    floor = floors[configured]
    return {
        "experiment": cfg.experiment, "model": cfg.model.name, "policy": cfg.augment.policy,
        "mixer": augment.build_mixer(cfg.augment, 2) is not None, "image_size": cfg.data.image_size,
        "batch_size": cfg.train.batch_size, "infer_batch_size": cfg.infer.batch_size,
        "tta_views": cfg.infer.tta, "threads": torch.get_num_threads(), "num_workers": cfg.data.num_workers,
        "loader": cfg.data.loader,
        "cpu_count": os.cpu_count(), "device": device_name(device),
        "precision": str(dtype).replace("torch.", "") if dtype else "fp32", "channels_last": channels_last,
        "train_floor_img_s": round(floor, 1), "train_img_s": round(train, 1), "train_ratio": round(train / floor, 3),
        "tta_floor_img_s": round(t_floor, 1), "tta_img_s": round(tta, 1), "tta_ratio": round(tta / t_floor, 3),
        "tta_test_img_s": round(tta / max(1, len(configured_views(cfg.infer))), 1), "preprocess_img_s": None,
        "floors": {k: round(v, 1) for k, v in floors.items()}, "best_floor": max(floors, key=floors.get),
        "configured_floor": configured,
    }


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 1)


def _sizes(text: str) -> tuple[int, ...]:
    """``4,16,64`` as batch sizes (positive integers)."""
    try:
        sizes = tuple(int(t) for t in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected batch sizes like 4,16,64, got '{text}'")
    return sizes


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=30, help="timed batches per measurement")
    parser.add_argument("--preprocess-images", type=int, default=2000, help="source images decoded for the rate")
    parser.add_argument("--rounds", type=int, default=3, help="alternate floor and pipeline runs, keep the best")
    parser.add_argument("--seconds", type=float, default=120,
                        help="bound on the whole measurement, in seconds (0: none; --batches calls each)")
    parser.add_argument("--no-compare", dest="compare", action="store_false",
                        help="measure only the configured precision and memory format")
    parser.add_argument("--augment-only", action="store_true",
                        help="measure only the per-image vs batched augmentation rates")
    parser.add_argument("--infer-batches", type=_sizes, default=(),
                        help="measure only the forward floor at these infer.batch_size values, e.g. 4,16,64")
    args, _ = parser.parse_known_args(argv)

    def bench(cfg: Config) -> dict:
        result = run(cfg, args.batches, args.preprocess_images, args.rounds, args.compare, args.augment_only,
                     args.seconds or None, args.infer_batches)
        print(json.dumps(result, indent=2))  # the tool's output
        return result

    bench.__module__ = __name__
    return stage_main(bench, "bench", argv, parser)


if __name__ == "__main__":
    raise SystemExit(main())
