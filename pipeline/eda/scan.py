"""One pass over every image: open each file once and measure everything the report needs.

:func:`scan_image` runs in worker processes (a ``multiprocessing.Pool``) and returns a plain tuple per
file (cheap to pickle); :func:`scan_paths` collects them into a DataFrame with :data:`COLUMNS`. Files are
only read, never written. Broken files become rows with ``readable=False`` and the error message.
"""
from __future__ import annotations

import functools
import hashlib
import io
import logging
import math
import multiprocessing
import os
import warnings
from typing import Optional, Sequence

import imagehash
import numpy as np
import pandas as pd
from PIL import Image, ImageOps
from tqdm import tqdm

from pipeline.data.cache import open_image

log = logging.getLogger(__name__)

ORIENTATION_TAG = 0x0112
STATS_MAX_SIDE = 512  # pixel statistics of bigger images are taken on a downscaled copy (speed, memory)
THUMB_SIDE = 16  # grey thumbnail kept per image to confirm near duplicates found by pHash
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, what PIL uses for "L"

COLUMNS = ["path", "readable", "error", "file_bytes", "format", "mode", "width", "height", "orientation",
           "md5", "phash", "thumb", "mean_r", "mean_g", "mean_b", "sq_r", "sq_g", "sq_b", "brightness", "contrast"]


def _depth_scale(mode: str, arr: np.ndarray) -> float:
    """Divisor that maps a high-depth single-channel array (modes I;16*, I, F) to [0, 1]."""
    if mode.startswith("I;16"):
        return 65535.0
    peak = float(arr.max()) if arr.size else 0.0
    if mode == "F" and peak <= 1.0:
        return 1.0
    return 65535.0 if peak > 255 else 255.0


def rgb01(img: Image.Image) -> np.ndarray:
    """The image as an HxWx3 float32 array in [0, 1], at most ~STATS_MAX_SIDE per side.

    16-bit and float modes are rescaled by their bit depth (not clipped by PIL's 8-bit conversion), alpha
    is dropped and palettes/CMYK/grey are converted, i.e. what a loader doing ``convert("RGB")`` sees.
    """
    step = max(1, math.ceil(max(img.size) / STATS_MAX_SIDE))
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)[::step, ::step]
        arr = np.clip(arr / _depth_scale(img.mode, arr), 0.0, 1.0)
        return np.repeat(arr[..., None], 3, axis=2)
    rgb = img.convert("RGB")
    if step > 1:
        rgb = rgb.reduce(step)
    return np.asarray(rgb, dtype=np.float32) / 255.0


def _failed(path: str, size: int, md5: Optional[str], header: tuple, error: str) -> tuple:
    fmt, mode, width, height = header
    return (path, False, error, size, fmt, mode, width, height, 1, md5, 0, None) + (np.nan,) * 8


def scan_image(path: str, max_pixels: Optional[int] = None) -> tuple:
    """Measure one file: bytes, md5, format, mode, size, EXIF orientation, channel moments, pHash.

    The perceptual hash is taken after applying the EXIF rotation, so a rotated copy still matches. A file over
    ``max_pixels`` (``data.max_pixels``) is not decoded: it is a failed row saying so.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        return _failed(path, 0, None, (None, None, 0, 0), f"cannot read: {err}")
    md5 = hashlib.md5(data).hexdigest()
    header: tuple = (None, None, 0, 0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-transparency and similar notices are not problems
            with open_image(io.BytesIO(data), max_pixels) as img:
                header = (img.format, img.mode, img.width, img.height)
                if max(img.size) > 2 * STATS_MAX_SIDE:
                    img.draft(img.mode, (STATS_MAX_SIDE, STATS_MAX_SIDE))  # JPEG: decode at reduced scale
                img.load()  # raises on truncated or corrupt data
                orientation = int(img.getexif().get(ORIENTATION_TAG, 1) or 1)
                upright = ImageOps.exif_transpose(img) if orientation != 1 else img
                rgb = rgb01(upright)
    except Exception as err:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, ValueError…)
        return _failed(path, len(data), md5, header, f"{type(err).__name__}: {err}")
    return (path, True, None, len(data), *header, orientation, md5) + _pixel_stats(rgb)


def _pixel_stats(rgb: np.ndarray) -> tuple:
    """(pHash as int, grey thumbnail bytes, channel means, channel mean squares, brightness, contrast)."""
    flat = rgb.reshape(-1, 3)
    means = flat.mean(axis=0, dtype=np.float64)
    squares = np.square(flat).mean(axis=0, dtype=np.float64)
    gray = rgb @ LUMA
    gray8 = Image.fromarray(np.round(gray * 255.0).astype(np.uint8))
    bits = imagehash.phash(gray8).hash.ravel()
    phash = int.from_bytes(np.packbits(bits).tobytes(), "big")
    thumb = gray8.resize((THUMB_SIDE, THUMB_SIDE), Image.BOX).tobytes()
    return (phash, thumb, *means.tolist(), *squares.tolist(), float(gray.mean()), float(gray.std()))


def default_workers() -> int:
    """Worker processes for the scan: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def scan_paths(paths: Sequence[str], workers: int, desc: str = "scan", max_pixels: Optional[int] = None
               ) -> pd.DataFrame:
    """Scan ``paths`` in parallel (order kept) with a progress bar; one row per path (:func:`scan_image`)."""
    paths = list(paths)
    scan_one = functools.partial(scan_image, max_pixels=max_pixels)
    bar = dict(total=len(paths), desc=desc, unit="img", smoothing=0.1)
    log.debug("%s: %d images, %d worker process(es)", desc, len(paths), workers)
    if workers <= 1 or len(paths) < 16:
        rows = [scan_one(p) for p in tqdm(paths, **bar)]
    else:
        chunk = max(1, min(256, len(paths) // (workers * 8)))
        with multiprocessing.Pool(workers) as pool:
            rows = list(tqdm(pool.imap(scan_one, paths, chunksize=chunk), **bar))
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["phash"] = np.array([r[10] for r in rows], dtype=np.uint64)  # 0 (and readable=False) when unreadable
    return frame
