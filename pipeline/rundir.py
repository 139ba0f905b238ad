"""Who may write a run folder, and what else is training on this machine.

* :func:`claim` (every stage's command line takes it): an exclusive ``flock`` on ``runs/<experiment>/.lock``,
  so a second process on the same run folder refuses at once instead of both writing; and the folder's data
  stamp (``data.json``: the competition folder preprocess cached into it), so a run folder never mixes two
  datasets.
* :func:`training_slot`: training processes announce themselves in a per-user folder under the temp dir
  (one locked file each; the kernel drops the lock when a process dies, even by SIGKILL), so a new one can
  warn that another is training and default its thread count to its share of the cores.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

from pipeline.core.config import Config, ConfigError
from pipeline.core.utils import read_json, write_json

log = logging.getLogger(__name__)

STAMP = "data.json"


class RunBusy(RuntimeError):
    """Another process holds the run folder."""


def _try_lock(path: Path, info: dict) -> Optional[int]:
    """An open descriptor holding an exclusive lock on ``path`` (``info`` written into it), or None if held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    return fd


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def run_lock(run_dir: Path, what: str) -> Iterator[None]:
    """Hold ``run_dir/.lock`` while ``what`` runs; raise :class:`RunBusy` naming the holder if it is taken."""
    path = Path(run_dir) / ".lock"
    fd = _try_lock(path, {"pid": os.getpid(), "stage": what, "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    if fd is None:
        held = _holder(path)
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
    run_dir, root = cfg.run_dir, data_identity(cfg)
    stamp = run_dir / STAMP
    try:
        previous = read_json(stamp).get("root") if stamp.is_file() else None
    except (OSError, ValueError, AttributeError):
        previous = None  # damaged: stamped again below
    if previous and previous != root:
        raise ConfigError(f"{run_dir} holds results made from {previous}, not from data.root={cfg.data.root}: "
                          f"a run folder never mixes two datasets. Use --set experiment={suggested_experiment(cfg)} "
                          "(or remove the folder to start over)")
    if stamp_it and previous != root:
        write_json(stamp, {"root": root})


@contextlib.contextmanager
def claim(cfg: Config, what: str, exclusive: bool = True) -> Iterator[None]:
    """The run folder for one stage: checked to hold this data and (``exclusive``) locked against other
    processes. Under torchrun only rank 0 locks it: the other ranks are the same stage (pipeline.training.distributed)."""
    exclusive = exclusive and int(os.environ.get("RANK", "0")) == 0
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(cfg.run_dir, what) if exclusive else contextlib.nullcontext():
        check_data(cfg)
        yield


# --------------------------------------------------------------------------- training on this machine


def jobs_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"pipeline-jobs-{os.getuid()}"


def other_training() -> list[dict]:
    """The pipeline training processes alive on this machine, other than this one (stale files are removed)."""
    alive = []
    folder = jobs_dir()
    for path in sorted(folder.glob("*.lock")) if folder.is_dir() else []:
        if path.stem == str(os.getpid()):
            continue
        fd = _try_lock(path, {})
        if fd is None:
            alive.append(_holder(path))
        else:  # nobody holds it: the process is gone
            path.unlink(missing_ok=True)
            os.close(fd)
    return alive


def usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def training_slot(cfg: Config, what: str = "train") -> Iterator[int]:
    """Announce a training process for its lifetime; yield its thread count.

    ``train.threads`` when set, else the usable cores divided among the pipeline processes training now
    (two jobs each using every core slow each other 4-15x on 2 cores). Warns when another one is training."""
    others = other_training()
    threads = cfg.train.threads or max(1, usable_cpus() // (1 + len(others)))
    if others:
        names = "; ".join(f"pid {o.get('pid', '?')}: {o.get('what', '?')} {o.get('run', '?')}" for o in others)
        log.warning("%d other pipeline process(es) training on this machine (%s): they share %d core(s) and "
                    "slow each other; this one uses %d thread(s) (train.threads). Wait for them for full speed.",
                    len(others), names, usable_cpus(), threads)
    fd = _try_lock(jobs_dir() / f"{os.getpid()}.lock", {"pid": os.getpid(), "what": what, "run": str(cfg.run_dir)})
    try:
        yield threads
    finally:
        if fd is not None:
            (jobs_dir() / f"{os.getpid()}.lock").unlink(missing_ok=True)
            os.close(fd)
