"""The decoded-image cache: every image decoded once (EXIF-oriented, RGB, resized) into a uint8 ``.npy``.

Training and inference memory-map these arrays, so an epoch reads no JPEG and no PNG. The preprocess
stage writes ``runs/<experiment>/preprocess.json`` (the manifest: where the arrays are, the classes, the
channel statistics) plus ``train_index.csv`` and ``test_index.csv`` beside it; later stages read only those.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from pipeline.core.utils import read_json

MANIFEST = "preprocess.json"


RESIZE_MODES = ("squash", "crop", "pad")
PAD_FILL = (128, 128, 128)  # letterbox bars: mid-grey, what augmentation fills with too


def decode(path: str | Path, size: int, resize: str = "squash") -> np.ndarray:
    """One image as uint8 HWC RGB at ``size``×``size``: EXIF orientation applied, any mode converted.

    ``resize``: ``squash`` stretches to the square (small fixed-size images such as CIFAR), ``crop`` resizes the
    short side to ``size`` and keeps the centre square, ``pad`` fits the long side and letterboxes the rest."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"data.resize: {resize!r} is not one of {list(RESIZE_MODES)}")
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greys: scale to 8 bits, don't clip
            arr = np.asarray(img, dtype=np.float32)
            img = Image.fromarray((arr * (255.0 / max(float(arr.max()), 1.0))).astype(np.uint8), mode="L")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        img = img.convert("RGB")
        if img.size != (size, size):
            if resize == "crop":
                img = ImageOps.fit(img, (size, size), Image.BICUBIC, centering=(0.5, 0.5))
            elif resize == "pad":
                img = ImageOps.pad(img, (size, size), Image.BICUBIC, color=PAD_FILL, centering=(0.5, 0.5))
            else:
                img = img.resize((size, size), Image.BICUBIC, reducing_gap=3.0)
        return np.asarray(img, dtype=np.uint8)


def cache_side(image_size: int, crop_pct: float) -> int:
    """The side the cache stores: ``image_size / crop_pct``, a margin for random-resized crops in training
    while evaluation takes the centre ``image_size`` (timm's ``crop_pct``, fastai's presizing)."""
    return int(round(image_size / crop_pct))


def signature(paths: list[str], size: int, resize: str = "squash") -> str:
    """A fingerprint of the source files (names, sizes, mtimes), the target size and resize mode: cache validity."""
    h = hashlib.sha1(f"size={size}".encode() + (b"" if resize == "squash" else f" resize={resize}".encode()))
    for p in paths:
        st = Path(p).stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_path(cache_dir: str | Path, split: str, sig: str, size: int) -> Path:
    return Path(cache_dir) / f"{split}-{size}px-{sig[:16]}.npy"


def manifest_digest(manifest: dict) -> str:
    """A hash of the manifest's content (without its own ``digest`` entry): an edit shows."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha1(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def load_manifest(run_dir: str | Path) -> dict:
    """``preprocess.json``, refused (naming the file and the stage to re-run) when damaged or edited."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the preprocess stage first")
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is damaged ({err}): re-run the preprocess stage") from None
    if not isinstance(manifest, dict) or manifest.get("digest", manifest_digest(manifest)) != manifest_digest(manifest):
        raise ValueError(f"{path} was edited or damaged (its content no longer matches its digest): re-run the "
                         "preprocess stage, which rewrites it from the data")
    return manifest


def open_array(path: str | Path, n: int, size: int) -> np.ndarray:
    """The memory-mapped N×S×S×3 uint8 cache array; a damaged or mismatched one raises ValueError."""
    try:
        images = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{path} is damaged ({err}): re-run the preprocess stage (it rebuilds the cache)") from None
    if images.shape != (n, size, size, 3) or images.dtype != np.uint8:
        raise ValueError(f"{path} holds {images.dtype} {images.shape}, not uint8 {(n, size, size, 3)}: re-run the "
                         "preprocess stage (it rebuilds the cache)")
    return images


def content_digest(images: np.ndarray, chunk: int = 1024) -> str:
    """A hash of the decoded pixels themselves: unlike :func:`signature` (names, sizes, mtimes), it moves when an
    image is replaced in place and stays when the data folder moves or a file is merely touched."""
    h = hashlib.blake2b(repr((images.shape, str(images.dtype))).encode(), digest_size=20)
    for start in range(0, len(images), chunk):
        h.update(np.ascontiguousarray(images[start:start + chunk]).data)
    return h.hexdigest()


def load_split(run_dir: str | Path, split: str, manifest: Optional[dict] = None) -> tuple[np.ndarray, pd.DataFrame]:
    """The uint8 N×S×S×3 array (memory-mapped) and the index table (id, label, label_idx, …) of a split."""
    manifest = manifest or load_manifest(run_dir)
    entry = manifest[split]
    if not Path(entry["array"]).is_file():
        raise FileNotFoundError(f"{entry['array']} not found: re-run the preprocess stage (it rebuilds the cache)")
    images = open_array(entry["array"], entry["n"], entry["size"])
    index = pd.read_csv(Path(run_dir) / entry["index"], dtype={"id": str, "label": str, "group": str})
    if len(index) != len(images):
        raise ValueError(f"{entry['array']}: {len(images)} images but {len(index)} rows in {entry['index']}; "
                         "re-run preprocess")
    return images, index


def read_folds(run_dir: Path, index: pd.DataFrame) -> pd.DataFrame:
    """``folds.csv`` checked against the preprocessed train index: same ids in the same order, a whole
    number fold on every row. Anything else (missing, truncated, edited, out of date) is an error that says
    to re-run the folds stage."""
    path = Path(run_dir) / "folds.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the folds stage first")
    try:
        folds = pd.read_csv(path, dtype={"id": str, "label": str})
        fold = pd.to_numeric(folds["fold"], errors="raise")
        whole = bool(fold.notna().all() and (fold >= 0).all() and (fold == fold.round()).all())
    except (ValueError, KeyError, pd.errors.ParserError) as err:
        raise ValueError(f"{path} is damaged ({err}): re-run the folds stage") from None
    if not whole or not folds["id"].equals(index["id"]):
        raise ValueError(f"{path} is damaged or does not match the preprocessed train set: re-run the folds stage")
    return folds.assign(fold=fold.astype(int))


def gather(images: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``images[rows]`` as an in-memory uint8 array, read from the memory map in sorted row order."""
    rows = np.asarray(rows)
    order = np.argsort(rows)
    batch = np.empty((len(rows),) + images.shape[1:], dtype=np.uint8)
    batch[order] = images[rows[order]]
    return batch
