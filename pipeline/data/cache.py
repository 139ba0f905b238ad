"""The decoded-image cache: every image decoded once (EXIF-oriented, RGB, resized) into a uint8 ``.npy``.

Training and inference memory-map these arrays, so an epoch reads no JPEG and no PNG. The preprocess
stage writes ``runs/<experiment>/preprocess.json`` (the manifest: where the arrays are, the classes, the
channel statistics) plus ``train_index.csv`` and ``test_index.csv`` beside it; later stages read only those.

An image over ``data.max_pixels`` is refused from its header (:func:`open_image`), before a pixel is decoded.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

RESIZE_MODES = ("squash", "crop", "pad")
PAD_FILL = (128, 128, 128)  # letterbox bars: mid-grey, what augmentation fills with too


class ImageTooLarge(ValueError):
    """An image has more pixels than ``data.max_pixels``; found from its header, nothing decoded."""


def open_image(path: str | Path, max_pixels: Optional[int]) -> Image.Image:
    """``Image.open`` (which reads the header only) refusing more than ``max_pixels`` pixels with
    :class:`ImageTooLarge`. With a limit set it replaces Pillow's decompression-bomb warning; None keeps
    Pillow's own limits (a warning over ``Image.MAX_IMAGE_PIXELS``, an error over twice that)."""
    with warnings.catch_warnings():
        if max_pixels is not None:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(path)
    pixels = img.width * img.height
    if max_pixels is not None and pixels > max_pixels:
        img.close()
        raise ImageTooLarge(f"{img.width}x{img.height} is {pixels / 1e6:.1f} Mpx, over data.max_pixels="
                            f"{max_pixels}: shrink the file, or raise the limit (--set data.max_pixels=N)")
    return img


def decode(path: str | Path, size: int, resize: str = "squash", max_pixels: Optional[int] = None) -> np.ndarray:
    """One image as uint8 HWC RGB at ``size``×``size``: EXIF orientation applied, any mode converted.

    ``resize``: ``squash`` stretches to the square (small fixed-size images such as CIFAR), ``crop`` resizes the
    short side to ``size`` and keeps the centre square, ``pad`` fits the long side and letterboxes the rest.
    An image over ``max_pixels`` raises :class:`ImageTooLarge` before it is decoded."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"data.resize: {resize!r} is not one of {list(RESIZE_MODES)}")
    with open_image(path, max_pixels) as img:
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


def gather(images: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``images[rows]`` as an in-memory uint8 array, read from the memory map in sorted row order."""
    rows = np.asarray(rows)
    order = np.argsort(rows)
    batch = np.empty((len(rows),) + images.shape[1:], dtype=np.uint8)
    batch[order] = images[rows[order]]
    return batch
