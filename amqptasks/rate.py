"""Rate limits as values: ``"100/m"`` parsed once into a :class:`RateLimit`. Pure.

A task's ``rate_limit`` (decorator, the config's ``tasks:`` entry, or ``control rate-limit`` at
run time) says how many of its executions may *start* per second. Celery's spellings are
accepted: ``N/s``, ``N/m``, ``N/h`` and a bare number (per second); ``0``, ``"0"``, ``"off"``
and ``"none"`` switch a limit off explicitly (which overrides a limit set further down the
precedence: decorator > config > default). ``scope`` says who shares the rate: ``worker``
(each worker process has its own, the default, as in Celery) or ``fleet`` (all workers
together, through tokens the broker holds: docs/reliability.md).

The worker enforces both with the pipeline stage in :mod:`amqptasks.worker.throttle`; this
module only knows what a limit *is*.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_RATE", "OFF", "SCOPES", "RateLimit", "parse_rate", "rate_limit"]

#: Who shares a rate: each worker on its own, or the whole fleet.
SCOPES = ("worker", "fleet")
#: The highest rate accepted (starts per second): beyond it a limit means nothing a worker
#: could tell from no limit.
MAX_RATE = 1_000_000.0
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:/\s*([smh]))?\s*$")
_OFF_WORDS = ("off", "none")


def parse_rate(value: Any) -> float:
    """Starts per second for ``value`` (``"100/m"``, ``"10/s"``, ``"2/h"``, ``5``, ``0``).

    Raises ``ValueError`` saying what was expected; 0 means off.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a rate such as '10/s', '100/m' or '2/h', got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), "s"
    elif isinstance(value, str):
        if value.strip().lower() in _OFF_WORDS:
            return 0.0
        m = _RATE.match(value)
        if m is None:
            raise ValueError(
                f"expected a rate such as '10/s', '100/m' or '2/h' (or 0 for none), got {value!r}"
            )
        number, unit = float(m[1]), m[2] or "s"
    else:
        raise ValueError(
            f"expected a rate such as '10/s', '100/m' or '2/h', got {type(value).__name__}"
        )
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"a rate must be a finite number >= 0, got {value!r}")
    per_second = number / _UNITS[unit]
    if per_second > MAX_RATE:
        raise ValueError(f"a rate above {MAX_RATE:g}/s is not a limit, got {value!r}")
    return per_second


def _text(per_second: float) -> str:
    """The shortest of N/s, N/m, N/h that shows ``per_second`` without a fraction."""
    if per_second == 0:
        return "0"
    for unit, size in (("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        n = per_second * size
        if abs(n - round(n)) < 1e-9:
            return f"{round(n)}/{unit}"
    return f"{per_second:g}/s"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """How many executions of one task may start per second, and who shares that rate.

    ``burst`` is how many may start at once after a quiet spell (the bucket's size; 1, as in
    Celery, unless set). ``per_second == 0`` is an explicit "no limit".
    """

    per_second: float
    scope: str = "worker"
    burst: int = 1

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"rate limit scope must be one of {', '.join(SCOPES)}")
        if self.burst < 1:
            raise ValueError("rate limit burst must be at least 1")

    @property
    def active(self) -> bool:
        return self.per_second > 0

    @property
    def text(self) -> str:
        """The rate in Celery's spelling: ``10/s``, ``100/m``, ``2/h`` (``0``: off)."""
        return _text(self.per_second)

    def describe(self) -> dict[str, Any]:
        """The documented JSON form (``inspect registered``, ``control rate-limit``)."""
        return {
            "rate": self.text,
            "per_second": self.per_second,
            "scope": self.scope,
            "burst": self.burst,
        }

    def __str__(self) -> str:
        if not self.active:
            return "off"
        burst = f", burst {self.burst}" if self.burst != 1 else ""
        return f"{self.text} per {self.scope}{burst}"


#: An explicit "no rate limit" (overrides one set further down the precedence).
OFF = RateLimit(0.0)


def rate_limit(value: Any, scope: str | None = None, burst: int | None = None) -> RateLimit:
    """A :class:`RateLimit` from the decorator's or the command's spelling; ``ValueError``
    names what is wrong."""
    if isinstance(value, RateLimit):
        return value
    per_second = parse_rate(value)
    if scope is not None and scope not in SCOPES:
        raise ValueError(f"expected a scope of {' or '.join(SCOPES)}, got {scope!r}")
    if burst is not None and (isinstance(burst, bool) or not isinstance(burst, int) or burst < 1):
        raise ValueError(f"expected a burst of at least 1, got {burst!r}")
    return RateLimit(per_second, scope or "worker", burst or 1)
