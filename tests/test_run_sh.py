"""``./run.sh full A.yaml B.yaml``: every member's stages, then one ensemble and one submission (tiny competition)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import train
from pipeline.utils import read_json

from conftest import DEFAULT_CONFIG, REPO, config_overrides, stage_argv


def run_sh(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """run.sh with a stand-in venv around this interpreter (so it installs nothing)."""
    venv = tmp_path / "venv"
    if not venv.exists():
        (venv / "bin").mkdir(parents=True)
        python = venv / "bin" / "python"
        python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        python.chmod(0o755)
        (venv / ".installed").touch()
    env = {**os.environ, "VENV": str(venv)}
    return subprocess.run([str(REPO / "run.sh"), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


def member_config(tmp_path: Path, name: str, **train_values) -> Path:
    values = yaml.safe_load(DEFAULT_CONFIG.read_text())
    values["experiment"] = name
    values["train"].update(train_values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.slow
def test_full_with_several_configs_trains_every_member_and_ensembles_them(tmp_path, shared_competition):
    sets = [a for text in config_overrides(tmp_path, shared_competition, "ensemble.method=hill_climb", "folds.n_splits=2",
                                           "infer.tta=[identity]") for a in ("--set", text)]
    a, b = member_config(tmp_path, "mem_a"), member_config(tmp_path, "mem_b", optimizer="adamw", lr=0.01)
    done = run_sh(tmp_path, "full", str(a), str(b), *sets)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("submission: ") and Path(last.split(": ", 1)[1]).is_file()
    runs = tmp_path / "runs"
    for member in ("mem_a", "mem_b"):
        assert (runs / member / "cv.json").is_file() and len(list((runs / member).glob("fold*/test.npy"))) == 2
    report = read_json(runs / "mem_a" / "ensemble.json")
    assert report["method"] == "hill_climb" and report["members"] == [str(runs / "mem_a"), str(runs / "mem_b")]
    assert set(report["oof_members"]) == {"mem_a", "mem_b"} and report["oof_scoring"] == "nested over folds"
    assert (runs / "mem_a" / "folds.csv").read_text() == (runs / "mem_b" / "folds.csv").read_text()
    page = (tmp_path / "reports" / "mem_a" / "results" / "index.html").read_text()  # the ensemble's results page
    assert "ensemble_oof.csv" in page and "mem_b" in page and "nested over folds" in page
    assert "== eda" in done.stderr and not (tmp_path / "reports" / "mem_b").exists()  # one EDA: the data is shared
    # every member is already trained: the train stage skips them all
    weights = {p.stat().st_mtime_ns for p in (runs / "mem_b").glob("fold*/best.safetensors")}
    argv = stage_argv(tmp_path, shared_competition, "experiment=mem_b", "folds.n_splits=2")
    argv[1] = str(b)
    assert train.main(argv) == 0
    assert {p.stat().st_mtime_ns for p in (runs / "mem_b").glob("fold*/best.safetensors")} == weights


def test_several_configs_must_not_share_a_run_folder(tmp_path):
    a, b = member_config(tmp_path, "mem_a"), member_config(tmp_path, "mem_b")
    done = run_sh(tmp_path, "full", str(a), str(b), "--set", "experiment=same", "--set", f"runs_dir={tmp_path}")
    assert done.returncode == 1 and "share run folders" in done.stderr
    assert run_sh(tmp_path, "train", str(a), str(b)).returncode == 2
