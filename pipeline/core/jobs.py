"""How many threads a run computes with, and what else is training on this machine.

``train.threads: 0`` fixes the count once per run: this machine's usable cores (shared among the processes of a
torchrun launch), recorded in the run folder (``threads.json``) by the first stage that computes, and used by
every later stage, resumed or re-run fold of that run. The count changes how CPU kernels split their sums, so
fixing it keeps a run's results the same whatever else runs (docs/REPRODUCIBILITY.md).

Training processes announce themselves in a per-user folder under the temp dir (one locked file each; the kernel
drops the lock when a process dies, even by SIGKILL), so a new one can warn that another is training: they share
the cores and slow each other, without changing each other's results."""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator

from pipeline.core.config import Config
from pipeline.core.utils import holder, read_json, try_lock, write_json
from pipeline.rundir import RunDir

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


def launch_share() -> int:
    """How many processes of one launch share this machine's cores (torchrun's ``LOCAL_WORLD_SIZE``; else 1)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def run_threads(cfg: Config) -> int:
    """The thread count of ``cfg``'s run: ``train.threads`` when set; else the count recorded in the run folder,
    or (the run's first computing stage) the usable cores divided among one launch's processes, recorded there.
    Never the processes training now: a result does not depend on what else runs."""
    if cfg.train.threads:
        return cfg.train.threads
    path = RunDir.of(cfg).threads
    try:
        recorded = read_json(path)["threads"] if path.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("%s is damaged: recording this run's thread count again", path)
        recorded = None
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0:
        if recorded > usable_cpus():
            log.info("this run computes with the %d thread(s) recorded in %s on %d usable core(s): its results "
                     "stay the same, slower (train.threads=N sets another count)", recorded, path, usable_cpus())
        return recorded
    threads = max(1, usable_cpus() // launch_share())
    write_json(path, {"threads": threads, "usable_cpus": usable_cpus(), "launch_share": launch_share()})
    log.info("this run computes with %d thread(s), recorded in %s", threads, path)
    return threads


@contextlib.contextmanager
def training_slot(cfg: Config, what: str = "train") -> Iterator[int]:
    """Announce a training process for its lifetime; yield its run's thread count (:func:`run_threads`).

    Warns when another pipeline process is training: they share the cores and slow each other (4-15x with two
    jobs on 2 cores), but neither changes the other's thread count, so neither changes the other's results."""
    others = other_training()
    threads = run_threads(cfg)
    if others:
        names = "; ".join(f"pid {o.get('pid', '?')}: {o.get('what', '?')} {o.get('run', '?')}" for o in others)
        log.warning("%d other pipeline process(es) training on this machine (%s): they share %d core(s) and "
                    "slow each other; this one keeps its run's %d thread(s), so its results do not change. Wait "
                    "for them for full speed.", len(others), names, usable_cpus(), threads)
    fd = try_lock(jobs_dir() / f"{os.getpid()}.lock", {"pid": os.getpid(), "what": what, "run": str(cfg.run_dir)})
    try:
        yield threads
    finally:
        if fd is not None:
            (jobs_dir() / f"{os.getpid()}.lock").unlink(missing_ok=True)
            os.close(fd)
