"""The data contract: read a competition folder into tables of ids, labels and confined image paths.

Two layouts are recognised:

* **CSV** (Kaggle style): ``train.csv`` (id, label, optional group, any other columns), ``train/`` and
  ``test/`` image folders whose files are named ``<id>.<ext>`` (the extension is found per file), and
  ``sample_submission.csv``, whose ids and column order define the submission.
* **ImageFolder**: ``train/<class>/*.jpg`` and optionally ``test/*.jpg``; ids are the paths relative to
  the image folder without extension, and the submission format is ``id,label``.

:func:`load_competition` never raises on bad rows: it collects every problem it finds in
``Competition.problems`` so that :func:`check` can report them all at once, naming files and rows.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd

from pipeline.core.config import DataConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """The competition folder breaks the data contract; the message lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        shown = "\n".join(f"  - {p}" for p in self.problems[:50])
        more = f"\n  … and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(f"{len(self.problems)} data problem(s):\n{shown}{more}")


@dataclass
class Competition:
    """A loaded competition. ``train`` has columns id, label, path (+ group and extras); ``test`` id, path."""

    root: Path
    layout: str
    train: pd.DataFrame
    test: pd.DataFrame
    classes: list[str]
    submission_columns: list[str]
    id_col: str = "id"
    label_col: str = "label"
    group_col: Optional[str] = None
    problems: list[str] = field(default_factory=list)


class ImageIndex:
    """Files under one image folder, looked up by id (``<id>`` or ``<id>.<ext>``), confined to the folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.real = Path(os.path.realpath(folder))
        self.by_stem: dict[str, str] = {}
        if folder.is_dir():
            for dirpath, _, files in os.walk(folder):
                rel_dir = os.path.relpath(dirpath, folder)
                for name in files:
                    if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                        rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                        self.by_stem.setdefault(os.path.splitext(rel)[0], rel)

    def resolve(self, image_id: str) -> tuple[Optional[Path], Optional[str]]:
        """The image path for ``image_id`` or ``(None, reason)``; ids escaping the folder are refused."""
        if not image_id or os.path.isabs(image_id) or ".." in Path(image_id).parts or "\\" in image_id:
            return None, "escapes the image folder"
        rel = self.by_stem.get(image_id)
        if rel is None and image_id.lower().endswith(IMAGE_EXTENSIONS) and (self.folder / image_id).is_file():
            rel = image_id
        if rel is None:
            return None, "has no image"
        path = self.folder / rel
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(self.real):
            return None, f"is a link out of the image folder ({real})"
        return path, None

    def ids(self) -> set[str]:
        return set(self.by_stem)


def detect_layout(root: Path, cfg: DataConfig) -> str:
    if (root / cfg.train_csv).is_file():
        return "csv"
    train_dir = root / cfg.train_dir
    if train_dir.is_dir() and any(p.is_dir() for p in train_dir.iterdir()):
        return "imagefolder"
    raise DataError([f"{root}: neither {cfg.train_csv} nor an ImageFolder layout ({cfg.train_dir}/<class>/) found"])


def load_competition(cfg: DataConfig) -> Competition:
    """Read the competition at ``cfg.root``; problems are collected, not raised (see :func:`check`)."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError([f"data.root {root} is not a folder (download or extract the competition there)"])
    layout = detect_layout(root, cfg)
    comp = _load_csv_layout(root, cfg) if layout == "csv" else _load_imagefolder(root, cfg)
    if cfg.subset and cfg.subset < len(comp.train):
        comp.train = stratified_subset(comp.train, cfg.subset, cfg.subset_seed)
    return comp


def _load_csv_layout(root: Path, cfg: DataConfig) -> Competition:
    problems: list[str] = []
    csv_path = root / cfg.train_csv
    train = pd.read_csv(csv_path, dtype=str, keep_default_na=False, na_values=[""])
    for col in [cfg.id_col, cfg.label_col] + ([cfg.group_col] if cfg.group_col else []):
        if col not in train.columns:
            raise DataError([f"{csv_path}: column '{col}' not found (columns: {', '.join(train.columns)})"])
    train = train.rename(columns={cfg.id_col: "id", cfg.label_col: "label"})
    if cfg.group_col:
        train = train.rename(columns={cfg.group_col: "group"})
    problems += _check_rows(train, csv_path, cfg)
    train["csv_row"] = train.index + 2  # the row in train.csv (header is row 1), for problems found later
    train["path"] = _attach_paths(train["id"], ImageIndex(root / cfg.train_dir), csv_path, problems)
    test, columns = _load_test(root, cfg, problems)
    classes = sort_classes(train["label"].dropna().unique())
    return Competition(root, "csv", train, test, classes, columns, cfg.id_col, cfg.label_col,
                       "group" if cfg.group_col else None, problems)


def _check_rows(train: pd.DataFrame, csv_path: Path, cfg: DataConfig) -> list[str]:
    """Duplicate ids and empty labels/ids, naming the CSV row (1-based, header is row 1)."""
    problems = []
    for i in train.index[train["id"].isna()]:
        problems.append(f"{csv_path} row {i + 2}: empty {cfg.id_col}")
    for i in train.index[train["label"].isna()]:
        problems.append(f"{csv_path} row {i + 2}: empty or NaN {cfg.label_col} (id {train.at[i, 'id']})")
    dup = train["id"].duplicated(keep="first") & train["id"].notna()
    for i in train.index[dup]:
        problems.append(f"{csv_path} row {i + 2}: duplicate id {train.at[i, 'id']!r}")
    if cfg.group_col:
        for i in train.index[train["group"].isna()]:
            problems.append(f"{csv_path} row {i + 2}: empty group {cfg.group_col}")
    return problems


def _attach_paths(ids: pd.Series, index: ImageIndex, source: Path, problems: list[str]) -> list[Optional[str]]:
    paths: list[Optional[str]] = []
    for row, image_id in enumerate(ids):
        if not isinstance(image_id, str):
            paths.append(None)
            continue
        path, reason = index.resolve(image_id)
        if reason:
            problems.append(f"{source} row {row + 2}: id {image_id!r} {reason} ({index.folder})")
        paths.append(str(path) if path else None)
    return paths


def _load_test(root: Path, cfg: DataConfig, problems: list[str]) -> tuple[pd.DataFrame, list[str]]:
    sample_path = root / cfg.sample_submission
    index = ImageIndex(root / cfg.test_dir)
    if not sample_path.is_file():
        problems.append(f"{sample_path}: sample submission not found")
        ids = sorted(index.ids())
        return pd.DataFrame({"id": ids, "path": [str(root / cfg.test_dir / index.by_stem[i]) for i in ids]}), \
            [cfg.id_col, cfg.label_col]
    sample = pd.read_csv(sample_path, dtype=str, keep_default_na=False, na_values=[""])
    if cfg.id_col not in sample.columns:
        raise DataError([f"{sample_path}: column '{cfg.id_col}' not found (columns: {', '.join(sample.columns)})"])
    test = pd.DataFrame({"id": sample[cfg.id_col], "csv_row": sample.index + 2})
    for i in test.index[test["id"].duplicated()]:
        problems.append(f"{sample_path} row {i + 2}: duplicate id {test.at[i, 'id']!r}")
    test["path"] = _attach_paths(test["id"], index, sample_path, problems)
    covered = set(test["path"].dropna())  # by file, so that ids written with their extension count too
    absent = sorted(i for i in index.ids() if str(index.folder / index.by_stem[i]) not in covered)
    for image_id in absent:
        problems.append(f"{index.folder / index.by_stem[image_id]}: test image absent from {sample_path.name}")
    return test, list(sample.columns)


def _load_imagefolder(root: Path, cfg: DataConfig) -> Competition:
    problems: list[str] = []
    train_dir = root / cfg.train_dir
    index = ImageIndex(train_dir)
    rows = []
    for image_id, rel in sorted(index.by_stem.items()):
        label = rel.split("/")[0] if "/" in rel else None
        if label is None:
            problems.append(f"{train_dir / rel}: image outside any class folder")
            continue
        path, reason = index.resolve(image_id)
        if reason:
            problems.append(f"{train_dir / rel}: {reason}")
        rows.append({"id": image_id, "label": label, "path": str(path) if path else None})
    train = pd.DataFrame(rows, columns=["id", "label", "path"])
    test_index = ImageIndex(root / cfg.test_dir)
    test_ids = sorted(test_index.ids())
    test = pd.DataFrame({"id": test_ids, "path": [str(test_index.resolve(i)[0] or "") or None for i in test_ids]})
    return Competition(root, "imagefolder", train, test, sort_classes(train["label"].unique()),
                       [cfg.id_col, cfg.label_col], cfg.id_col, cfg.label_col, None, problems)


def sort_classes(labels) -> list[str]:
    """Class names in a stable order: numeric when every label is an integer, else lexicographic."""
    labels = [str(x) for x in labels]
    if labels and all(x.lstrip("-").isdigit() for x in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def stratified_subset(train: pd.DataFrame, size: int, seed: int) -> pd.DataFrame:
    """A fixed, label-stratified random subset of ``size`` rows (e.g. the 10k-image 'small CIFAR-10')."""
    from sklearn.model_selection import train_test_split

    labelled = train[train["label"].notna()]
    keep, _ = train_test_split(labelled, train_size=size, stratify=labelled["label"], random_state=seed)
    return keep.sort_index().reset_index(drop=True)


def check(comp: Competition, n_splits: int) -> None:
    """Raise :class:`DataError` listing every problem (structural ones plus too-small classes)."""
    problems = structural_problems(comp, n_splits)
    if problems:
        raise DataError(problems)


def structural_problems(comp: Competition, n_splits: int) -> list[str]:
    """Every problem found without decoding an image: the loader's plus too-small classes."""
    problems = list(comp.problems)
    counts = comp.train["label"].value_counts()
    for label, count in counts.items():
        if count < n_splits:
            problems.append(f"class {label!r} has {count} image(s), fewer than folds.n_splits={n_splits}")
    if len(counts) < 2:
        problems.append(f"train has {len(counts)} class(es); classification needs at least 2")
    return problems


def image_sources(comp: Competition, split: str, cfg: DataConfig) -> list[str]:
    """Where each image of ``split`` is listed, for messages: ``train.csv row 7: id '0005'`` (CSV layout)."""
    frame = comp.train if split == "train" else comp.test
    if "csv_row" not in frame.columns:  # ImageFolder: the path says it all
        return ["" for _ in range(len(frame))]
    source = comp.root / (cfg.train_csv if split == "train" else cfg.sample_submission)
    return [f"{source} row {r}: id {i!r}: " for r, i in zip(frame["csv_row"], frame["id"])]
