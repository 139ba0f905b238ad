"""Search storages: workers joining a fresh storage together, one worker per SQLite file, the journal's missing
heartbeat, and a storage password that is never written down."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time

import optuna
import pytest

from pipeline.core.config import with_values
from pipeline.search import report
from pipeline.search import storage as stores
from pipeline.search import study as search

from conftest import DEFAULT_CONFIG, REPO, config_overrides, make_cfg, stage_argv
from test_search import SMALL, search_cfg, worker

# a worker that opens the study of each storage in argv at the moment the test says "go" (a file appears)
OPEN_TOGETHER = """
import os, sys
from pathlib import Path
from pipeline.core.config import load_config, with_values
from pipeline.search import storage as stores

signals, storages, cfg = Path(sys.argv[1]), sys.argv[2].split(","), load_config(sys.argv[3], sys.argv[4:])
for r, storage in enumerate(storages):
    (signals / f"ready{r}-{os.getpid()}").touch()
    while not (signals / f"go{r}").exists():
        pass  # spin: every worker leaves at the same instant
    study = stores.open_study(with_values(cfg, {"search.storage": storage}))
    print("joined", r, study.study_name, flush=True)
"""
WORKERS = 4
FINISHED = ("COMPLETE", "PRUNED")
SECRET = "s3cret-pw"


def test_workers_opening_a_fresh_storage_together_all_join(tmp_path):
    """Several workers create Optuna's tables and the study on fresh storages at the same instant: the ones that
    lose the race open them again, and every worker joins the one study."""
    storages = [f"sqlite:///{tmp_path / f'fresh{r}.db'}" for r in range(3)] + [str(tmp_path / "fresh.log")]
    signals = tmp_path / "signals"
    signals.mkdir()
    argv = [sys.executable, "-c", OPEN_TOGETHER, str(signals), ",".join(storages), str(DEFAULT_CONFIG),
            *config_overrides(tmp_path, None, "experiment=together")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(WORKERS)]
    try:
        for r in range(len(storages)):
            deadline = time.time() + 120
            while len(list(signals.glob(f"ready{r}-*"))) < WORKERS and all(p.poll() is None for p in procs):
                assert time.time() < deadline, "the workers never got ready"
                time.sleep(0.05)
            (signals / f"go{r}").touch()
        logs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    assert all(text.count("joined") == len(storages) for text in logs), logs
    cfg = make_cfg(tmp_path, None, "experiment=together")
    for storage in storages:
        assert optuna.get_all_study_names(stores.build_storage(with_values(cfg, {"search.storage": storage}))) \
            == ["together"]


@pytest.mark.slow
def test_two_workers_on_a_fresh_sqlite_or_journal_storage_both_finish(tmp_path, shared_competition):
    """Two search workers started together on a new SQLite file, two on a new journal file: all four exit 0 and
    each study holds every trial its workers ran, finished (none left RUNNING or FAILED)."""
    runs = {"sqlite": ("experiment=sq",), "journal": ("experiment=jn", f"search.storage={tmp_path / 'jn.log'}")}
    cfgs = {name: search_cfg(tmp_path, shared_competition, *overrides) for name, overrides in runs.items()}
    procs = {name: [worker(tmp_path, shared_competition, *overrides, "search.n_trials=3", f"search.worker={w}")
                    for w in range(2)] for name, overrides in runs.items()}
    logs = {name: [p.communicate(timeout=240)[0] for p in pair] for name, pair in procs.items()}
    for name, cfg in cfgs.items():
        assert all(p.returncode == 0 for p in procs[name]) and "Traceback" not in "".join(logs[name]), logs[name]
        trials = optuna.load_study(study_name=cfg.experiment, storage=stores.build_storage(cfg)).trials
        assert 3 <= len(trials) <= 4 and all(t.state.name in FINISHED for t in trials), (name, trials)
        ran = {int(n) for text in logs[name] for n in re.findall(r"trial (\d+) (?:complete|pruned)", text)}
        assert ran == {t.number for t in trials}, name


def test_a_second_worker_on_one_sqlite_file_is_warned(tmp_path, shared_competition, caplog):
    cfg = search_cfg(tmp_path, shared_competition, "search.n_trials=1")
    caplog.set_level(logging.INFO)
    with stores.sqlite_worker(cfg):  # another worker searching on the same file
        search.run(cfg)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "SQLite" in r.getMessage()]
    assert len(warned) == 1 and f"pid {os.getpid()}" in warned[0] and "SQLite is for one worker" in warned[0]
    caplog.clear()
    search.run(with_values(cfg, {"search.n_trials": 2}))  # alone on the file: no warning
    assert not any("SQLite is for one worker" in r.getMessage() for r in caplog.records)


def test_a_journal_storage_warns_that_it_has_no_heartbeat(tmp_path, caplog):
    cfg = make_cfg(tmp_path, None, f"search.storage={tmp_path / 'study.log'}", "search.heartbeat=30")
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        stores.build_storage(cfg)
    assert "has no heartbeat" in caplog.text and "never retried" in caplog.text


def test_a_storage_password_is_masked_in_every_file_and_message(tmp_path, shared_competition, capsys, caplog):
    """A PostgreSQL URL with its password: the run's config.yaml, search/config.yaml, best/*.yaml and the error
    (here: no driver, or no server) show ``***`` instead."""
    url = f"postgresql+psycopg2://searcher:{SECRET}@127.0.0.1:1/study"
    cfg = search_cfg(tmp_path, shared_competition, f"search.storage={url}", "search.n_trials=1")
    local = with_values(cfg, {"search.storage": None})
    search.run(local)  # a finished study, to write outputs from with the URL's config below
    caplog.set_level(logging.INFO)
    assert search.main(stage_argv(tmp_path, shared_competition, *SMALL, f"search.storage={url}")) == 1
    err = capsys.readouterr().err
    (line,) = [text for text in err.splitlines() if text.startswith("error:")]
    assert "searcher:***@127.0.0.1" in line and "Traceback" not in err
    study = optuna.load_study(study_name=cfg.experiment, storage=stores.build_storage(local))
    report.write_outputs(study, cfg, [])
    written = [cfg.run_dir / "config.yaml", cfg.run_dir / "search" / "config.yaml",
               *(cfg.run_dir / "search" / "best").glob("*.yaml")]
    assert len(written) > 2 and all(path.is_file() for path in written)
    for path in written:
        assert SECRET not in path.read_text(), path
    assert "searcher:***@" in (cfg.run_dir / "search" / "config.yaml").read_text()
    assert SECRET not in err + caplog.text
