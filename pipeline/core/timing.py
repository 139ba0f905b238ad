"""Timing shared by the bench and the planner: bounded measurements of a repeated call, and durations as people
write them (``90s``, ``15m``, ``1.5h``)."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable, Optional

from pipeline.core.config import ConfigError

Clock = Callable[[], float]  # seconds, only differences count (time.monotonic, time.perf_counter)

_DURATION = re.compile(r"(?P<value>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>s|m|h)")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Effort:
    """How long one measurement runs: ``batches`` timed calls at most, stopped once ``seconds`` have passed
    since it began (warm-up included; at least one timed call). ``seconds`` None: no time bound."""
    batches: int
    seconds: Optional[float] = None


def timed(fn: Callable[[], int], warmup: int, effort: Effort, clock: Clock = time.perf_counter) -> float:
    """Items per second of ``fn`` (which returns how many items it processed) after up to ``warmup`` calls, over
    up to ``effort.batches`` calls, within ``effort.seconds`` (warm-up stops at half of it)."""
    begin = clock()
    over = (lambda share: effort.seconds is not None and clock() - begin >= share * effort.seconds)
    for _ in range(warmup):
        fn()
        if over(0.5):
            break
    start, items = clock(), 0
    for _ in range(max(1, effort.batches)):
        items += fn()
        if over(1.0):
            break
    return items / max(clock() - start, 1e-9)


def parse_duration(text: str, what: str = "--budget") -> float:
    """Seconds of a duration written ``90s``, ``15m``, ``1h`` or ``1.5h`` (a positive number and one unit)."""
    match = _DURATION.fullmatch(str(text).strip().lower())
    seconds = float(match["value"]) * _UNIT_SECONDS[match["unit"]] if match else 0.0
    if seconds <= 0:
        raise ConfigError(f"{what}: expected a duration like 15m, 90s or 1.5h, got '{text}'")
    return seconds


def minutes(seconds: Optional[float]) -> Optional[float]:
    """Seconds as minutes rounded for a table (None stays None)."""
    return None if seconds is None else round(seconds / 60.0, 2)
