"""Matplotlib figures of results (object-oriented API, no display): confusion matrix, reliability diagram,
thumbnails of images. Shared by the results report and TensorBoard logging."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from pipeline.core.utils import atomic_path
from pipeline.evaluation.metrics import reliability


def confusion_figure(cm: np.ndarray, classes: Sequence[str], title: str = "Confusion matrix") -> Figure:
    """Row-normalised confusion matrix (true class per row) with the counts written in each cell."""
    n = len(classes)
    side = min(14.0, 2.5 + 0.55 * n)
    fig = Figure(figsize=(side, side * 0.9))
    ax = fig.subplots()
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7 if n > 12 else 9,
                        color="white" if rates[i, j] > 0.5 else "#222")
    tilt = n > 6
    ax.set_xticks(range(n), classes, rotation=45 if tilt else 0, ha="right" if tilt else "center", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return fig


def reliability_figure(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> tuple[Figure, float]:
    """Accuracy against confidence (the top probability) in equal-width bins, and the expected calibration
    error (ECE: the bin-size-weighted mean gap)."""
    edges = np.linspace(0, 1, bins + 1)
    count, acc, conf, ece = reliability(confidence, correct, bins)
    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.subplots()
    used = count > 0
    ax.plot([0, 1], [0, 1], "--", color="#999", linewidth=1)
    ax.bar(edges[:-1][used], acc[used], width=1 / bins, align="edge", color="#3b6fb6", alpha=0.7,
           edgecolor="#24313f", label="accuracy")
    ax.plot(conf[used], acc[used], "o-", color="#e07b39", markersize=4, label="mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (ECE {ece:.3f})")
    ax.legend(fontsize=8, loc="upper left")
    return fig, ece


def thumbs_figure(images: np.ndarray, captions: Sequence[str], ncols: int = 8) -> Figure:
    """A grid of uint8 HWC images with a caption each, ``ncols`` per row."""
    items = list(zip(images, captions))
    return mosaic_figure([("", items[start:start + ncols]) for start in range(0, len(items), ncols)])


def mosaic_figure(rows: Sequence[tuple[str, Sequence[tuple[np.ndarray, str]]]], cell: float = 1.25) -> Figure:
    """Images (uint8 HxW or HxWx3) in a grid, one row per ``(row title, [(image, caption), …])``, each image
    centred in a ``cell``-inch square with its caption above. Drawn as one picture on one axes: a figure with
    an axes per thumbnail takes seconds to lay out and save, this one milliseconds."""
    items = [item for _, row in rows for item in row]
    side = max([max(np.shape(image)[:2]) for image, _ in items] + [1])
    ncols = max([len(row) for _, row in rows] + [1])
    lines = max([caption.count("\n") + 1 for _, caption in items] + [1])
    gap = round(side * (0.06 + 0.13 * lines) / cell)  # the caption band above each row of images, in pixels
    width, height = side + max(1, side // 10), side + gap
    canvas = np.full((len(rows) * height, ncols * width, 3), 255, np.uint8)
    fig = Figure(figsize=(cell * canvas.shape[1] / side, cell * canvas.shape[0] / side))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    for r, (title, row) in enumerate(rows):
        top = r * height + gap
        for c, (image, caption) in enumerate(row):
            image = np.asarray(image)
            image = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
            h, w = image.shape[:2]
            y, x = top + (side - h) // 2, c * width + (side - w) // 2
            canvas[y:y + h, x:x + w] = image
            ax.text(c * width + side / 2, top - 1, caption, ha="center", va="bottom", fontsize=7)
        if title:
            ax.text(-side / 10, top + side / 2, title, ha="right", va="center", fontsize=9)
    ax.imshow(canvas, interpolation="nearest")
    return fig


def figure_array(fig: Figure) -> np.ndarray:
    """The figure as an RGB uint8 HWC array (for TensorBoard's add_image)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def save_png(fig: Figure, path: Path, dpi: int = 110) -> None:
    """Write the figure as a PNG file atomically: a killed write never leaves half an image."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
