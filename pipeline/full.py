"""Every stage in one process: ``python -m pipeline.full [CONFIG ...] [--set section.key=value ...]``.

What ``./run.sh full`` runs. One config: eda, preprocess, folds, train, infer, ensemble, results, submit.
Several configs ``A B …`` (the same ``--set`` overrides for all, so they share data and folds): the EDA once,
every member's preprocess, folds, train and infer in its own run folder, then A's ensemble of all of them,
its results and one submission. An ensemble config (``ensemble.member_configs``) is the same with its own run
folder: each member config's stages, then this config's preprocess (the data its reports and submission read),
ensemble of the members, results and submission. The stages still talk only through files; running them in one
process pays Python's and torch's start-up once instead of eight times. The last line printed is
``submission: <path>``; a failing stage stops the chain with its error (exit 1).
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from pipeline.cli import build_parser, config_path, run_stage
from pipeline.core.config import Config, ConfigError, load_config, with_values
from pipeline.core.utils import setup_logging
from pipeline.data.demo import build as build_demo

log = logging.getLogger(__name__)

STAGES = ("eda", "preprocess", "folds", "train", "infer", "ensemble", "results", "submit")
MEMBER_STAGES = ("preprocess", "folds", "train", "infer")
FINAL_STAGES = ("ensemble", "results", "submit")
DEMO = "data/demo"


def stage_function(name: str) -> Callable[[Config], Any]:
    """A stage's ``run(cfg)``, its module imported only now (a stage pays only for its own imports)."""
    return importlib.import_module(f"pipeline.{name}").run


def member_plan(primary: Config, members: list[Config], own_folder: bool) -> list[tuple[str, Config]]:
    """The (stage, config) steps of an ensemble of ``members``: the EDA once, every member's stages, then the
    ensemble, results and submission in ``primary``'s folder (``own_folder``: ``primary`` is not a member and
    only gets its preprocess; else it is ``members[0]``)."""
    _check_members(primary, members, own_folder)
    others = members if own_folder else members[1:]
    final = with_values(primary, {"ensemble.members": [str(m.run_dir) for m in others]})
    steps = [("eda", primary)] + [(stage, m) for m in members for stage in MEMBER_STAGES]
    if own_folder:
        steps.append(("preprocess", primary))
    return steps + [(stage, final) for stage in FINAL_STAGES]


def _check_members(primary: Config, members: list[Config], own_folder: bool) -> None:
    every = members + [primary] if own_folder else members
    dirs = [str(c.run_dir) for c in every]
    if len(set(dirs)) < len(dirs):
        raise ConfigError(f"the configs share run folders {dirs}: give each its own experiment name (and do not "
                          "--set experiment for several configs)")
    roots = {os.path.realpath(c.data.root) for c in every}
    if len(roots) > 1:
        raise ConfigError(f"the ensemble's configs read different data ({sorted(roots)}): members share data and folds")
    nested = [str(m.run_dir) for m in members if m.ensemble.member_configs]
    if nested:
        raise ConfigError(f"ensemble members {nested} are ensemble configs themselves (ensemble.member_configs)")


def plan(paths: Sequence[Optional[str]], overrides: list[str]) -> list[tuple[str, Config]]:
    """The (stage, config) steps for ``full CONFIG…`` (see the module's docstring)."""
    configs = [load_config(p, overrides) for p in paths]
    primary = configs[0]
    if primary.ensemble.member_configs:
        if len(configs) > 1:
            raise ConfigError(f"{paths[0]} lists its members (ensemble.member_configs): give it alone")
        members = [load_config(p, overrides) for p in primary.ensemble.member_configs]
        return member_plan(primary, members, own_folder=True)
    if len(configs) > 1:
        return member_plan(primary, configs, own_folder=False)
    return [(stage, primary) for stage in STAGES]


def build_demo_if_read(steps: list[tuple[str, Config]]) -> None:
    """The embedded demo competition, built only when a config reads ``data/demo`` and it is missing."""
    if any(Path(cfg.data.root).resolve() == Path(DEMO).resolve() for _, cfg in steps) and not Path(DEMO).is_dir():
        build_demo(DEMO)


def run_steps(steps: list[tuple[str, Config]]) -> Optional[Any]:
    """Run the steps in order, announcing each as ``== <stage> <experiment>``; the last result, or None when a
    stage failed (its error printed)."""
    result = None
    for stage, cfg in steps:
        print(f"== {stage} {cfg.experiment}", file=sys.stderr, flush=True)
        code, result = run_stage(stage_function(stage), cfg)
        if code:
            print(f"stage '{stage}' failed", file=sys.stderr)
            return None
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    setup_logging()
    parser = build_parser(__doc__.splitlines()[0])
    parser.prog = "python -m pipeline.full"
    parser.add_argument("configs", nargs="*", metavar="CONFIG",
                        help="one config, several (an ensemble of all, run in the first's folder), or an ensemble config")
    args = parser.parse_intermixed_args(argv)
    try:
        steps = plan(args.configs or [config_path(args.config)], args.overrides)
        build_demo_if_read(steps)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    path = run_steps(steps)
    if path is None:
        return 1
    print(f"submission: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
