"""A new test set: the images of a folder (or a Kaggle-style test folder with its sample submission), decoded
into a work folder exactly as the run's preprocess stage decoded its test set, never into the run folder.

:func:`read_test_set` lists the images: with ``<DATA>/<data.sample_submission>`` its ids, order and columns
(images in ``<DATA>/<data.test_dir>``, else in ``DATA`` itself), as :func:`pipeline.data.contract.load_test` reads
a competition's; without one, every image under the folder, its id the path inside it without extension.
:func:`decode_split` decodes rows of it (``data.resize``, the cache side, ``data.max_pixels`` of the run's
manifest and config) into a uint8 array and an index table in the work folder and returns the manifest entry
the training modes' predictors read a split from.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from pipeline.core.config import DataConfig
from pipeline.core.utils import write_csv
from pipeline.data.cache import cache_path, signature
from pipeline.data.contract import IMAGE_EXTENSIONS, DataError, ImageIndex, load_test, read_csv_text
from pipeline.preprocess import decode_all

log = logging.getLogger(__name__)


@dataclass
class TestSet:
    """The images to predict: ``frame`` (id, path; ``csv_row`` with a sample submission), the sample submission
    (None: the submission is id + label over the images found) and where each image is listed, for messages."""
    folder: Path
    frame: pd.DataFrame
    sample: Optional[pd.DataFrame]
    sources: list[str]

    def __len__(self) -> int:
        return len(self.frame)


def image_folder(data: Path, cfg: DataConfig) -> Path:
    """Where the images of ``data`` are: its ``data.test_dir`` sub-folder when there is one, else itself."""
    inner = data / cfg.test_dir
    return inner if inner.is_dir() else data


def read_test_set(data: str | Path, cfg: DataConfig) -> TestSet:
    """The images of ``data`` (see the module's docstring); a :class:`DataError` lists every problem at once."""
    data = Path(data)
    if not data.is_dir():
        raise DataError([f"{data}: not a folder of images"])
    folder = image_folder(data, cfg)
    sample_path = data / cfg.sample_submission
    if sample_path.is_file():
        rel = folder.relative_to(data).as_posix() if folder != data else "."
        frame, _, problems = load_test(data, dataclasses.replace(cfg, root=str(data), test_dir=rel))
        if problems:
            raise DataError(problems)
        sample = read_csv_text(sample_path, cfg.csv_encoding)
        sources = [f"{sample_path} row {r}: id {i!r}: " for r, i in zip(frame["csv_row"], frame["id"])]
        test = TestSet(folder, frame, sample, sources)
    else:
        index = ImageIndex(folder)
        ids = sorted(index.ids())
        frame = pd.DataFrame({"id": ids, "path": [str(folder / index.by_stem[i]) for i in ids]})
        test = TestSet(folder, frame, None, [""] * len(ids))
    if not len(test):
        raise DataError([f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})"])
    return test


def decode_split(test: TestSet, rows: np.ndarray, split: str, work: Path, size: int, resize: str,
                 max_pixels: Optional[int]) -> dict:
    """Decode ``rows`` of ``test`` at ``size`` px (``resize``) into ``work``; the split's manifest entry (array,
    index, signature, n, size), its signature unique to the split and its images. Unreadable images and images
    over ``max_pixels`` raise one :class:`DataError` naming every one."""
    paths = test.frame["path"].iloc[rows].tolist()
    key = hashlib.sha1(f"{split}\0{signature(paths, size, resize)}".encode()).hexdigest()
    out = cache_path(work, split, key, size)
    if not out.is_file():
        decode_all(paths, size, out, f"decode {split}", sources=[test.sources[i] for i in rows], resize=resize,
                   max_pixels=max_pixels)
    index = work / f"{split}-{key[:16]}_index.csv"
    write_csv(index, test.frame.iloc[rows][["id"]])
    return {"array": str(out), "index": str(index.resolve()), "signature": key, "n": len(rows), "size": size}


def unreadable(test: TestSet, rows: np.ndarray, max_pixels: Optional[int]) -> list[str]:
    """Every image of ``rows`` that does not decode or is over ``max_pixels`` (checked at a tiny size, nothing
    written), named with where it is listed: what completes a report when an earlier part already failed."""
    try:
        decode_all(test.frame["path"].iloc[rows].tolist(), 8, None, "check", sources=[test.sources[i] for i in rows],
                   max_pixels=max_pixels)
    except DataError as err:
        return err.problems
    return []
