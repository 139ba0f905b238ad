"""What else is training on this machine: training processes announce themselves in a per-user folder under the
temp dir (one locked file each; the kernel drops the lock when a process dies, even by SIGKILL), so a new one can
warn that another is training and default its thread count to its share of the cores."""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator

from pipeline.core.config import Config
from pipeline.core.utils import holder, try_lock

log = logging.getLogger(__name__)



def jobs_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"pipeline-jobs-{os.getuid()}"


def other_training() -> list[dict]:
    """The pipeline training processes alive on this machine, other than this one (stale files are removed)."""
    alive = []
    folder = jobs_dir()
    for path in sorted(folder.glob("*.lock")) if folder.is_dir() else []:
        if path.stem == str(os.getpid()):
            continue
        fd = try_lock(path, {})
        if fd is None:
            alive.append(holder(path))
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
    fd = try_lock(jobs_dir() / f"{os.getpid()}.lock", {"pid": os.getpid(), "what": what, "run": str(cfg.run_dir)})
    try:
        yield threads
    finally:
        if fd is not None:
            (jobs_dir() / f"{os.getpid()}.lock").unlink(missing_ok=True)
            os.close(fd)
