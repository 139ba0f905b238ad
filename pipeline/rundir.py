"""The run folder, ``runs/<experiment>/``: the one module that knows its paths and what its files mean.

Stages talk only through these files, so every path is named here once. Each file has one writer:

* every stage: ``.lock`` and ``data.json`` (:func:`claim`: one process at a time, one dataset per folder);
* the first stage that computes (train, infer, bench, plan): ``threads.json``, the run's thread count
  (:func:`pipeline.core.jobs.run_threads`);
* :func:`save_config` (called by preprocess and train): ``config.yaml``, the resolved config of the run;
* preprocess: ``preprocess.json`` (the manifest: cache arrays, classes, statistics) and ``*_index.csv``;
* folds: ``folds.csv`` and ``folds.json`` (the split's fingerprint);
* train: ``fold<k>/`` and ``refit/`` checkpoints, ``result.json`` and ``oof.npy`` (:class:`ModelDir`), ``oof.csv``,
  ``cv.json`` and ``tb/``;
* infer: ``fold<k>/test.npy``, ``oof_tta.npy``, ``oof_views.npy`` (keyed on the weights they came from),
  ``test_probs.csv``, ``oof_tta.csv`` and ``cv_tta.json`` (TTA scores, ``infer.tta: auto``'s choice);
* ensemble: ``ensemble.csv``, ``ensemble_oof.csv``, ``ensemble.json``;
* bench: ``bench.json``, ``bench_augment.json``, ``bench_batches.json``, ``bench_frozen.json``; the augment
  preview: ``augment_preview.png``;
* full with ``recipe: auto`` (:mod:`pipeline.plan.planner`): ``plan.json`` in the first member's folder (the
  family, each member's estimated and actual minutes and OOF score, the ensemble and the submission);
* search: ``search/`` (:class:`SearchDir`: the study, its tables, figures and exported configs).

The reports folder, ``<eda.out_dir>/<experiment>/`` (``reports/`` by default), is named here too
(:class:`ReportDir`):

* eda: ``eda/index.html``, ``eda/eda.json``, ``eda/duplicate_groups.csv`` (read by folds'
  ``folds.group_duplicates``) and ``eda/image_flags.csv``;
* results: ``results/index.html`` and ``results/results.json``.

The rules that read the models' files (the training fingerprint that decides whether a fold is up to date, the
folds that count and the stitched out-of-fold table) are :mod:`pipeline.provenance`'s.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pandas as pd

from pipeline.core.config import Config, ConfigError, to_yaml
from pipeline.core.utils import hide_password, holder, read_json, temporary_target, try_lock, write_json, write_text
from pipeline.data.cache import manifest_digest, open_array
from pipeline.data.contract import AS_WRITTEN

log = logging.getLogger(__name__)

MANIFEST = "preprocess.json"
OOF_TABLES = ("oof_tta.csv", "oof.csv")  # a run's out-of-fold table: with TTA when infer scored it, else plain


class ModelDir:
    """One model's folder (``fold<k>/`` or ``refit/``): its checkpoints and predictions."""

    def __init__(self, root: Path, fold: Optional[int]) -> None:
        self.root, self.fold = root, fold
        self.name = f"fold {fold}" if fold is not None else "refit"

    def weights(self, kind: str) -> Path:
        """``best``, ``last`` or ``last_ema`` weights (safetensors)."""
        return self.root / f"{kind}.safetensors"

    def meta(self, kind: str) -> Path:
        """The JSON sidecar of :meth:`weights`: epoch, metrics, classes, normalisation and the config."""
        return self.root / f"{kind}.json"

    @property
    def last_state(self) -> Path:
        """Everything needed to resume exactly: weights, optimizer, scheduler, counters, random streams."""
        return self.root / "last_state.pt"

    @property
    def result(self) -> Path:
        """Written last, when the model finished: its scores and what it was trained on."""
        return self.root / "result.json"

    def temporaries(self) -> list[Path]:
        """Temporary files of writes killed halfway (:func:`~pipeline.core.utils.atomic_path`), never a real file."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_file() and temporary_target(p.name))

    def predictions(self, name: str) -> Path:
        """``oof`` (held-out rows, best epoch), ``oof_tta``, ``oof_views`` (auto TTA's candidates) or ``test``."""
        return self.root / f"{name}.npy"


class RunDir:
    """Every path of one run folder; ``RunDir.of(cfg)`` for a config's."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def of(cls, cfg: Config) -> "RunDir":
        return cls(cfg.run_dir)

    def __str__(self) -> str:
        return str(self.root)

    def model(self, fold: Optional[int]) -> ModelDir:
        """A fold's model folder, or the refit's (``train.refit``) for ``fold=None``."""
        return ModelDir(self.root / (f"fold{fold}" if fold is not None else "refit"), fold)

    def fold_models(self) -> list[ModelDir]:
        """Every ``fold<k>/`` folder present, in fold order."""
        found = (int(m.group(1)) for p in self.root.glob("fold*") if (m := re.fullmatch(r"fold(\d+)", p.name)))
        return [self.model(k) for k in sorted(found)]

    def index(self, entry: dict) -> Path:
        """A split's index table, named by the manifest's entry for it."""
        return self.root / entry["index"]

    def tb(self, name: str) -> Path:
        """A TensorBoard log folder (one per model)."""
        return self.root / "tb" / name

    lock = property(lambda self: self.root / ".lock")
    stamp = property(lambda self: self.root / "data.json")
    config = property(lambda self: self.root / "config.yaml")
    manifest = property(lambda self: self.root / MANIFEST)
    folds_csv = property(lambda self: self.root / "folds.csv")
    folds_json = property(lambda self: self.root / "folds.json")
    oof = property(lambda self: self.root / "oof.csv")
    oof_tta = property(lambda self: self.root / "oof_tta.csv")
    cv = property(lambda self: self.root / "cv.json")
    cv_tta = property(lambda self: self.root / "cv_tta.json")
    test_probs = property(lambda self: self.root / "test_probs.csv")
    ensemble_csv = property(lambda self: self.root / "ensemble.csv")
    ensemble_json = property(lambda self: self.root / "ensemble.json")
    ensemble_oof = property(lambda self: self.root / "ensemble_oof.csv")
    bench = property(lambda self: self.root / "bench.json")
    plan = property(lambda self: self.root / "plan.json")
    threads = property(lambda self: self.root / "threads.json")
    bench_augment = property(lambda self: self.root / "bench_augment.json")
    bench_batches = property(lambda self: self.root / "bench_batches.json")
    bench_frozen = property(lambda self: self.root / "bench_frozen.json")
    augment_preview = property(lambda self: self.root / "augment_preview.png")
    search = property(lambda self: SearchDir(self.root / "search"))

    def oof_table(self, plain: bool = False) -> Optional[Path]:
        """The OOF table (``oof_tta.csv``, else ``oof.csv``; only ``oof.csv`` when ``plain``), None without."""
        names = OOF_TABLES[1:] if plain else OOF_TABLES
        return next((self.root / n for n in names if (self.root / n).is_file()), None)


class SearchDir:
    """The search stage's folder (``search/``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __str__(self) -> str:
        return str(self.root)

    def best(self, rule: str) -> Path:
        """An exported config of the study's pick under ``rule``."""
        return self.root / "best" / f"{rule}.yaml"

    @property
    def chart(self) -> Path:
        """``chart/``: a config per model of the chart (``trial<N>.yaml``, ``ref-<label>.yaml``) to train with
        ``./run.sh full``, and the chart made from their run folders (``chart.png``, ``chart.csv``, ``chart.md``)."""
        return self.root / "chart"

    def file(self, name: str) -> Path:
        """One of the search's own files: ``study.db`` (and ``study.db.lock``, held by the worker using it),
        ``trials.csv``, ``pareto.csv``, ``pareto.png``, ``hypervolume.png``, ``summary.json``, ``config.yaml``,
        ``references.json``, ``rerank*.json``, ``tb``."""
        return self.root / name


class ReportDir:
    """Every path of one experiment's reports folder, ``<eda.out_dir>/<experiment>/``; ``ReportDir.of(cfg)`` for
    a config's. The pages open from disk; the folds stage reads the EDA's duplicate groups from here."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def of(cls, cfg: Config) -> "ReportDir":
        return cls(Path(cfg.eda.out_dir) / cfg.experiment)

    def __str__(self) -> str:
        return str(self.root)

    eda = property(lambda self: self.root / "eda")
    eda_page = property(lambda self: self.eda / "index.html")
    eda_json = property(lambda self: self.eda / "eda.json")
    duplicate_groups = property(lambda self: self.eda / "duplicate_groups.csv")
    image_flags = property(lambda self: self.eda / "image_flags.csv")
    results = property(lambda self: self.root / "results")
    results_page = property(lambda self: self.results / "index.html")
    results_json = property(lambda self: self.results / "results.json")


# --------------------------------------------------------------------------- who may write, which data


class RunBusy(RuntimeError):
    """Another process holds the run folder."""


_HELD: dict[str, int] = {}  # the run folders this process holds, and how many times over


@contextlib.contextmanager
def run_lock(run_dir: str | Path, what: str) -> Iterator[None]:
    """Hold the run folder's ``.lock`` while ``what`` runs; raise :class:`RunBusy` naming the holder if taken.
    Re-entrant within a process: ``full`` holds its folder from planning to submission while its stages run."""
    path = RunDir(run_dir).lock
    held_here = os.path.realpath(path)
    if held_here in _HELD:
        _HELD[held_here] += 1
        try:
            yield
        finally:
            _HELD[held_here] -= 1
        return
    fd = try_lock(path, {"pid": os.getpid(), "stage": what, "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    if fd is None:
        held = holder(path)
        raise RunBusy(f"{run_dir} is in use by another pipeline process (pid {held.get('pid', '?')}, "
                      f"{held.get('stage', '?')} since {held.get('since', '?')}): wait for it to finish, or give "
                      "this run its own folder with --set experiment=NAME")
    _HELD[held_here] = 1
    try:
        yield
    finally:
        del _HELD[held_here]
        os.close(fd)


def data_identity(cfg: Config) -> str:
    """The competition a config reads: the real path of ``data.root``."""
    return os.path.realpath(cfg.data.root)


def suggested_experiment(cfg: Config) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(data_identity(cfg)).name).strip("-") or "data"
    return f"{cfg.experiment}-{name}"


def check_data(cfg: Config, stamp_it: bool = False) -> None:
    """Refuse a run folder made from another competition; with ``stamp_it`` (the preprocess stage, once it
    has cached the data) record this config's competition as the folder's."""
    run, root = RunDir.of(cfg), data_identity(cfg)
    try:
        previous = read_json(run.stamp).get("root") if run.stamp.is_file() else None
    except (OSError, ValueError, AttributeError):
        previous = None  # damaged: stamped again below
    if previous and previous != root:
        raise ConfigError(f"{run} holds results made from {previous}, not from data.root={cfg.data.root}: "
                          f"a run folder never mixes two datasets. Use --set experiment={suggested_experiment(cfg)} "
                          "(or remove the folder to start over)")
    if stamp_it and previous != root:
        write_json(run.stamp, {"root": root})


@contextlib.contextmanager
def claim(cfg: Config, what: str, exclusive: bool = True) -> Iterator[None]:
    """The run folder for one stage: checked to hold this data and (``exclusive``) locked against other
    processes. Under torchrun only rank 0 locks it: the other ranks are the same stage
    (:mod:`pipeline.training.distributed`)."""
    exclusive = exclusive and int(os.environ.get("RANK", "0")) == 0
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(cfg.run_dir, what) if exclusive else contextlib.nullcontext():
        check_data(cfg)
        yield


def without_secrets(cfg: Config) -> Config:
    """``cfg`` as it may be written down: the password of ``search.storage`` masked (a PostgreSQL URL's
    password belongs in ``PGPASSWORD``, not in run folders)."""
    if not cfg.search.storage:
        return cfg
    return dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, storage=hide_password(cfg.search.storage)))


def save_config(cfg: Config) -> None:
    """The resolved config of the run (``config.yaml``), as the stage that trains or caches saw it."""
    run = RunDir.of(cfg)
    run.root.mkdir(parents=True, exist_ok=True)
    write_text(run.config, to_yaml(without_secrets(cfg)))


# --------------------------------------------------------------------------- the preprocessed data and folds


def load_manifest(run_dir: str | Path) -> dict:
    """``preprocess.json``, refused (naming the file and the stage to re-run) when damaged or edited."""
    path = RunDir(run_dir).manifest
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


def load_split(run_dir: str | Path, split: str, manifest: Optional[dict] = None) -> tuple[np.ndarray, pd.DataFrame]:
    """The uint8 N×S×S×3 array (memory-mapped) and the index table (id, label, label_idx, …) of a split."""
    manifest = manifest or load_manifest(run_dir)
    entry = manifest[split]
    if not Path(entry["array"]).is_file():
        raise FileNotFoundError(f"{entry['array']} not found: re-run the preprocess stage (it rebuilds the cache)")
    images = open_array(entry["array"], entry["n"], entry["size"])
    index = pd.read_csv(RunDir(run_dir).index(entry), dtype={"id": str, "label": str, "group": str}, **AS_WRITTEN)
    if len(index) != len(images):
        raise ValueError(f"{entry['array']}: {len(images)} images but {len(index)} rows in {entry['index']}; "
                         "re-run preprocess")
    return images, index


def read_folds(run_dir: str | Path, index: pd.DataFrame) -> pd.DataFrame:
    """``folds.csv`` checked against the preprocessed train index: same ids in the same order, a whole
    number fold on every row. Anything else (missing, truncated, edited, out of date) is an error that says
    to re-run the folds stage."""
    path = RunDir(run_dir).folds_csv
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the folds stage first")
    try:
        folds = pd.read_csv(path, dtype={"id": str, "label": str}, **AS_WRITTEN)
        fold = pd.to_numeric(folds["fold"], errors="raise")
        whole = bool(fold.notna().all() and (fold >= 0).all() and (fold == fold.round()).all())
    except (ValueError, KeyError, pd.errors.ParserError) as err:
        raise ValueError(f"{path} is damaged ({err}): re-run the folds stage") from None
    if not whole or not folds["id"].equals(index["id"]):
        raise ValueError(f"{path} is damaged or does not match the preprocessed train set: re-run the folds stage")
    return folds.assign(fold=fold.astype(int))


def run_oof(run_dir: str | Path, plain: bool = False) -> Optional[Path]:
    """Another run folder's OOF table (see :meth:`RunDir.oof_table`), None without."""
    return RunDir(run_dir).oof_table(plain)


def read_cv(run_dir: str | Path) -> dict:
    """``cv.json`` with infer's TTA scores (``cv_tta.json``) merged in while they describe the current OOF
    table: after a retrain they are stale until infer runs again, and are left out."""
    run = RunDir(run_dir)
    cv = read_json(run.cv) if run.cv.is_file() else {}
    tta = read_json(run.cv_tta) if run.cv_tta.is_file() else {}
    if tta and run.oof.is_file() and tta.get("oof_sha1") == file_sha1(run.oof):
        cv.update({k: v for k, v in tta.items() if k != "oof_sha1"})
    return cv


def file_sha1(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()
