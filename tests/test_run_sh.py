"""./run.sh through a subprocess on a tiny competition, with the existing virtual environment (VENV): one config,
and several (every member's stages, then one ensemble and one submission)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import rundir
from pipeline import train
from pipeline.core.utils import read_json

from conftest import DEFAULT_CONFIG, REPO, config_overrides, make_competition, stage_argv


def venv(tmp_path: Path) -> Path:
    """A VENV for run.sh whose python is this one, marked installed so that setup installs nothing."""
    folder = tmp_path / "venv"
    (folder / "bin").mkdir(parents=True)
    python = folder / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    (folder / ".installed").touch()
    os.utime(folder / ".installed", (os.stat(REPO / "setup.cfg").st_mtime + 10,) * 2)
    return folder


def run_sh(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    folder = tmp_path / "venv" if (tmp_path / "venv").is_dir() else venv(tmp_path)
    env = {**os.environ, "VENV": str(folder), "PYTHONPATH": str(REPO)}
    return subprocess.run(["bash", str(REPO / "run.sh"), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def config_file(tmp_path: Path, root: Path, experiment: str) -> tuple[Path, list[str]]:
    """A CONFIG file naming the experiment and data, and --set arguments for everything else."""
    path = tmp_path / f"{experiment}.yaml"
    path.write_text(yaml.safe_dump({"experiment": experiment, "data": {"root": str(root)}}))
    sets = [a for text in config_overrides(tmp_path, None, "infer.tta=[identity]", "train.epochs=1")
            for a in ("--set", text)]
    return path, sets


@pytest.mark.slow
def test_full_ends_with_the_submission_path(tmp_path):
    root = make_competition(tmp_path / "comp")
    config, sets = config_file(tmp_path, root, "cli")
    demo_before = (REPO / "data" / "demo").is_dir()
    done = run_sh(tmp_path, "full", str(config), *sets)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("submission: ")
    path = Path(last.split(": ", 1)[1])
    assert path.is_file() and path.parent == tmp_path / "submissions" and path.name.startswith("cli-")
    run_dir = tmp_path / "runs" / "cli"  # experiment from CONFIG, runs_dir from --set
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["root"] == str(root) and saved["train"]["epochs"] == 1 and saved["folds"]["n_splits"] == 3
    assert (REPO / "data" / "demo").is_dir() == demo_before  # pointed at other data: no demo built
    assert "demo competition written" not in done.stderr


@pytest.mark.slow
def test_a_failing_stage_exits_non_zero_with_its_error_and_no_traceback(tmp_path):
    root = make_competition(tmp_path / "comp")
    (root / "train" / "0004.png").write_bytes(b"not an image")
    config, sets = config_file(tmp_path, root, "broken")
    done = run_sh(tmp_path, "full", str(config), *sets)
    assert done.returncode == 1
    assert "0004.png: unreadable image" in done.stderr and "stage 'preprocess' failed" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert "submission:" not in done.stdout


def test_unknown_command_exits_2(tmp_path):
    done = run_sh(tmp_path, "frobnicate")
    assert done.returncode == 2 and "unknown command 'frobnicate'" in done.stderr


@pytest.mark.slow
def test_a_stage_without_config_and_a_busy_run_folder(tmp_path):
    """``--set`` first (no CONFIG) reaches the stage as overrides; the run folder's lock refuses a 2nd process."""
    root = make_competition(tmp_path / "comp")
    sets = [a for text in config_overrides(tmp_path, root, "experiment=busy") for a in ("--set", text)]
    with rundir.run_lock(tmp_path / "runs" / "busy", "train"):
        done = run_sh(tmp_path, "preprocess", *sets)
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"{tmp_path / 'runs' / 'busy'} is in use by another pipeline process (pid {os.getpid()}, train" in done.stderr
    assert "Traceback" not in done.stderr


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
