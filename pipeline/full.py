"""Every stage in one process: ``python -m pipeline.full [CONFIG ...] [--set section.key=value ...]``.

What ``./run.sh full`` runs. One config: eda, preprocess, folds, train, infer, ensemble, results, submit.
Several configs ``A B …`` (the same ``--set`` overrides for all, so they share data and folds): the EDA once,
every member's preprocess, folds, train and infer in its own run folder, then A's ensemble of all of them,
its results and one submission. An ensemble config (``ensemble.member_configs``) is the same with its own run
folder: each member config's stages, then this config's preprocess (the data its reports and submission read),
ensemble of the members, results and submission. The stages still talk only through files; running them in one
process pays Python's and torch's start-up once instead of eight times. The last line printed is
``submission: <path>``; a failing stage stops the chain with its error (exit 1).

One config with ``recipe: auto`` (configs/default.yaml) is planned from the data and the machine
(:mod:`pipeline.plan.planner`): the EDA, then the family's members (only the first without ``--budget DURATION``),
each in its own run folder, the plan written to ``runs/<experiment>/plan.json`` before anything trains, and the
ensemble of what finished within the budget, its results and one submission. Its run folder holding another
competition and no ``--set experiment=``: the run goes to ``<experiment>-<data folder>`` instead.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from pipeline.cli import build_parser, config_path, error_message, run_stage
from pipeline.core.config import Config, ConfigError, load_config, with_values
from pipeline.core.timing import Clock, parse_duration
from pipeline.core.utils import read_json, setup_logging
from pipeline.data.demo import build as build_demo
from pipeline.eda import suggest
from pipeline.plan import ledger, planner, screen
from pipeline.rundir import RunBusy, check_data, run_lock, suggested_experiment
from pipeline.training import modes

log = logging.getLogger(__name__)

STAGES = ("eda", "preprocess", "folds", "train", "infer", "ensemble", "results", "submit")
MEMBER_STAGES = ("preprocess", "folds", "train", "infer")
FINAL_STAGES = ("ensemble", "results", "submit")
DEMO = "data/demo"
STAGE_MODULES = {"eda": "pipeline.eda.stage"}  # the stages whose module is not ``pipeline.<stage>``


def stage_function(name: str) -> Callable[[Config], Any]:
    """A stage's ``run(cfg)``, its module imported only now (a stage pays only for its own imports)."""
    return importlib.import_module(STAGE_MODULES.get(name, f"pipeline.{name}")).run


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


# --------------------------------------------------------------------------- recipe: auto


def auto_config(paths: Sequence[Optional[str]], overrides: list[str]) -> Optional[Config]:
    """The config when ``full`` plans the recipe itself: one config, not an ensemble config, with ``recipe: auto``."""
    if len(paths) != 1:
        return None
    cfg = load_config(paths[0], overrides)
    return cfg if cfg.recipe == "auto" and not cfg.ensemble.member_configs else None


def own_folder(cfg: Config, overrides: list[str]) -> Config:
    """``cfg``, or, when its run folder holds another competition and no ``--set experiment=`` names one, ``cfg``
    in ``<experiment>-<data folder>`` (what the refusal would suggest): the plan picks the folder too."""
    if any(text.split("=", 1)[0].strip() == "experiment" for text in overrides):
        return cfg
    try:
        check_data(cfg)
        return cfg
    except ConfigError:
        moved = with_values(cfg, {"experiment": suggested_experiment(cfg)})
        log.info("%s holds another competition: this run goes to %s", cfg.run_dir, moved.run_dir)
        return moved


def run_auto(cfg: Config, overrides: list[str], budget_s: Optional[float], clock: Clock = time.monotonic,
             estimate: Optional[planner.Estimate] = None) -> Optional[Path]:
    """``recipe: auto``: the EDA, the plan (``plan.json``, before anything trains; an earlier invocation's carried
    on), its members while the budget lasts, then the ensemble, results and submission of the members that
    finished, all under the first member's run-folder lock. ``clock`` and ``estimate`` replace the wall clock and
    the measured estimates. The submission's path, or None when a stage failed."""
    start = clock()
    with run_lock(cfg.run_dir, "full"):
        eda = run_steps([("eda", cfg)])
        if eda is None:
            return None
        report = read_json(eda.json)
        facts = suggest.facts(report)
        family, why = suggest.family(facts)
        base, applied = planner.protections(report, planner.base_config(family, cfg, overrides),
                                            ledger.user_keys(overrides))
        plan = planner.planned(family, why, base, facts, budget_s, lambda: clock() - start, estimate, overrides)
        plan.record["cv"] = applied
        plan.save()
        for member in plan.configs:  # a setting a member's mode cannot honour: refused before anything trains
            modes.training_mode(member)
        done = run_members(plan, clock)
        return run_final(plan, done) if done else None


def run_members(plan: planner.Plan, clock: Clock) -> list[Config]:
    """Every planned member's stages in turn while the budget lets it run, each after the first judged on its
    first fold before its other folds (:mod:`pipeline.plan.screen`), the rest re-fitted after each; then, with the
    time left, the other folds of members stopped after their first. The members that finished, the first
    member's first (none when it failed: there is nothing to submit)."""
    while (i := planner.next_step(plan)) is not None:
        reason = planner.skip_reason(plan, i) if i != plan.lead else None
        planner.start_step(plan, i, reason)
        if reason:
            continue
        begin = clock()
        if screen.screens(plan, i) and not goes_on(plan, i, clock, begin):
            planner.refit(plan)
            continue
        if not complete(plan, i, clock, begin) and i == plan.lead:
            return []
        planner.refit(plan)
    while (i := screen.late_step(plan)) is not None:  # time no member can use: the stopped ones' other folds
        screen.start_late(plan, i)
        complete(plan, i, clock, clock() - 60 * plan.steps[i]["screen"]["actual_min"])  # its minutes from fold 0 on
    return planner.finished(plan)


def complete(plan: planner.Plan, i: int, clock: Clock, begin: float) -> bool:
    """Step ``i``'s stages (a fold already trained is skipped), its minutes counted from ``begin``: True when
    every stage finished."""
    ok = run_steps([(stage, plan.configs[i]) for stage in MEMBER_STAGES]) is not None
    planner.finish_step(plan, i, clock() - begin, ok)
    return ok


def goes_on(plan: planner.Plan, i: int, clock: Clock, begin: float) -> bool:
    """Step ``i``'s first fold (its preprocess, folds and fold-0 training), then the plan's verdict on it: True when
    its other folds train; else it is recorded as stopped (or failed, when a stage failed)."""
    screened = run_steps([(stage, screen.screen_config(plan.configs[i])) for stage in MEMBER_STAGES[:-1]])
    if screened is None:
        planner.finish_step(plan, i, clock() - begin, False)
        return False
    stop = screen.judge(plan, i, clock() - begin)
    if stop:
        planner.stop_step(plan, i, clock() - begin, stop)
    return stop is None


def run_final(plan: planner.Plan, done: list[Config]) -> Optional[Path]:
    """The ensemble of the finished members in the first one's folder, its results page and the submission."""
    final = planner.final_config(done[0], done[1:])
    if run_steps([("ensemble", final)]) is None:
        return None
    planner.finish_ensemble(plan, final)
    path = run_steps([(stage, final) for stage in ("results", "submit")])
    planner.finish_run(plan, path)
    log.info("%s", planner.table(plan.record))
    return path


# --------------------------------------------------------------------------- the command


def prepare(args: argparse.Namespace) -> tuple[Optional[Config], list[tuple[str, Config]], Optional[float]]:
    """(the ``recipe: auto`` config or None, the steps of the configs as written, the budget in seconds)."""
    paths = args.configs or [config_path(args.config)]
    budget_s = None if args.budget is None else parse_duration(args.budget)
    auto = auto_config(paths, args.overrides)
    if auto is None:
        if budget_s is not None:
            raise ConfigError("--budget: plans the members of one config with recipe: auto (configs/default.yaml "
                              "has it, or --set recipe=auto)")
        steps = plan(paths, args.overrides)
        for cfg in {id(cfg): cfg for _, cfg in steps}.values():  # each config checked against its training mode
            modes.training_mode(cfg)
        build_demo_if_read(steps)
        return None, steps, None
    auto = own_folder(auto, args.overrides)
    build_demo_if_read([("eda", auto)])
    return auto, [], budget_s


def main(argv: Optional[Sequence[str]] = None) -> int:
    setup_logging()
    parser = build_parser(__doc__.splitlines()[0])
    parser.prog = "python -m pipeline.full"
    parser.add_argument("configs", nargs="*", metavar="CONFIG",
                        help="one config, several (an ensemble of all, run in the first's folder), or an ensemble config")
    parser.add_argument("--budget", metavar="DURATION", default=None,
                        help="recipe: auto: the wall time to plan members for (90s, 15m, 1.5h); without it, one member")
    args = parser.parse_intermixed_args(argv)
    try:
        auto, steps, budget_s = prepare(args)
        path = run_auto(auto, args.overrides, budget_s) if auto is not None else run_steps(steps)
    except (ConfigError, OSError, RunBusy) as err:  # a member config that cannot load, a busy folder, one that
        print(f"error: {error_message(err)}", file=sys.stderr)  # cannot be written: one line, like a stage's error
        return 1
    if path is None:
        return 1
    print(f"submission: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
