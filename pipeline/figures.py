"""Matplotlib figures of results (object-oriented API, no display): confusion matrix, reliability diagram,
thumbnails of images. Shared by the results report and TensorBoard logging."""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from PIL import Image


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
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    acc = np.bincount(which, weights=correct.astype(float), minlength=bins) / np.maximum(count, 1)
    conf = np.bincount(which, weights=confidence, minlength=bins) / np.maximum(count, 1)
    ece = float((count * np.abs(acc - conf)).sum() / max(count.sum(), 1))
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
    """A grid of uint8 HWC images with a caption each."""
    rows = max(1, -(-len(images) // ncols))
    fig = Figure(figsize=(1.45 * ncols, 1.75 * rows))
    axes = np.atleast_2d(fig.subplots(rows, ncols, squeeze=False))
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k < len(images):
            ax.imshow(images[k], interpolation="nearest")
            ax.set_title(captions[k], fontsize=7)
    return fig


def figure_array(fig: Figure) -> np.ndarray:
    """The figure as an RGB uint8 HWC array (for TensorBoard's add_image)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))
