"""``plan.json`` as the run's contract across invocations of ``full --budget``: what an earlier invocation planned
and finished, the minutes it spent, and the throughputs it measured.

The same command on the same data reads it back (:func:`earlier`): finished members stay finished, a member an
interrupted invocation left running resumes at its fold and epoch (its config is the one recorded, so the train
stage's fingerprints match), and the minutes already spent count against the budget (:func:`spent_before`: the
minutes recorded at the last save, plus, for a member a kill interrupted, how long its run folder kept changing
after that save). Another budget re-fits only the members not yet done; other data, another family or other
``--set`` overrides plan anew (:func:`why_anew`), and the log says which.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Iterable, Optional

from pipeline.core.utils import read_json

log = logging.getLogger(__name__)

VERSION = 2
SETTLED = ("done",)  # a step's statuses that a later invocation keeps as they are
IDENTITY = ("data_root", "family", "overrides")  # what makes a plan the same plan (the budget may change)


def user_keys(overrides: Iterable[str]) -> frozenset[str]:
    """The dotted keys the user set with ``--set key=value``: the plan keeps their values in every member."""
    return frozenset(text.split("=", 1)[0].strip() for text in overrides if "=" in text)


def earlier(path: Path) -> Optional[dict]:
    """The ``plan.json`` an earlier invocation wrote (this version), or None when missing, unreadable or older."""
    with contextlib.suppress(OSError, ValueError):
        record = read_json(path)
        if isinstance(record, dict) and record.get("version") == VERSION and isinstance(record.get("steps"), list):
            return record
    return None


def why_anew(record: Optional[dict], identity: dict, facts: dict) -> Optional[str]:
    """Why an earlier plan cannot be carried on (None: it can): none, other data, family or overrides."""
    if record is None:
        return "no earlier plan"
    if record.get("facts") != facts:
        return "the data changed since the earlier plan"
    for key in IDENTITY:
        if record.get(key) != identity[key]:
            return f"{key.replace('_', ' ')} changed since the earlier plan ({record.get(key)} -> {identity[key]})"
    return None


def newest_change(folder: Path) -> float:
    """The newest modification time (wall clock) of a file under ``folder``, 0 when there is none."""
    newest = 0.0
    if folder.is_dir():
        for path in folder.rglob("*"):
            with contextlib.suppress(OSError):
                newest = max(newest, path.stat().st_mtime)
    return newest


def spent_before(record: dict, runs_dir: Path) -> float:
    """Seconds earlier invocations spent: the minutes recorded at their last save, plus the time a member left
    running (an invocation killed mid-member) kept writing to its run folder after that save."""
    spent = 60.0 * float(record.get("spent_min") or 0.0)
    saved = float(record.get("saved_at") or 0.0)
    for step in record["steps"]:
        if step.get("status") == "running" and saved:
            spent += max(0.0, newest_change(runs_dir / step["experiment"]) - saved)
    return spent


def rates_out(rates: dict[tuple, tuple[float, ...]]) -> list:
    """The planner's measured throughputs as JSON (kept so that a later invocation need not measure again)."""
    return [[list(key), list(values)] for key, values in rates.items()]


def rates_in(saved: object) -> dict[tuple, tuple[float, ...]]:
    """:func:`rates_out`'s list read back ({} when malformed)."""
    out: dict[tuple, tuple[float, ...]] = {}
    for item in saved if isinstance(saved, list) else []:
        with contextlib.suppress(TypeError, ValueError):
            key, values = item
            out[tuple(key)] = tuple(float(v) for v in values)
    return out


def stamp(record: dict, spent_s: float) -> None:
    """The minutes spent so far and when they were written: what a later invocation carries over."""
    record["spent_min"] = round(spent_s / 60.0, 3)
    record["saved_at"] = time.time()
