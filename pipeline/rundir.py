"""The run folder, ``runs/<experiment>/``: the one module that knows its paths and what its files mean.

Stages talk only through these files, so every path is named here once. Each file has one writer:

* every stage: ``.lock`` and ``data.json`` (:func:`claim`: one process at a time, one dataset per folder);
* :func:`save_config` (called by preprocess and train): ``config.yaml``, the resolved config of the run;
* preprocess: ``preprocess.json`` (the manifest: cache arrays, classes, statistics) and ``*_index.csv``;
* folds: ``folds.csv`` and ``folds.json`` (the split's fingerprint);
* train: ``fold<k>/`` and ``refit/`` checkpoints, ``result.json`` and ``oof.npy`` (:class:`ModelDir`), ``oof.csv``,
  ``cv.json`` and ``tb/``;
* infer: ``fold<k>/test.npy``, ``oof_tta.npy``, ``oof_views.npy`` (keyed on the weights they came from),
  ``test_probs.csv``, ``oof_tta.csv`` and ``cv_tta.json`` (TTA scores, ``infer.tta: auto``'s choice);
* ensemble: ``ensemble.csv``, ``ensemble_oof.csv``, ``ensemble.json``;
* bench: ``bench.json``, ``bench_augment.json``, ``bench_batches.json``; the augment preview: ``augment_preview.png``;
* full with ``recipe: auto`` (:mod:`pipeline.plan`): ``plan.json`` in the first member's folder (the family, each
  member's estimated and actual minutes and OOF score, the ensemble and the submission);
* search: ``search/`` (:class:`SearchDir`: the study, its tables, figures and exported configs).

Beside the paths live the rules that read them: the training fingerprint that decides whether a fold is up to date
(:func:`fold_done`), the folds that count (:func:`counted_folds`) and the stitched out-of-fold table
(:func:`collect_oof`).
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
import yaml

from pipeline.core.config import Config, ConfigError, to_dict, to_yaml
from pipeline.core.utils import hide_password, holder, read_json, temporary_target, try_lock, write_json, write_text
from pipeline.data.cache import manifest_digest, open_array
from pipeline.data.contract import AS_WRITTEN
from pipeline.models.arch import load_spec
from pipeline.models.weights import start_digest

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
    bench_augment = property(lambda self: self.root / "bench_augment.json")
    bench_batches = property(lambda self: self.root / "bench_batches.json")
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

    def file(self, name: str) -> Path:
        """One of the search's own files: ``study.db`` (and ``study.db.lock``, held by the worker using it),
        ``trials.csv``, ``pareto.csv``, ``pareto.png``, ``hypervolume.png``, ``summary.json``, ``config.yaml``,
        ``references.json``, ``rerank*.json``, ``tb``."""
        return self.root / name


# --------------------------------------------------------------------------- who may write, which data


class RunBusy(RuntimeError):
    """Another process holds the run folder."""


@contextlib.contextmanager
def run_lock(run_dir: str | Path, what: str) -> Iterator[None]:
    """Hold the run folder's ``.lock`` while ``what`` runs; raise :class:`RunBusy` naming the holder if taken."""
    path = RunDir(run_dir).lock
    fd = try_lock(path, {"pid": os.getpid(), "stage": what, "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    if fd is None:
        held = holder(path)
        raise RunBusy(f"{run_dir} is in use by another pipeline process (pid {held.get('pid', '?')}, "
                      f"{held.get('stage', '?')} since {held.get('since', '?')}): wait for it to finish, or give "
                      "this run its own folder with --set experiment=NAME")
    try:
        yield
    finally:
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


# --------------------------------------------------------------------------- teacher (distillation) tables


def teacher_table(cfg: Config) -> Optional[Path]:
    """The teacher's OOF table: a CSV path as given, or a run folder's ``oof_tta.csv`` (else ``oof.csv``);
    a bare experiment name is looked up in ``runs_dir``. None without a teacher."""
    if not cfg.train.teacher:
        return None
    path = Path(cfg.train.teacher)
    if not path.exists():
        path = Path(cfg.runs_dir) / cfg.train.teacher
    if path.is_file():
        return path
    if (table := run_oof(path)) is not None:
        return table
    if Path(cfg.train.teacher).suffix == ".csv":
        raise FileNotFoundError(f"train.teacher={cfg.train.teacher!r}: no such file (run the teacher's ensemble first)")
    raise FileNotFoundError(f"train.teacher={cfg.train.teacher!r}: no OOF table (oof_tta.csv, oof.csv) in {path}: "
                            "train the teacher first, or give the path of its OOF CSV (e.g. ensemble_oof.csv)")


def teacher_signature(cfg: Config) -> Optional[str]:
    """SHA-1 of the teacher's OOF table (part of the training fingerprint: a retrained teacher retrains)."""
    path = teacher_table(cfg)
    return None if path is None else file_sha1(path)


# --------------------------------------------------------------------------- is a model up to date


# settings that cannot change a fold's weights: changing them must not retrain anything (how the CSV is decoded
# and which images are refused change the data, which the pixel and split digests catch)
# (train.refit adds a model: the folds stay valid, and the refit is fingerprinted with the same settings)
_NOT_TRAINING = {"data": ("cache_dir", "num_workers", "csv_encoding", "max_pixels", "allow_formula_cells"),
                 "train": ("folds", "resume", "threads", "device", "refit")}


def training_fingerprint(cfg: Config) -> str:
    """The config sections that shape the trained weights (not inference, ensembling or paths), as YAML."""
    full = to_dict(cfg)
    keep = {k: full[k] for k in ("seed", "data", "folds", "model", "augment", "train")}
    for section, keys in _NOT_TRAINING.items():
        keep[section] = {k: v for k, v in keep[section].items() if k not in keys}
    if isinstance(cfg.model.spec, str):  # the architecture, not its file's name: editing the file retrains
        keep["model"]["spec"] = load_spec(cfg.model.spec)
    if cfg.train.teacher:  # the teacher's predictions themselves: a retrained teacher retrains the student
        keep["train"]["teacher_oof_sha1"] = teacher_signature(cfg)
    return yaml.safe_dump(keep, sort_keys=True)


def same_training(stored: Optional[str], cfg: Config, weights_by_content: bool = False) -> bool:
    """True when a stored fingerprint describes the same training as ``cfg``.

    A key the stored fingerprint lacks (added to the config after that fold was trained) counts as the same
    when ``cfg`` leaves it at its default: a new option's default keeps the old behaviour, so adding one must
    not retrain every finished experiment. With ``weights_by_content`` (the model recorded its starting file's
    digest, checked by :func:`data_change`) ``model.weights``' path may differ: a moved file is the same start."""
    if stored is None:
        return False
    current = yaml.safe_load(training_fingerprint(cfg))
    default = yaml.safe_load(training_fingerprint(Config()))
    old = yaml.safe_load(stored)
    if weights_by_content and old.get("model", {}).get("weights") and current["model"]["weights"]:
        old["model"]["weights"] = current["model"]["weights"]
    for section, values in current.items():
        if isinstance(values, dict) and isinstance(old.get(section), dict):
            for key in set(values) - set(old[section]):
                if values[key] == default[section].get(key):
                    old[section][key] = values[key]
    return old == current


def split_signature(cfg: Config) -> Optional[str]:
    """The folds stage's fingerprint (``folds.json``: every id, its label, the fold settings); None without it."""
    try:
        return read_json(RunDir.of(cfg).folds_json).get("fingerprint")
    except (OSError, ValueError):
        return None


def images_signature(cfg: Config) -> Optional[str]:
    """The preprocess stage's digest of the decoded train pixels (``preprocess.json``); None without it."""
    try:
        return read_json(RunDir.of(cfg).manifest)["train"].get("content")
    except (OSError, ValueError, KeyError, AttributeError):
        return None


def trained_with(cfg: Config) -> dict:
    """What a fold's model depends on, stored with it: the training settings, the folds it was split by, the
    pixels it saw and the weights it started from."""
    return {"fingerprint": training_fingerprint(cfg), "folds": split_signature(cfg), "images": images_signature(cfg),
            "start_weights": start_digest(cfg.model)}


def data_change(stored: dict, cfg: Config) -> Optional[str]:
    """What a stored model was trained on that the run no longer holds, or None. Other folds: a label fixed in
    train.csv or new fold settings remake ``folds.csv``, and a model trained on the old split would leak into the
    new one's held-out rows. Other images: an image replaced in place. Other starting weights: ``model.weights``
    replaced under the same name (a deleted one changes nothing). Models saved before any of these was recorded
    count as the same."""
    for key, now, what in (("folds", split_signature(cfg), "other folds (labels or fold settings changed)"),
                           ("images", images_signature(cfg), "other images (an image was replaced)"),
                           ("start_weights", start_digest(cfg.model) or stored.get("start_weights"),
                            "other starting weights (model.weights or the shipped file changed)")):
        if stored.get(key) is not None and stored[key] != now:
            return what
    return None


def fold_done(cfg: Config, fold: Optional[int]) -> Optional[dict]:
    """The fold's (``None``: the refit's) result when it finished with the same training settings (then it is
    skipped)."""
    model = RunDir.of(cfg).model(fold)
    if not model.result.is_file():
        return None
    try:
        result = read_json(model.result)
    except (OSError, ValueError):
        log.warning("%s: %s is damaged: stale until the train stage trains it again", model.name, model.result)
        return None
    change = data_change(result, cfg)
    if change:
        log.info("%s was trained on %s: stale until the train stage trains it again",
                 "the refit" if fold is None else model.name, change)
        return None
    by_content = result.get("start_weights") is not None
    return result if same_training(result.get("fingerprint"), cfg, weights_by_content=by_content) else None


def counted_folds(cfg: Config, fold_of: np.ndarray) -> list[int]:
    """Folds whose results count: in ``folds.csv``, in ``train.folds`` (when set) and finished with the
    current training settings. A fold dropped from ``train.folds``, trained with other settings or left
    unfinished never mixes into the OOF score or the test predictions."""
    wanted = set(cfg.train.folds) if cfg.train.folds is not None else None
    return [int(f) for f in sorted(set(fold_of)) if (wanted is None or f in wanted) and fold_done(cfg, int(f))]


def collect_oof(cfg: Config, index: pd.DataFrame, folds: pd.DataFrame, classes: list[str],
                name: str = "oof") -> tuple[pd.DataFrame, np.ndarray]:
    """Stitch the held-out probabilities (``oof`` or ``oof_tta``) of every fold that counts
    (:func:`counted_folds`) into one table aligned with the train index; rows of other folds are NaN."""
    probs = np.full((len(index), len(classes)), np.nan, dtype=np.float32)
    fold_of = folds["fold"].to_numpy()
    run = RunDir.of(cfg)
    for fold in counted_folds(cfg, fold_of):
        path = run.model(fold).predictions(name)
        if path.is_file():
            probs[fold_of == fold] = np.load(path)
    frame = pd.DataFrame(probs, columns=classes)
    frame.insert(0, "fold", fold_of)
    frame.insert(0, "label", index["label"].to_numpy())
    frame.insert(0, "id", index["id"].to_numpy())
    return frame, probs
