"""torchrun: two CPU processes (gloo) share the folds of the train stage and rank 0 collects a valid OOF."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd

from pipeline.training import distributed
from pipeline import folds, preprocess, train

from conftest import DEFAULT_CONFIG, REPO, config_overrides, make_cfg


def test_share_splits_folds_round_robin(monkeypatch):
    assert distributed.share([0, 1, 2, 3, 4]) == [0, 1, 2, 3, 4]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert distributed.share([0, 1, 2, 3, 4]) == [1, 3]


def test_torchrun_two_processes_train_every_fold(tmp_path, competition):
    """Rank 0 trains folds 0 and 2, rank 1 fold 1; rank 0's OOF is what one process gives."""
    overrides = config_overrides(tmp_path, competition, "train.threads=1", "train.epochs=2")
    cfg = make_cfg(tmp_path, competition, "train.threads=1", "train.epochs=2")
    preprocess.run(cfg)
    folds.run(cfg)
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "pipeline.train", "--config", str(DEFAULT_CONFIG)] + [a for o in overrides for a in ("--set", o)]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all((cfg.run_dir / f"fold{fold}" / "result.json").is_file() for fold in range(3))
    assert "folds [0, 2]" in proc.stderr and "folds [1]" in proc.stderr  # each rank's share, logged
    oof = pd.read_csv(cfg.run_dir / "oof.csv")
    probs = oof[[c for c in oof.columns if c not in ("id", "label", "fold")]].to_numpy()
    assert np.isfinite(probs).all() and np.allclose(probs.sum(1), 1, atol=1e-4)
    report = json.loads((cfg.run_dir / "cv.json").read_text())
    assert report["scored_rows"] == report["total_rows"] == len(oof)
    single = make_cfg(tmp_path, competition, "train.threads=1", "train.epochs=2", "experiment=single")
    for stage in (preprocess, folds, train):
        stage.run(single)
    expected = pd.read_csv(single.run_dir / "oof.csv")[oof.columns[3:]].to_numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-6)  # the same folds as one process trains them
