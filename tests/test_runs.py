"""Two jobs on one machine: a second training process warns, names the first and takes its share of cores."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile

from pipeline.core import jobs
from pipeline.core.config import from_dict

from conftest import REPO

HOLD = """
import time
from pipeline.core import jobs
from pipeline.core.config import from_dict
with jobs.training_slot(from_dict({"experiment": "other"}), "train"):
    print("ready", flush=True)
    time.sleep(120)
"""


def test_second_training_process_warns_and_shares_the_cores(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this test's own job folder
    proc = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "ready"
        with caplog.at_level(logging.WARNING, logger="pipeline"), jobs.training_slot(from_dict({})) as threads:
            assert threads == max(1, jobs.usable_cpus() // 2)
        assert f"pid {proc.pid}: train runs/other" in caplog.text and "slow each other" in caplog.text
    finally:
        proc.kill()
        proc.wait()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline"), jobs.training_slot(from_dict({})) as threads:
        assert threads == jobs.usable_cpus()  # the other one died (SIGKILL): its lock went with it
    assert "other pipeline" not in caplog.text
    assert list(jobs.jobs_dir().glob("*.lock")) == []
    with jobs.training_slot(from_dict({}, ["train.threads=3"])) as threads:
        assert threads == 3  # an explicit setting wins
