"""Matplotlib figures of the EDA report, each returned as a base64 PNG for embedding in one HTML file.

Figures are drawn with the object-oriented API (``Figure``, no pyplot state), so no display is needed.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageOps

from pipeline.report.figures import mosaic_figure
from pipeline.report.webpage import png_base64
from .scan import rgb01

log = logging.getLogger(__name__)

TRAIN_COLOR, TEST_COLOR = "#3b6fb6", "#e07b39"
THUMB = 96


to_base64 = png_base64


def class_bars(counts: dict[str, int], ratio: float | None) -> str:
    """Bar chart of images per class, largest and smallest highlighted."""
    names, values = list(counts), np.array(list(counts.values()))
    fig = Figure(figsize=(max(6.0, 0.32 * len(names) + 2), 3.6))
    ax = fig.subplots()
    colors = [TRAIN_COLOR] * len(values)
    if len(values) and values.min() < values.max():
        colors[int(values.argmax())], colors[int(values.argmin())] = "#2a9d5c", "#c0392b"
    ax.bar(range(len(names)), values, color=colors)
    tilt = len(names) > 8
    ax.set_xticks(range(len(names)), names, rotation=45 if tilt else 0, ha="right" if tilt else "center", fontsize=8)
    ax.set_ylabel("train images")
    ax.set_title(f"Images per class (imbalance ratio {ratio:.2f})" if ratio else "Images per class")
    ax.grid(axis="y", alpha=0.3)
    return to_base64(fig)


def group_sizes(hist: dict) -> str:
    """Histogram of images per group (from :func:`stats.histogram` counts)."""
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    if hist["edges"]:
        ax.stairs(hist["train"], hist["edges"], fill=True, color=TRAIN_COLOR)
    ax.set_xlabel("images per group")
    ax.set_ylabel("groups")
    ax.set_title(f"Group sizes ({sum(hist['train']):,} groups)")
    return to_base64(fig)


def train_test_hists(hists: dict[str, dict], titles: dict[str, str]) -> str:
    """One panel per feature: train (filled) and test (line) as fractions of their split, shared bins."""
    fig = Figure(figsize=(3.3 * len(hists), 2.9))
    axes = np.atleast_1d(fig.subplots(1, len(hists)))
    for ax, (name, hist) in zip(axes, hists.items()):
        edges = np.asarray(hist["edges"])
        for split, color, fill in (("train", TRAIN_COLOR, True), ("test", TEST_COLOR, False)):
            counts = np.asarray(hist[split], dtype=float)
            if len(edges) and counts.sum():
                ax.stairs(counts / counts.sum(), edges, fill=fill, alpha=0.45 if fill else 1.0, color=color,
                          linewidth=1.6, label=split)
        ax.set_title(titles.get(name, name), fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of split")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return to_base64(fig)


def load_thumb(path: str, side: int = THUMB) -> np.ndarray:
    """An upright RGB thumbnail of ``path`` (grey placeholder when it cannot be read)."""
    try:
        with warnings.catch_warnings(), Image.open(path) as img:
            warnings.simplefilter("ignore")
            img = ImageOps.exif_transpose(img)
            rgb = Image.fromarray(np.round(rgb01(img) * 255).astype(np.uint8))
            rgb.thumbnail((side, side))
            return np.asarray(rgb)
    except Exception as err:  # noqa: BLE001 - a broken file must not break the report
        log.debug("thumbnail of %s failed: %s", path, err)
        return np.full((side, side, 3), 200, dtype=np.uint8)


def thumb_grid(rows: list[tuple[str, list[tuple[str, str]]]]) -> str:
    """A grid of thumbnails: one row per ``(row title, [(path, caption), …])``."""
    return to_base64(mosaic_figure([(title, [(load_thumb(path), caption) for path, caption in items])
                                    for title, items in rows]))
