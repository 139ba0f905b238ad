"""Shared fixtures: a tiny generated competition and configs that write only into tmp_path."""
from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.training.fold import FoldRun
from pipeline.training.mode import FoldData

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"

# the browsers scripts/eda_screenshot.sh opens a page in; .ci/run installs Chromium where none is on PATH
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
needs_browser = pytest.mark.skipif(
    not any(shutil.which(name) for name in BROWSERS),
    reason="no Chromium on PATH (chromium, chromium-browser or google-chrome): .ci/run installs it, or "
           "apt-get install chromium")

CLASSES = ("hstripes", "vstripes", "blob")


def pattern(label: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A uint8 HxWx3 image whose structure depends on the class (so a small CNN can tell them apart)."""
    yy, xx = np.mgrid[0:size, 0:size]
    period = int(rng.integers(4, 7))
    phase = int(rng.integers(0, period))
    if label == "hstripes":
        mask = ((yy + phase) // (period // 2)) % 2 == 0
    elif label == "vstripes":
        mask = ((xx + phase) // (period // 2)) % 2 == 0
    else:  # a bright disc somewhere near the centre
        cy, cx = rng.integers(size // 3, 2 * size // 3, size=2)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= (size // 4) ** 2
    colour = rng.integers(150, 256, size=3)
    image = np.where(mask[..., None], colour, rng.integers(0, 60, size=3)).astype(np.float64)
    image += rng.normal(0, 8, size=image.shape)
    return image.clip(0, 255).astype(np.uint8)


def make_competition(root: Path, n_per_class: int = 12, n_test: int = 6, classes: Sequence[str] = CLASSES,
                     seed: int = 0, ext: str = ".png", groups: bool = False) -> Path:
    """Write a Kaggle-style CSV competition into ``root``: train.csv (id,label[,patient]), train/<id>.png,
    test/<id>.png and sample_submission.csv (id,label). Ids are zero-padded strings ("0007").
    Returns ``root``; the true test labels are written to ``root/solution.csv``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "test").mkdir(parents=True, exist_ok=True)
    rows, next_id = [], 0
    for c, label in enumerate(classes):
        for k in range(n_per_class):
            image_id = f"{next_id:04d}"
            next_id += 1
            Image.fromarray(pattern(label, rng)).save(root / "train" / f"{image_id}{ext}")
            row = {"id": image_id, "label": label}
            if groups:
                row["patient"] = f"p{c}_{k // 2}"  # two images per patient, patients within one class
            rows.append(row)
    order = rng.permutation(len(rows))  # train.csv rows are not sorted by class
    pd.DataFrame([rows[i] for i in order]).to_csv(root / "train.csv", index=False)
    test_rows = []
    for k in range(n_test):
        image_id = f"{next_id:04d}"
        next_id += 1
        label = classes[k % len(classes)]
        Image.fromarray(pattern(label, rng)).save(root / "test" / f"{image_id}{ext}")
        test_rows.append({"id": image_id, "label": label})
    solution = pd.DataFrame(test_rows)
    solution.to_csv(root / "solution.csv", index=False)
    solution.assign(label=classes[0]).to_csv(root / "sample_submission.csv", index=False)
    return root


def config_overrides(tmp_path: Path, root: Optional[Path], *overrides: str) -> list[str]:
    """Overrides that keep every output under tmp_path and make training tiny and fast."""
    tmp_path = Path(tmp_path)
    base = [
        f"runs_dir={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"submit.dir={tmp_path / 'submissions'}",
        f"eda.out_dir={tmp_path / 'reports'}",
        "data.image_size=16",
        "folds.n_splits=3",
        "model.name=airnet_tiny",
        "train.epochs=1",
        "train.batch_size=8",
        "train.device=cpu",
        "train.precision=fp32",
        "infer.batch_size=64",
    ]
    if root is not None:
        base.insert(0, f"data.root={root}")
    return base + list(overrides)


def make_cfg(tmp_path: Path, root: Optional[Path], *overrides: str):
    """A Config from configs/default.yaml whose outputs (runs, cache, submissions, reports) are in tmp_path."""
    from pipeline.core.config import load_config

    return load_config(DEFAULT_CONFIG, config_overrides(tmp_path, root, *overrides))


def stage_argv(tmp_path: Path, root: Optional[Path], *overrides: str) -> list[str]:
    """Command-line arguments for a stage's ``main``: the default config plus the same overrides."""
    argv = ["--config", str(DEFAULT_CONFIG)]
    for text in config_overrides(tmp_path, root, *overrides):
        argv += ["--set", text]
    return argv


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    """Tests run from the repository root (relative defaults such as configs/ resolve there)."""
    monkeypatch.chdir(REPO)


@pytest.fixture
def competition(tmp_path) -> Path:
    """A fresh tiny competition (3 classes x 12 train images, 6 test images) in tmp_path/comp."""
    return make_competition(tmp_path / "comp")


@pytest.fixture(scope="session")
def shared_competition(tmp_path_factory) -> Path:
    """The same tiny competition, built once per session (read-only for tests)."""
    return make_competition(tmp_path_factory.mktemp("shared") / "comp")



@pytest.fixture
def tiny_weights(tmp_path) -> Path:
    """Weights of timm's tiny ``test_efficientnet`` as a local safetensors file (a pretrained start, offline)."""
    import timm
    from safetensors.torch import save_file

    path = tmp_path / "test_efficientnet.safetensors"
    save_file(timm.create_model("test_efficientnet").state_dict(), str(path))
    return path


def chain(cfg):
    """preprocess, folds, train and infer of ``cfg``; the train stage's report."""
    from pipeline import folds, infer, preprocess, train

    preprocess.run(cfg)
    folds.run(cfg)
    report = train.run(cfg)
    infer.run(cfg)
    return report


def trained_run(tmp: Path, *overrides: str):
    """A tiny competition preprocessed, split, trained and predicted once; returns (root, cfg)."""
    from pipeline import folds, infer, preprocess, train

    root = make_competition(tmp / "comp")
    cfg = make_cfg(tmp, root, *overrides)
    for stage in (preprocess, folds, train, infer):
        stage.run(cfg)
    return root, cfg


class KeepEpochOne(FoldRun):
    """A fold run that keeps a copy of its checkpoint after the first epoch."""

    def checkpoint(self, probs, metrics, improved):
        super().checkpoint(probs, metrics, improved)
        if self.epoch == 1:
            shutil.copy(self.dir.root / "last_state.pt", self.dir.root / "epoch1_state.pt")


def fold_run(cfg, fold: int = 0) -> FoldRun:
    """Preprocess and split ``cfg``'s competition, then build (not train) the FoldRun of ``fold`` on the CPU."""
    import torch

    from pipeline import folds, preprocess
    from pipeline.rundir import load_split

    manifest = preprocess.run(cfg)
    folds.run(cfg)
    images, index = load_split(cfg.run_dir, "train", manifest)
    table = pd.read_csv(cfg.run_dir / "folds.csv", dtype={"id": str, "label": str})
    return FoldRun(FoldData(cfg, manifest, images, index, table, torch.device("cpu")), fold)


@contextlib.contextmanager
def locked_elsewhere(run_dir: Path, what: str) -> Iterator[int]:
    """``run_dir``'s lock held by another process (its pid) while the block runs, as a concurrent stage holds it."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from pipeline.rundir import run_lock\n"
        f"with run_lock({str(run_dir)!r}, {what!r}):\n    print('held', flush=True); time.sleep(60)")],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()
