"""Two jobs on one machine: a second training process warns and names the first, and every run computes with
the thread count it recorded once, whatever else runs."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile

import torch

from pipeline import folds, infer, preprocess, train
from pipeline.core import jobs
from pipeline.core.config import from_dict
from pipeline.core.utils import read_json
from pipeline.rundir import RunDir

from conftest import REPO, make_cfg, make_competition

HOLD = """
import time
from pipeline.core import jobs
from pipeline.core.config import from_dict
with jobs.training_slot(from_dict({"experiment": "other"}), "train"):
    print("ready", flush=True)
    time.sleep(120)
"""


def test_second_training_process_warns_and_keeps_its_thread_count(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this test's own job folder
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    proc = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO)})
    cfg = from_dict({"runs_dir": str(tmp_path / "runs")})
    try:
        assert proc.stdout.readline().strip() == "ready"
        with caplog.at_level(logging.WARNING, logger="pipeline"), jobs.training_slot(cfg) as threads:
            assert threads == jobs.usable_cpus()  # not a share that depends on the other job
        assert f"pid {proc.pid}: train runs/other" in caplog.text and "slow each other" in caplog.text
        assert f"keeps its run's {threads} thread(s), so its results do not change" in caplog.text
    finally:
        proc.kill()
        proc.wait()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline"), jobs.training_slot(cfg) as threads:
        assert threads == jobs.usable_cpus()  # the other one died (SIGKILL): its lock went with it
    assert "other pipeline" not in caplog.text
    assert list(jobs.jobs_dir().glob("*.lock")) == []
    with jobs.training_slot(from_dict({}, ["train.threads=3"])) as threads:
        assert threads == 3  # an explicit setting wins


def test_a_run_records_its_thread_count_once_and_every_later_stage_uses_it(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(jobs.usable_cpus() + 1))  # a launch with more processes than cores
    root = make_competition(tmp_path / "comp")
    cfg = make_cfg(tmp_path, root)
    path = RunDir.of(cfg).threads
    with jobs.training_slot(cfg) as threads:
        assert threads == 1
    assert read_json(path) == {"threads": 1, "usable_cpus": jobs.usable_cpus(), "launch_share": jobs.usable_cpus() + 1}
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # the same run resumed as one process: still its recorded count
    preprocess.run(cfg)
    folds.run(cfg)
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="pipeline"):
            train.run(cfg)
            assert torch.get_num_threads() == 1
            infer.run(cfg)
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert "on cpu (1 threads)" in caplog.text and read_json(path)["threads"] == 1
    path.write_text("{ damaged")
    with caplog.at_level(logging.WARNING, logger="pipeline"), jobs.training_slot(cfg) as threads:
        assert threads == jobs.usable_cpus() and read_json(path)["threads"] == threads
    assert f"{path} is damaged: recording this run's thread count again" in caplog.text
