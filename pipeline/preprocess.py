"""Preprocess stage: validate the competition, then decode every image once into the uint8 cache.

``python -m pipeline.preprocess --config CONFIG``. Every data problem (missing, unreadable, escaping or too
large images, duplicate ids, empty labels or labels that differ only by whitespace or Unicode form, formula-like
cells, classes smaller than the fold count, an empty test set, test images absent from the sample submission, a
sample submission whose columns the submission cannot follow) is reported at once, before any training. Re-running with unchanged files and size is
a no-op: the cache is keyed by a fingerprint of the source files.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.cli import stage_main
from pipeline.core.config import Config
from pipeline.data.cache import (ImageTooLarge, cache_path, cache_side, content_digest, decode, manifest_digest,
                                 open_array, signature)
from pipeline.data.contract import Competition, DataError, image_sources, load_competition, structural_problems
from pipeline.rundir import RunDir, check_data, load_manifest, save_config
from pipeline.core.utils import atomic_path, reserve_space, write_csv, write_json

log = logging.getLogger(__name__)


def _decode_one(job: tuple[int, str, int, str, Optional[int]]) -> tuple[int, Optional[np.ndarray], Optional[str]]:
    i, path, size, resize, max_pixels = job
    try:
        return i, decode(path, size, resize, max_pixels), None
    except ImageTooLarge as err:
        return i, None, f"image too large: {err}"
    except Exception as err:  # any decoder failure is a data problem to report, not a crash
        return i, None, f"unreadable image ({type(err).__name__}: {err})"


def decode_all(paths: list[str], size: int, out: Optional[Path], desc: str, workers: int = 0,
               sources: Optional[list[str]] = None, resize: str = "squash", max_pixels: Optional[int] = None) -> None:
    """Decode ``paths`` (``data.resize``) into an N×size×size×3 uint8 ``.npy`` at ``out`` (atomically); ``out``
    None only checks that every file decodes.

    Raises :class:`DataError` listing every unreadable file and every one over ``max_pixels`` (prefixed by its
    ``sources`` entry, e.g. the CSV row); ``out`` is then left as it was."""
    workers = workers or min(os.cpu_count() or 1, 8)
    sources = sources or [""] * len(paths)
    failures: list[tuple[int, str]] = []
    jobs = [(i, p, size, resize, max_pixels) for i, p in enumerate(paths)]
    with contextlib.ExitStack() as stack:
        array = None
        if out is not None:
            tmp = stack.enter_context(atomic_path(out))
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
            reserve_space(tmp)  # a disk too small is an error naming the file now, not a crash halfway
        with get_context("fork").Pool(workers) as pool:
            results = pool.imap_unordered(_decode_one, jobs, chunksize=256)
            for i, image, error in tqdm(results, total=len(jobs), desc=desc, unit="img", mininterval=1.0):
                if error:
                    failures.append((i, f"{sources[i]}{paths[i]}: {error}"))
                elif array is not None:
                    array[i] = image
        if array is not None:
            array.flush()
            del array
        if failures:
            raise DataError([message for _, message in sorted(failures)])


def decode_rate(cfg: Config, count: int, seconds: float = 0.0) -> Optional[float]:
    """Images/s of the preprocess stage's decoder (its worker pool) on up to ``count`` source images; with
    ``seconds``, on 4× as many after each sample that took less, the rate between the last two samples (the pool's
    start-up is paid once per stage, and it is most of 48 small images' time)."""
    try:
        paths = load_competition(cfg.data).train["path"].tolist()
    except Exception as err:  # the sources may be gone while the cache remains
        log.warning("preprocess rate not measured: %s", err)
        return None
    if not paths:
        return None
    timed = [(0, 0.0)]
    with tempfile.TemporaryDirectory() as tmp:
        while not timed[-1][0] or (timed[-1][1] < seconds and timed[-1][0] < len(paths)):
            n, start = min(count * 4 ** (len(timed) - 1), len(paths)), time.perf_counter()
            decode_all(paths[:n], cfg.data.image_size, Path(tmp) / "bench.npy", "timed decode")
            timed.append((n, time.perf_counter() - start))
    (n0, t0), (n1, t1) = timed[-2:]
    return (n1 - n0) / (t1 - t0) if t1 > t0 else n1 / t1


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] over a uint8 N×H×W×3 array, computed in chunks."""
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for start in range(0, len(images), chunk):
        block = np.asarray(images[start:start + chunk], dtype=np.float64) / 255.0
        total += block.sum(axis=(0, 1, 2))
        total_sq += (block ** 2).sum(axis=(0, 1, 2))
        count += block.shape[0] * block.shape[1] * block.shape[2]
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(total_sq / max(count, 1) - mean ** 2, 1e-12))
    return mean.round(6).tolist(), std.round(6).tolist()


def _cache_split(comp: Competition, split: str, cfg: Config, previous: dict) -> tuple[dict, list[str]]:
    frame = comp.train if split == "train" else comp.test
    paths = frame["path"].tolist()
    size = cache_side(cfg.data.image_size, cfg.data.crop_pct)
    sig = signature(paths, size, cfg.data.resize)
    out = cache_path(cfg.data.cache_dir, split, sig, size)
    entry = {"array": str(out), "index": f"{split}_index.csv", "signature": sig, "n": len(paths), "size": size}
    if out.is_file() and previous.get(split, {}).get("signature") == sig:
        try:
            images = open_array(out, len(paths), size)
            log.info("%s cache up to date: %s", split, out)
            if split == "train":  # the pixels trained models record; nothing reads a test digest
                entry["content"] = previous[split].get("content") or content_digest(images)
            return entry, []
        except ValueError as err:
            log.warning("%s; rebuilding it", err)
    try:
        decode_all(paths, size, out, f"decode {split}", sources=image_sources(comp, split, cfg.data),
                   resize=cfg.data.resize, max_pixels=cfg.data.max_pixels)
    except DataError as err:
        return entry, err.problems
    if split == "train":
        entry["content"] = content_digest(np.load(out, mmap_mode="r"))
    return entry, []


def unreadable_images(comp: Competition, cfg: Config) -> list[str]:
    """Every listed image that exists but does not decode (checked without writing a cache), naming its row."""
    problems: list[str] = []
    for split in ("train", "test"):
        frame = comp.train if split == "train" else comp.test
        keep = frame["path"].notna().to_numpy()
        sources = [s for s, k in zip(image_sources(comp, split, cfg.data), keep) if k]
        try:
            decode_all(frame.loc[keep, "path"].tolist(), 8, None, f"check {split}", sources=sources,
                       max_pixels=cfg.data.max_pixels)
        except DataError as err:
            problems += err.problems
    return problems


def _index_frame(comp: Competition, split: str) -> pd.DataFrame:
    if split == "test":
        return comp.test[["id"]]
    frame = comp.train.drop(columns=["path", "csv_row"], errors="ignore").copy()
    frame.insert(2, "label_idx", frame["label"].map({c: i for i, c in enumerate(comp.classes)}))
    return frame


def _previous_manifest(run_dir: Path) -> dict:
    """The last manifest, or nothing when there is none or it is damaged or edited (then all is rebuilt)."""
    try:
        return load_manifest(run_dir)
    except FileNotFoundError:
        return {}
    except ValueError as err:
        log.warning("%s; rebuilding everything", err)
        return {}


def run(cfg: Config) -> dict:
    """Validate and cache the competition; return the manifest (also written to the run folder)."""
    check_data(cfg)  # a run folder never mixes two datasets
    comp = load_competition(cfg.data)
    for warning in comp.warnings:  # accepted by the config (data.allow_formula_cells), still worth a line each
        log.warning("%s", warning)
    structural = structural_problems(comp, cfg.folds.n_splits, cfg.submit.format)
    if structural:  # no cache can be built; still decode every image so that one report lists everything
        raise DataError(structural + unreadable_images(comp, cfg))
    run = RunDir.of(cfg)
    save_config(cfg)
    previous = _previous_manifest(run.root)
    manifest = {"root": str(comp.root), "layout": comp.layout, "image_size": cfg.data.image_size,
                "cache_size": cache_side(cfg.data.image_size, cfg.data.crop_pct), "resize": cfg.data.resize,
                "classes": comp.classes, "submission_columns": comp.submission_columns,
                "id_col": comp.id_col, "label_col": comp.label_col, "group_col": comp.group_col}
    problems: list[str] = []
    for split, frame in (("train", comp.train), ("test", comp.test)):
        manifest[split], failed = _cache_split(comp, split, cfg, previous)
        problems += failed
        write_csv(run.index(manifest[split]), _index_frame(comp, split))
    if problems:
        raise DataError(problems)
    if previous.get("train", {}).get("signature") == manifest["train"]["signature"] and "mean" in previous:
        manifest["mean"], manifest["std"] = previous["mean"], previous["std"]
    else:
        manifest["mean"], manifest["std"] = channel_stats(np.load(manifest["train"]["array"], mmap_mode="r"))
    manifest["digest"] = manifest_digest(manifest)
    write_json(run.manifest, manifest)
    check_data(cfg, stamp_it=True)
    log.info("preprocess: %d train / %d test images at %dpx, %d classes, mean %s std %s",
             manifest["train"]["n"], manifest["test"]["n"], cfg.data.image_size, len(comp.classes),
             manifest["mean"], manifest["std"])
    return manifest


def main(argv=None) -> int:
    return stage_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
