"""The command line shared by every stage: ``--config FILE`` and repeated ``--set section.key=value``."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline import rundir
from pipeline.core.config import Config, ConfigError, load_config
from pipeline.core.utils import disk_full, setup_logging
from pipeline.data.contract import DataError

log = logging.getLogger("pipeline")

DEFAULT_CONFIG = "configs/default.yaml"


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", "-c", default=None,
                        help=f"YAML config (default: {DEFAULT_CONFIG} when it exists, else built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set train.epochs=3")
    return parser


def config_path(path: Optional[str]) -> Optional[str]:
    """``--config`` as given, else configs/default.yaml when it exists, else None (built-in defaults)."""
    return path or (DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None)


def parse_config(args: argparse.Namespace) -> Config:
    return load_config(config_path(args.config), args.overrides)


def stage_main(run: Callable[[Config], Any], description: str, argv: Optional[Sequence[str]] = None,
               parser: Optional[argparse.ArgumentParser] = None, exclusive: bool = True) -> int:
    """Parse arguments, run one stage (:func:`run_stage`); 0 on success, 1 on an expected error."""
    setup_logging()
    parser = parser or build_parser(description)
    args = parser.parse_args(argv)
    try:
        cfg = parse_config(args)
    except ConfigError as err:
        return _failed(run, err)
    return run_stage(run, cfg, exclusive)[0]


def run_stage(run: Callable[[Config], Any], cfg: Config, exclusive: bool = True) -> tuple[int, Any]:
    """Run one stage on ``cfg`` and turn expected errors into a one-line message: (0, result) or (1, None).

    The run folder is checked to hold this config's data and, when ``exclusive`` (every stage but the search,
    whose workers share one study), locked against a second process (:func:`pipeline.rundir.claim`)."""
    try:
        with logging_redirect_tqdm(), rundir.claim(cfg, run.__module__.rsplit(".", 1)[-1], exclusive):
            return 0, run(cfg)
    except (ConfigError, DataError, KeyError, OSError, ValueError, RuntimeError) as err:
        return _failed(run, err, cfg), None


def _failed(run: Callable[[Config], Any], err: Exception, cfg: Optional[Config] = None) -> int:
    message = error_message(err, cfg)
    log.error("%s failed: %s", run.__module__, message)
    print(f"error: {message}", file=sys.stderr)
    return 1


# what an operating-system error means for a folder the run writes, and what to do about it ({key}: its setting)
_OS_ERRORS = {
    errno.ENOSPC: "free space there, or point {key} at another disk",
    errno.EDQUOT: "free space there, or point {key} at another disk",
    errno.EROFS: "point {key} at a folder you can write",
    errno.EACCES: "point {key} at a folder you can write",
    errno.EPERM: "point {key} at a folder you can write",
    errno.EEXIST: "a file is in the way of a folder: move it, or point {key} elsewhere",
    errno.ENOTDIR: "a file is in the way of a folder: move it, or point {key} elsewhere",
}


def error_message(err: BaseException, cfg: Optional[Config] = None) -> str:
    """One line for an expected error: the message, or for an operating-system error (a full disk, a read-only
    or misplaced folder) the path, what happened, and the setting that names the place (with ``cfg``)."""
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    if not isinstance(err, OSError) or err.errno is None:
        return str(err)
    path = err.filename
    if path is None and cfg is not None and err.errno in (errno.ENOSPC, errno.EDQUOT):
        # a library's own writer (TensorBoard's) names no file: the run's place whose disk is full
        path = next((folder for folder in places(cfg).values() if disk_full(folder)), None)
    where = f"{path}: " if path is not None else ""
    advice = _OS_ERRORS.get(err.errno)
    if advice is None:
        return f"{where}{err.strerror}"
    key = place_key(cfg, path) if cfg is not None and path is not None else None
    return f"cannot write {where}{err.strerror} ({advice.format(key=key or 'the setting that names it')})"


def places(cfg: Config) -> dict[str, str]:
    """The folders a run writes, by the setting naming each (the run's own folder for ``runs_dir``)."""
    return {"runs_dir": str(cfg.run_dir), "data.cache_dir": cfg.data.cache_dir, "submit.dir": cfg.submit.dir,
            "eda.out_dir": cfg.eda.out_dir}


def place_key(cfg: Config, path: str) -> Optional[str]:
    """The setting naming the folder that holds ``path`` (:func:`places`; the innermost when they nest), or
    None."""
    target = os.path.abspath(path)
    holding = [(len(os.path.abspath(folder)), key) for key, folder in places(cfg).items()
               if os.path.commonpath([target, os.path.abspath(folder)]) == os.path.abspath(folder)]
    return max(holding)[1] if holding else None
