"""Provenance of a run folder's models: what a fold was trained with (the training fingerprint, the split's and
the pixels' digests, a distillation teacher's table), whether it is still up to date (:func:`fold_done`), the
folds that count (:func:`counted_folds`) and their stitched out-of-fold table (:func:`collect_oof`). The paths
themselves are :mod:`pipeline.rundir`'s."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import yaml

from pipeline.core.config import Config, to_dict
from pipeline.core.utils import read_json
from pipeline.models.arch import load_spec
from pipeline.models.weights import start_digest
from pipeline.rundir import RunDir, file_sha1, run_oof

log = logging.getLogger(__name__)
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
