"""The command line shared by every stage: ``--config FILE`` and repeated ``--set section.key=value``."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline import rundir
from pipeline.core.config import Config, ConfigError, load_config
from pipeline.core.utils import setup_logging
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
    except (ConfigError, DataError, KeyError, FileNotFoundError, ValueError, RuntimeError) as err:
        return _failed(run, err), None


def _failed(run: Callable[[Config], Any], err: Exception) -> int:
    message = err.args[0] if isinstance(err, KeyError) and err.args else err
    log.error("%s failed: %s", run.__module__, message)
    print(f"error: {message}", file=sys.stderr)
    return 1
