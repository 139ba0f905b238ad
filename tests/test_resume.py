"""Exact resume: a fold killed with SIGKILL mid-epoch and resumed gives bit-identical OOF predictions."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from pipeline.training import checkpoints
from pipeline.training.mode import FoldData
from pipeline.training.fold import FoldRun
from pipeline import folds, preprocess, train
from pipeline.rundir import load_split

from conftest import REPO, KeepEpochOne, config_overrides, make_cfg

# randaugment (lazily created, seeded op variants), mixup + cutmix (the mixer's generator), dropout (torch's
# global stream), shuffling (the loader's generator); "last" makes the OOF the final epoch's
OVERRIDES = ["augment.policy=randaugment", "augment.mixup_alpha=0.4", "augment.cutmix_alpha=1.0",
             "model.drop_rate=0.3", "train.epochs=3", "train.folds=[0]", "train.threads=1", "train.monitor=last",
             "train.warmup_epochs=1"]
STEPS_PER_EPOCH = 24 // 8  # fold 0 trains on 24 of the 36 images, in batches of 8

# the train stage in a subprocess; the optimisation step number KILL_AT creates MARKER and waits to be killed
SCRIPT = """
import os, sys, time
from pathlib import Path
from pipeline.training.step import TrainStep
from pipeline import train
from pipeline.core.config import load_config

kill_at, marker = int(os.environ["KILL_AT"]), os.environ["MARKER"]
original, calls = TrainStep.__call__, [0]

def step(self, *args, **kwargs):
    out = original(self, *args, **kwargs)
    calls[0] += 1
    if calls[0] == kill_at:
        Path(marker).write_text(str(os.getpid()))
        time.sleep(600)
    return out

TrainStep.__call__ = step
train.run(load_config(sys.argv[1], sys.argv[2:]))
"""


@pytest.fixture
def prepared(tmp_path, competition):
    cfg = make_cfg(tmp_path, competition, *OVERRIDES)
    preprocess.run(cfg)
    folds.run(cfg)
    threads = torch.get_num_threads()
    yield cfg
    torch.set_num_threads(threads)  # train.threads=1 applies to this process too


def kill_mid_epoch(cfg, tmp_path, kill_at: int) -> None:
    """Run the train stage in a subprocess and SIGKILL it right after optimisation step ``kill_at``."""
    marker = tmp_path / "killed-here"
    args = [str(REPO / "configs" / "default.yaml"), *config_overrides(tmp_path, cfg.data.root, *OVERRIDES)]
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "KILL_AT": str(kill_at), "MARKER": str(marker)})
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "the subprocess never reached the step"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(prepared, tmp_path, caplog):
    cfg = prepared
    fold_dir = cfg.run_dir / "fold0"
    train.run(cfg)  # never interrupted
    reference = {name: (fold_dir / name).read_bytes() for name in ("oof.npy", "best.safetensors")}
    shutil.rmtree(fold_dir)

    kill_mid_epoch(cfg, tmp_path, kill_at=STEPS_PER_EPOCH + 2)  # epoch 2, after its second step
    assert (fold_dir / "last_state.pt").is_file() and not (fold_dir / "result.json").exists()
    assert checkpoints.load_state(fold_dir / "last_state.pt")["epoch"] == 1

    with caplog.at_level("INFO", logger="pipeline"):
        train.run(cfg)
    assert "resuming after epoch 1 (keeping the last epoch)" in caplog.text  # train.monitor=last
    for name, data in reference.items():
        assert (fold_dir / name).read_bytes() == data, f"{name} differs after kill + resume"


def check_streams(cfg, streams) -> None:
    """Train fold 0, then resume its epoch-1 checkpoint with each of ``streams`` replaced by a fresh one (and
    once with none replaced): only the untouched checkpoint reproduces the OOF, so every stream is needed."""
    manifest = preprocess.run(cfg)
    images, index = load_split(cfg.run_dir, "train", manifest)
    split = folds.run(cfg)
    torch.set_num_threads(1)
    fold = lambda cls=FoldRun: cls(FoldData(cfg, manifest, images, index, split, torch.device("cpu")), 0)  # noqa: E731
    run = fold(KeepEpochOne)
    run.fit()
    reference = np.load(run.dir.root / "oof.npy")
    saved = checkpoints.load_state(run.dir.root / "epoch1_state.pt")
    fresh = fold().random_state()
    for stream in (None, *streams):
        state = {**saved, "rng": {**saved["rng"], **({stream: fresh[stream]} if stream else {})}}
        checkpoints.save_state(run.dir.root / "last_state.pt", state)
        (run.dir.root / "result.json").unlink()
        fold().fit()
        same = np.array_equal(np.load(run.dir.root / "oof.npy"), reference)
        assert same == (stream is None), f"stream {stream}: {'same' if same else 'different'} OOF"


def test_each_random_stream_is_needed(prepared):
    """Resuming epoch 1's checkpoint reproduces the run; with any one stream fresh instead, the OOF changes."""
    check_streams(prepared, ("global", "loader", "policy", "mixer"))


def test_the_train_stage_removes_what_a_killed_write_left_and_nothing_else(tmp_path, competition, caplog):
    """A checkpoint write killed halfway leaves atomic_path's temporary beside the checkpoint: the next train
    run of that model folder deletes it (and only it) and says so."""
    cfg = make_cfg(tmp_path, competition, "train.folds=[0]")
    preprocess.run(cfg)
    folds.run(cfg)
    fold_dir = cfg.run_dir / "fold0"
    fold_dir.mkdir(parents=True)
    stray = [".last_state.pt.k2j_9x0a.pt", ".best.safetensors.abcd1234.safetensors", ".oof.npy.zzzzzzzz.npy"]
    kept = ["notes.txt", ".hidden", "last_state.pt.bak", ".best.json.abcd1234.pt"]
    for name in stray + kept:
        (fold_dir / name).write_bytes(b"half a file")
    with caplog.at_level("INFO", logger="pipeline"):
        train.run(cfg)
    assert not any((fold_dir / name).exists() for name in stray)
    assert all((fold_dir / name).read_bytes() == b"half a file" for name in kept)
    assert (fold_dir / "result.json").is_file()
    assert "fold 0: removed 3 unfinished write(s) of an interrupted run" in caplog.text
