"""Ranges of the config's number keys: each section lists a :class:`Limit` per key (``LIMITS``) and checks them
when it is made (:func:`check_limits`), so a size, count or fraction out of range is refused at config load."""
from __future__ import annotations

import functools
import typing
from dataclasses import dataclass
from typing import Any, Optional


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


@dataclass(frozen=True)
class Limit:
    """The range a number key (or every number of a list key) must lie in, checked when its section is made, so a
    size, count or fraction out of range is refused at config load instead of failing mid-run."""
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False  # low itself is out
    high_open: bool = False  # high itself is out

    def holds(self, x: float) -> bool:
        above = self.low is None or (x > self.low if self.low_open else x >= self.low)
        below = self.high is None or (x < self.high if self.high_open else x <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return "positive" if self.low == 0 and self.low_open else f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE = Limit(0, low_open=True)  # sizes, counts that must be at least 1, rates, strengths
NON_NEGATIVE = Limit(0)  # counts where 0 means none or off, seeds
FRACTION = Limit(0, 1)  # probabilities and weights in [0, 1]


def _numbers(value: Any) -> list:
    """The numbers in ``value``: itself, or every number in a (nested) list; strings, bools and None are skipped."""
    if isinstance(value, (list, tuple)):
        return [x for item in value for x in _numbers(item)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


@functools.lru_cache(maxsize=None)
def _nullable(cls: type) -> frozenset:
    """The fields of ``cls`` that may be null."""
    return frozenset(name for name, tp in typing.get_type_hints(cls).items()
                     if type(None) in typing.get_args(tp))


def check_limits(section: Any) -> None:
    """Refuse a value outside its :class:`Limit` (the section's ``LIMITS``), naming the key, its range and the
    value; every section calls this first in its ``__post_init__``."""
    prefix = f"{section.SECTION}." if section.SECTION else ""
    for name, limit in section.LIMITS.items():
        value = getattr(section, name)
        bad = [x for x in _numbers(value) if not limit.holds(x)]
        if bad:
            each = "every value " if isinstance(value, (list, tuple)) else ""
            null = " or null" if name in _nullable(type(section)) else ""
            raise ConfigError(f"{prefix}{name}: {each}must be {limit}{null}, got {value!r}")
