"""The data contract: read a competition folder into tables of ids, labels and confined image paths.

Two layouts are recognised:

* **CSV** (Kaggle style): ``train.csv`` (id, label, optional group, any other columns), ``train/`` and
  ``test/`` image folders whose files are named ``<id>.<ext>`` (the extension is found per file), and
  ``sample_submission.csv``, whose ids and column order define the submission.
* **ImageFolder**: ``train/<class>/*.jpg`` and optionally ``test/*.jpg``; ids are the paths relative to
  the image folder without extension, and the submission format is ``id,label``.

:func:`load_competition` never raises on bad rows: it collects every problem it finds in
``Competition.problems`` so that :func:`check` can report them all at once, naming files and rows.

Ids, labels and groups are strings exactly as written: ``NA``, ``None`` or ``0012`` stay themselves (only an
empty cell is missing), whatever ``data.csv_encoding`` the CSVs are in; ids are matched to file names in Unicode
NFC, so a decomposed ``café`` (as macOS writes names) finds its ``café.png``.
"""
from __future__ import annotations

import io
import logging
import os
import re
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import pandas as pd

from pipeline.core.config import DataConfig

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# read_csv arguments that keep every cell as written: only an empty cell is missing (NaN), "NA", "None", "null"
# and "n/a" stay strings. Give them (with dtype=str or a dtype per text column) to every CSV the pipeline reads
AS_WRITTEN = {"keep_default_na": False, "na_values": [""]}
# a cell a spreadsheet reads as a formula (OWASP's CSV injection rule) unless it is a plain number such as -1
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


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
    warnings: list[str] = field(default_factory=list)  # reported, not refused (e.g. allowed formula-like cells)
    sample_csv: Optional[Path] = None  # the sample submission read (CSV layout)


def nfc(text: str) -> str:
    """``text`` in Unicode normal form C: how ids and file names are compared (macOS writes names in NFD)."""
    return unicodedata.normalize("NFC", text)


class ImageIndex:
    """Files under one image folder, looked up by id (``<id>`` or ``<id>.<ext>``), confined to the folder.

    ``by_stem`` maps each file's NFC-normalised relative path without extension to its relative path on disk."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.real = Path(os.path.realpath(folder))
        self.by_stem: dict[str, str] = {}
        self.by_name: dict[str, str] = {}  # NFC relative path with extension -> relative path on disk
        if folder.is_dir():
            for dirpath, _, files in os.walk(folder):
                rel_dir = os.path.relpath(dirpath, folder)
                for name in files:
                    if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                        rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                        self.by_stem.setdefault(nfc(os.path.splitext(rel)[0]), rel)
                        self.by_name.setdefault(nfc(rel), rel)

    def resolve(self, image_id: str) -> tuple[Optional[Path], Optional[str]]:
        """The image path for ``image_id`` or ``(None, reason)``; ids escaping the folder are refused."""
        if not image_id or os.path.isabs(image_id) or ".." in Path(image_id).parts or "\\" in image_id:
            return None, "escapes the image folder"
        rel = self.by_stem.get(nfc(image_id))
        if rel is None and image_id.lower().endswith(IMAGE_EXTENSIONS):
            rel = self.by_name.get(nfc(image_id))
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


def read_csv_text(path: Path, encoding: str = "utf-8") -> pd.DataFrame:
    """A competition CSV with every cell a string as written (empty: NaN), decoded with ``encoding``
    (``data.csv_encoding``); text in another encoding raises :class:`DataError` naming the file and byte."""
    raw = path.read_bytes()
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError([f"{path}: not {encoding} text: byte 0x{raw[err.start]:02x} at offset {err.start} (line "
                         f"{line}) ({err.reason}); give the file's encoding, e.g. --set data.csv_encoding=latin-1"
                         ]) from None
    try:
        return pd.read_csv(io.StringIO(text), dtype=str, **AS_WRITTEN)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DataError([f"{path}: not a readable CSV ({' '.join(str(err).split())})"]) from None


def load_competition(cfg: DataConfig) -> Competition:
    """Read the competition at ``cfg.root``; problems are collected, not raised (see :func:`check`)."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError([f"data.root {root} is not a folder (download or extract the competition there)"])
    layout = detect_layout(root, cfg)
    comp = _load_csv_layout(root, cfg) if layout == "csv" else _load_imagefolder(root, cfg)
    if comp.test.empty:
        comp.problems.append(f"{root / cfg.test_dir}: no test images"
                             + (f" ({cfg.sample_submission} lists none)" if comp.sample_csv else "")
                             + ": the pipeline predicts a test set")
    formula = formula_cells(comp, cfg)
    (comp.warnings if cfg.allow_formula_cells else comp.problems).extend(formula)
    if cfg.subset and cfg.subset < len(comp.train):
        comp.train = stratified_subset(comp.train, cfg.subset, cfg.subset_seed)
    return comp


def _load_csv_layout(root: Path, cfg: DataConfig) -> Competition:
    problems: list[str] = []
    csv_path = root / cfg.train_csv
    train = read_csv_text(csv_path, cfg.csv_encoding)
    index = ImageIndex(root / cfg.train_dir)
    id_col, label_col = find_columns(train, index, cfg, csv_path)
    if cfg.group_col and cfg.group_col not in train.columns:
        raise DataError([f"{csv_path}: column '{cfg.group_col}' not found (columns: {', '.join(train.columns)})"])
    cfg = replace(cfg, id_col=id_col, label_col=label_col)
    train = train.rename(columns={cfg.id_col: "id", cfg.label_col: "label"})
    if cfg.group_col:
        train = train.rename(columns={cfg.group_col: "group"})
    problems += _check_rows(train, csv_path, cfg)
    train["csv_row"] = train.index + 2  # the row in train.csv (header is row 1), for problems found later
    train["path"] = _attach_paths(train["id"], index, csv_path, problems)
    test, columns = _load_test(root, cfg, problems)
    classes = sort_classes(train["label"].dropna().unique())
    sample_csv = root / cfg.sample_submission
    return Competition(root, "csv", train, test, classes, columns, cfg.id_col, cfg.label_col,
                       "group" if cfg.group_col else None, problems, sample_csv=sample_csv if sample_csv.is_file()
                       else None)


def find_columns(train: pd.DataFrame, index: ImageIndex, cfg: DataConfig, csv_path: Path) -> tuple[str, str]:
    """The id and label columns of ``train.csv``: the configured names when the file has them, else found from
    the data. The id column is the one whose values name the image files; the label column the one other column
    with few distinct values. No candidate, or several, is an error naming them and the ``--set`` to use."""
    id_col = cfg.id_col if cfg.id_col in train.columns else _only(
        [c for c in train.columns if _names_files(train[c], index)], train, csv_path, "id_col", cfg.id_col,
        f"whose values name the files in {index.folder.name}/")
    label_col = cfg.label_col if cfg.label_col in train.columns else _only(
        [c for c in train.columns if c not in (id_col, cfg.group_col) and _few_values(train[c])], train, csv_path,
        "label_col", cfg.label_col, "with few distinct values")
    return id_col, label_col


def _names_files(values: pd.Series, index: ImageIndex, sample: int = 200, share: float = 0.9) -> bool:
    """Whether (nearly) every one of the first ``sample`` values names an image file."""
    head = values.dropna().astype(str).head(sample)
    return len(head) > 0 and sum(index.resolve(v)[0] is not None for v in head) >= share * len(head)


def _few_values(values: pd.Series) -> bool:
    """A column that can hold classes: at least two values, each on two rows or more on average."""
    count, distinct = int(values.notna().sum()), int(values.nunique())
    return 2 <= distinct <= count // 2


def _only(found: list[str], train: pd.DataFrame, csv_path: Path, key: str, configured: str, what: str) -> str:
    """The one candidate column, logged; else a one-line error naming the candidates and the setting."""
    if len(found) == 1:
        log.info("%s has no column '%s': data.%s is '%s', the column %s", csv_path.name, configured, key,
                 found[0], what)
        return found[0]
    which = f"several columns {what} ({', '.join(found)})" if found else f"no column {what}"
    raise DataError([f"{csv_path}: column '{configured}' not found (columns: {', '.join(train.columns)}) and "
                     f"{which}: name it with --set data.{key}=COLUMN"])


def group_candidates(comp: "Competition", n_splits: int) -> list[dict]:
    """Columns of ``train.csv`` beside the id, label and group that look like a group (a user or patient id):
    more values than classes and folds, several rows each. Rows that share one would leak across folds."""
    out = []
    for col in comp.train.columns.difference(["id", "label", "group", "path", "csv_row"]):
        values = comp.train[col].dropna()
        distinct = int(values.nunique())
        if distinct > max(len(comp.classes), n_splits) and len(values) >= 2 * distinct:
            out.append({"column": str(col), "values": distinct, "rows_per_value": round(len(values) / distinct, 1)})
    return out


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
    return problems + _label_spelling(train["label"], csv_path, cfg.label_col)


def _label_spelling(labels: pd.Series, csv_path: Path, label_col: str) -> list[str]:
    """Labels with surrounding whitespace, or written in another Unicode form than a label they equal: each
    would silently be a class of its own."""
    problems = []
    spellings: dict[str, set[str]] = {}
    for label in labels.dropna().unique():
        spellings.setdefault(nfc(label.strip()), set()).add(label)
    for i, label in labels.dropna().items():
        others = sorted(spellings[nfc(label.strip())] - {label})
        if label != label.strip():
            problems.append(f"{csv_path} row {i + 2}: {label_col} {label!r} has surrounding whitespace"
                            + (f" (also written {', '.join(map(repr, others))})" if others else ""))
        elif others:
            problems.append(f"{csv_path} row {i + 2}: {label_col} {label!r} is also written "
                            f"{', '.join(map(repr, others))} (other Unicode form): one class or two?")
    return problems


def looks_like_formula(text: str) -> bool:
    """True when a spreadsheet opening a CSV would run ``text`` as a formula (OWASP's CSV-injection rule:
    starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return); plain numbers such as ``-1`` are fine."""
    return text.startswith(_FORMULA_START) and not _PLAIN_NUMBER.match(text)


def formula_cells(comp: Competition, cfg: DataConfig) -> list[str]:
    """Every id, label and group that looks like a spreadsheet formula, naming its row (or file)."""
    found = []
    for split, frame in (("train", comp.train), ("test", comp.test)):
        for column in [c for c in ("id", "label", "group") if c in frame.columns]:
            for row, value in frame[column].items():
                if isinstance(value, str) and looks_like_formula(value):
                    found.append(f"{_where(comp, cfg, split, row)}: {column} {value!r} looks like a spreadsheet "
                                 "formula (it starts with =, +, -, @, a tab or a carriage return); our CSVs and the "
                                 "submission write it as it is. Rename it, or accept it with "
                                 "--set data.allow_formula_cells=true")
    return found


def _where(comp: Competition, cfg: DataConfig, split: str, row: int) -> str:
    """A row's origin for messages: ``<csv> row N`` (CSV layout) or the image file (ImageFolder)."""
    frame = comp.train if split == "train" else comp.test
    if "csv_row" in frame.columns:
        return f"{comp.root / (cfg.train_csv if split == 'train' else cfg.sample_submission)} row " \
               f"{frame.at[row, 'csv_row']}"
    return str(frame.at[row, "path"])


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
    sample = read_csv_text(sample_path, cfg.csv_encoding)
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


def load_test(root: Path, cfg: DataConfig) -> tuple[pd.DataFrame, list[str], list[str]]:
    """A test folder read as the preprocess stage reads a competition's: (id, path) rows in the order of
    ``root/<sample_submission>``, images in ``root/<test_dir>``; the submission's columns and every problem found
    (ids without an image, images the sample does not list). What a new test set is predicted from."""
    problems: list[str] = []
    test, columns = _load_test(root, cfg, problems)
    return test, columns, problems


def _load_imagefolder(root: Path, cfg: DataConfig) -> Competition:
    problems: list[str] = []
    train_dir = root / cfg.train_dir
    index = ImageIndex(train_dir)
    rows = []
    for image_id, rel in sorted(index.by_stem.items()):
        label = image_id.split("/")[0] if "/" in image_id else None  # the class folder's name, in NFC
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


def submission_format(fmt: str, columns: list[str], classes: list[str], id_col: str, label_col: str) -> str:
    """``labels`` or ``probs``: ``fmt`` itself, or for ``auto`` what the sample submission's ``columns`` ask for.
    Raises ValueError, naming the columns, when they cannot be the submission's: the id then the label column
    (``labels``), or the id then one column per class (``probs``)."""
    rest = [c for c in columns if c != id_col]
    if fmt == "auto":
        if rest and set(rest) <= set(classes) and rest != [label_col]:
            fmt = "probs"
        elif label_col in rest:
            fmt = "labels"
        else:
            raise ValueError(f"cannot tell the submission format from the sample submission's columns {columns}: "
                             f"neither a '{label_col}' column nor class columns {classes}; set submit.format")
    if id_col not in columns:
        raise ValueError(f"the sample submission's columns {columns} lack the id column '{id_col}'")
    if fmt == "labels" and rest != [label_col]:
        extra = [c for c in rest if c != label_col]
        raise ValueError(f"submit.format=labels: the sample submission's columns {columns} should be "
                         f"['{id_col}', '{label_col}']" + (f"; the submission cannot fill {extra}" if extra else ""))
    if fmt == "probs" and set(rest) != set(classes):
        absent, missing = sorted(set(rest) - set(classes)), sorted(set(classes) - set(rest))
        raise ValueError(f"submit.format=probs: sample columns {absent} are not classes {classes}" if absent else
                         f"submit.format=probs: the sample submission has no column for class(es) {missing}")
    return fmt


def structural_problems(comp: Competition, n_splits: int, submit_format: Optional[str] = None) -> list[str]:
    """Every problem found without decoding an image: the loader's, too-small classes and, given the
    ``submit.format``, a sample submission whose columns the submission could not follow."""
    problems = list(comp.problems)
    if submit_format is not None:
        try:
            submission_format(submit_format, comp.submission_columns, comp.classes, comp.id_col, comp.label_col)
        except ValueError as err:
            problems.append(f"{comp.sample_csv}: {err}" if comp.sample_csv else str(err))
    counts = comp.train["label"].value_counts()
    continuous = continuous_labels(counts, n_splits, comp.label_col)
    if continuous:  # one line for the column, not one per value
        return problems + [continuous]
    for label, count in counts.items():
        if count < n_splits:
            problems.append(f"class {label!r} has {count} image(s), fewer than folds.n_splits={n_splits}")
    if len(counts) < 2:
        problems.append(f"train has {len(counts)} class(es); classification needs at least 2")
    return problems


def continuous_labels(counts: pd.Series, n_splits: int, label_col: str) -> Optional[str]:
    """The problem of a label column that holds a measurement rather than classes (every label a number, some
    with a fraction, most of them on fewer rows than folds), or None. ``counts``: rows per label."""
    numbers = pd.to_numeric(pd.Series(counts.index, dtype=object), errors="coerce")
    small = int((counts < n_splits).sum())  # labels on fewer rows than folds
    if counts.empty or numbers.isna().any() or (numbers == numbers.round()).all() or small * 2 <= len(counts):
        return None
    examples = ", ".join(repr(v) for v in counts.index[:3])
    return (f"the label column {label_col!r} looks continuous: {len(counts)} distinct numbers ({examples}, …), "
            f"{small} of them on fewer than folds.n_splits={n_splits} rows. This pipeline classifies: bin a "
            "regression target into classes first, or point data.label_col at the class column")


def image_sources(comp: Competition, split: str, cfg: DataConfig) -> list[str]:
    """Where each image of ``split`` is listed, for messages: ``train.csv row 7: id '0005'`` (CSV layout)."""
    frame = comp.train if split == "train" else comp.test
    if "csv_row" not in frame.columns:  # ImageFolder: the path says it all
        return ["" for _ in range(len(frame))]
    source = comp.root / (cfg.train_csv if split == "train" else cfg.sample_submission)
    return [f"{source} row {r}: id {i!r}: " for r, i in zip(frame["csv_row"], frame["id"])]
