"""The command line shared by every stage: ``--config FILE`` and repeated ``--set section.key=value``."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from tqdm.contrib.logging import logging_redirect_tqdm

from . import runs
from .config import Config, ConfigError, load_config
from .utils import setup_logging

log = logging.getLogger("pipeline")

DEFAULT_CONFIG = "configs/default.yaml"


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", "-c", default=None,
                        help=f"YAML config (default: {DEFAULT_CONFIG} when it exists, else built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set train.epochs=3")
    return parser


def parse_config(args: argparse.Namespace) -> Config:
    path = args.config or (DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None)
    return load_config(path, args.overrides)


def stage_main(run: Callable[[Config], Any], description: str, argv: Optional[Sequence[str]] = None,
               parser: Optional[argparse.ArgumentParser] = None, exclusive: bool = True) -> int:
    """Parse arguments, run one stage, and turn expected errors into a one-line message and exit code 1.

    The run folder is checked to hold this config's data and, when ``exclusive`` (every stage but the search,
    whose workers share one study), locked against a second process (:func:`pipeline.runs.claim`)."""
    from .data.contract import DataError

    setup_logging()
    parser = parser or build_parser(description)
    args = parser.parse_args(argv)
    try:
        cfg = parse_config(args)
        with logging_redirect_tqdm(), runs.claim(cfg, run.__module__.rsplit(".", 1)[-1], exclusive):
            run(cfg)
    except (ConfigError, DataError, KeyError, FileNotFoundError, ValueError, RuntimeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        log.error("%s failed: %s", run.__module__, message)
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


def members_main(argv: Optional[Sequence[str]] = None) -> int:
    """``run.sh full A.yaml B.yaml …``: print the YAML list of the run folders of B, … (the ensemble members
    of A's run), every config loaded with the same ``--set`` overrides; refuse two configs sharing a folder."""
    parser = build_parser("run folders of the member configs")
    parser.add_argument("configs", nargs="+")
    args = parser.parse_args(argv)
    try:
        dirs = [load_config(path, args.overrides).run_dir for path in args.configs]
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if len(set(dirs)) < len(dirs):
        print(f"error: the configs {args.configs} share run folders {[str(d) for d in dirs]}: give each its own "
              "experiment name (and do not --set experiment for several configs)", file=sys.stderr)
        return 1
    print("[" + ", ".join(repr(str(d)) for d in dirs[1:]) + "]")
    return 0
