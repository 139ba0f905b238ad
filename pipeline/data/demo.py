"""The embedded demo competition: scikit-learn's digits written as a Kaggle-style folder.

``python -m pipeline.data.demo [--out data/demo]`` writes ``train.csv``, ``train/<id>.png``,
``test/<id>.png``, ``sample_submission.csv`` and ``solution.csv`` (the test answers, kept apart so the
demo can print its test score). No network is needed: the digits ship with scikit-learn.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.core.utils import setup_logging, write_csv

log = logging.getLogger(__name__)


def build(out: str | Path = "data/demo", test_fraction: float = 0.2, seed: int = 0, upscale: int = 4) -> Path:
    """Write the digits competition into ``out`` (8×8 grey digits upscaled ``upscale``×) and return it."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    out = Path(out)
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    labels = digits.target.astype(int)
    ids = np.array([f"{i:05d}" for i in range(len(labels))])  # zero-padded: ids are strings
    tr, te = train_test_split(np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed)
    for split, rows in (("train", tr), ("test", te)):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in rows:
            img = Image.fromarray(images[i], mode="L")
            img.resize((8 * upscale, 8 * upscale), Image.NEAREST).save(folder / f"{ids[i]}.png")
    tr, te = np.sort(tr), np.sort(te)
    write_csv(out / "train.csv", pd.DataFrame({"id": ids[tr], "label": labels[tr]}))
    write_csv(out / "sample_submission.csv", pd.DataFrame({"id": ids[te], "label": 0}))
    write_csv(out / "solution.csv", pd.DataFrame({"id": ids[te], "label": labels[te]}))
    log.info("demo competition written to %s: %d train, %d test images", out, len(tr), len(te))
    return out


def main(argv=None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/demo")
    build(parser.parse_args(argv).out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
