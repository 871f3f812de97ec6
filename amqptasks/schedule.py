"""Schedules: when a periodic task fires. Pure — no I/O, no clock: "now" is always passed in.

The only module that imports croniter. Two kinds of timing:

* :class:`Interval` (``every: 30s``) — fire times are ``anchor + k × every`` (the anchor is the
  Unix epoch unless a ``start`` is given), computed from the schedule, never as "last run +
  interval", so a late firing does not push every later one back (no drift). Intervals are
  real elapsed time: a zone's DST change does not stretch or shrink them.
* :class:`Cron` (``cron: "*/15 * * * *"``, optionally with a leading seconds field) — matched
  against the wall clock of the schedule's zone. croniter alone is not DST-safe: with an aware
  start time it fires ``30 1 * * *`` twice on the autumn fall-back day. So croniter only walks
  *naive* wall-clock times, and this module maps each to instants with :mod:`zoneinfo`:

  - a wall time that does not exist (spring-forward gap) fires **once, at the first instant
    after the gap** (``30 2 * * *`` runs at 03:00 on that day; several gap ticks collapse
    into that one firing) — never skipped;
  - a wall time that happens twice (fall-back) fires **once, at its first occurrence**,
    unless the expression's hour field matches every hour (``*/15 * * * *``, ``0 * * * *``):
    such a schedule is periodic within the day, so the repeated hour is fired like any other
    hour instead of leaving an hour-long hole. ``*/15 1 * * *`` fires four times, not eight.

A fire's identity is :meth:`Schedule.fire_id`: ``<name>:<fire time in UTC, ISO 8601, Z>``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

from .errors import ConfigError

__all__ = [
    "CATCH_UP_POLICIES",
    "FIRE_TIME_HEADER",
    "SCHEDULE_HEADER",
    "SCHEDULE_KEYS",
    "Cron",
    "Interval",
    "Schedule",
    "ScheduleFieldError",
    "Timing",
    "build_schedule",
    "fires_between",
    "format_utc",
    "latest_fire",
    "parse_duration",
    "plan_catch_up",
    "schedule",
    "zone",
]

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
CATCH_UP_POLICIES = ("none", "one", "all")
#: Headers on every scheduled message: the schedule's name and the (nominal) fire time.
SCHEDULE_HEADER = "x-amqptasks-schedule"
FIRE_TIME_HEADER = "x-amqptasks-fire-time"
#: The keys a schedule accepts (YAML ``schedules.<name>.*`` and :func:`schedule` keywords).
SCHEDULE_KEYS = (
    "task",
    "args",
    "kwargs",
    "every",
    "cron",
    "timezone",
    "start",
    "queue",
    "exchange",
    "routing_key",
    "expires",
    "jitter",
    "catch_up",
)
# ':' separates the name from the fire time in fire ids, so names cannot contain it.
_SCHEDULE_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")
_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_HOUR = timedelta(hours=1)
# No zone shifts its offset by more than this at once (Pacific/Apia skipped a whole day).
_MAX_SHIFT_HOURS = 26


class ScheduleFieldError(ValueError):
    """A schedule field is invalid: ``key`` is the field, ``problem`` says what was expected.

    Callers wrap it into a :class:`ConfigError` naming the file and ``schedules.<name>.<key>``.
    """

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


def format_utc(t: datetime) -> str:
    """``2026-03-08T07:00:00Z`` (microseconds only when there are any)."""
    u = t.astimezone(UTC)
    text = u.strftime("%Y-%m-%dT%H:%M:%S")
    if u.microsecond:
        text += f".{u.microsecond:06d}"
    return text + "Z"


def zone(name: str) -> tzinfo:
    """The IANA zone ``name`` (``UTC``, ``Asia/Shanghai``); ValueError if unknown."""
    if name.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r} (expected an IANA name such as 'UTC' or 'Europe/Berlin')"
        ) from None


def parse_duration(value: Any) -> timedelta:
    """``30``, ``"30s"``, ``"5m"``, ``"1h30m"``, ``"2d"`` -> timedelta (whole seconds)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 30s, 5m, 1h or 2d, got {value!r}")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str):
        m = _DURATION.match(value.strip())
        if m is None or not any(m.groups()):
            raise ValueError(f"expected a duration like 30s, 5m, 1h or 2d, got {value!r}")
        d, h, mi, s = (int(g) if g else 0 for g in m.groups())
        seconds = ((d * 24 + h) * 60 + mi) * 60 + s
    else:
        raise ValueError(f"expected a duration like 30s, 5m, 1h or 2d, got {value!r}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    return timedelta(seconds=seconds)


def _describe_duration(d: timedelta) -> str:
    seconds = int(d.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


class Timing(Protocol):
    """When a schedule fires: the next fire time strictly after an instant."""

    def next_after(self, t: datetime) -> datetime: ...

    def describe(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Interval:
    """Fires at ``anchor + k × every`` for whole k; never before ``anchor``."""

    every: timedelta
    anchor: datetime = EPOCH

    def next_after(self, t: datetime) -> datetime:
        if t < self.anchor:
            return self.anchor
        return self.anchor + ((t - self.anchor) // self.every + 1) * self.every

    def describe(self) -> str:
        text = f"every {_describe_duration(self.every)}"
        if self.anchor != EPOCH:
            text += f" from {format_utc(self.anchor)}"
        return text


@dataclass(frozen=True, slots=True)
class Cron:
    """A cron expression on the wall clock of ``tz`` (see the module docstring for DST)."""

    expr: str
    tz: tzinfo = UTC
    tz_name: str = "UTC"
    #: Six fields: the first one is seconds (as in Quartz/Spring), not croniter's last.
    with_seconds: bool = False
    #: The hour field matches all 24 hours: a repeated (fall-back) hour fires again.
    every_hour: bool = False

    @classmethod
    def parse(cls, expr: str, tz_name: str = "UTC") -> Cron:
        """Validate ``expr``; ValueError says why (croniter's reason, or 'never fires')."""
        tz = zone(tz_name)
        text = " ".join(expr.split())
        fields = len(text.split(" "))
        if not text.startswith("@") and fields not in (5, 6):
            raise ValueError(
                f"invalid cron expression {expr!r}: expected 5 fields (minute hour "
                f"day-of-month month day-of-week) or 6 with seconds first, got {fields}"
            )
        with_seconds = fields == 6
        try:
            it = croniter(text, _fake_utc(datetime(2000, 1, 1)), second_at_beginning=with_seconds)
            it.get_next(datetime)
        except CroniterError as exc:
            reason = str(exc)
            if "failed to find" in reason:
                reason = "it never fires"
            raise ValueError(f"invalid cron expression {expr!r}: {reason}") from None
        every_hour = it.expanded[1] == ["*"]
        return cls(text, tz, tz_name, with_seconds, every_hour)

    def describe(self) -> str:
        return f"cron {self.expr!r} ({self.tz_name})"

    def next_after(self, t: datetime) -> datetime:
        offsets_ahead = _offsets(self.tz, t, range(_MAX_SHIFT_HOURS + 1))
        # A fall-back shortly after t repeats wall times that are *earlier* than t's: start
        # the walk early enough to see their second occurrence.
        back = max(timedelta(0), _offset(self.tz, t) - min(offsets_ahead))
        start = _naive_local(t, self.tz) - back - timedelta(seconds=1)
        it = croniter(self.expr, _fake_utc(start), second_at_beginning=self.with_seconds)
        best: datetime | None = None
        hi = timedelta(0)
        while True:
            wall = it.get_next(datetime).replace(tzinfo=None)
            for instant in self._instants(wall):
                if instant > t and (best is None or instant < best):
                    best = instant
                    hi = max(_offsets(self.tz, best, range(-_MAX_SHIFT_HOURS, _MAX_SHIFT_HOURS)))
            # Every later wall time maps to an instant >= wall - (largest offset near best).
            if best is not None and wall - hi > best.replace(tzinfo=None):
                return best

    def _instants(self, wall: datetime) -> list[datetime]:
        """The instants a naive wall-clock tick fires at, in UTC (one, or two in a repeated
        hour for every-hour schedules)."""
        first = wall.replace(tzinfo=self.tz, fold=0).astimezone(UTC)
        second = wall.replace(tzinfo=self.tz, fold=1).astimezone(UTC)
        if first == second:
            return [first]
        if _naive_local(first, self.tz) == wall:  # exists twice: fold=0 is the first one
            return [first, second] if self.every_hour else [first]
        # Does not exist: fold=1 reads it with the offset after the gap (an instant before the
        # transition), fold=0 with the one before (an instant after it). Find the transition.
        return [_transition(self.tz, second, first)]


def _fake_utc(wall: datetime) -> datetime:
    # croniter does its own DST arithmetic on aware datetimes; on UTC it has none to do, so
    # a wall-clock time dressed as UTC is walked exactly as written.
    return wall.replace(tzinfo=UTC)


def _naive_local(t: datetime, tz: tzinfo) -> datetime:
    return t.astimezone(tz).replace(tzinfo=None)


def _offset(tz: tzinfo, t: datetime) -> timedelta:
    return t.astimezone(tz).utcoffset() or timedelta(0)


def _offsets(tz: tzinfo, t: datetime, hours: range) -> list[timedelta]:
    # Hourly samples: every offset a zone uses lasts far longer than an hour.
    return [_offset(tz, t + k * _HOUR) for k in hours]


def _transition(tz: tzinfo, before: datetime, after: datetime) -> datetime:
    """The first instant in (before, after] with ``after``'s offset (bisection to 1 s)."""
    target = _offset(tz, after)
    lo, hi = before, after
    while hi - lo > timedelta(seconds=1):
        mid = lo + (hi - lo) / 2
        mid = mid.replace(microsecond=0)
        if mid <= lo:
            break
        if _offset(tz, mid) == target:
            hi = mid
        else:
            lo = mid
    return hi


def fires_between(timing: Timing, after: datetime, until: datetime) -> Iterator[datetime]:
    """Fire times ``f`` with ``after < f <= until``, in order."""
    f = timing.next_after(after)
    while f <= until:
        yield f
        f = timing.next_after(f)


def latest_fire(timing: Timing, after: datetime, until: datetime) -> datetime | None:
    """The last fire time in ``(after, until]``, found without walking a long outage tick by
    tick (windows back from ``until`` grow eightfold)."""
    window = timedelta(minutes=1)
    while True:
        lo = max(after, until - window)
        last = None
        for last in fires_between(timing, lo, until):  # noqa: B007 - keep the last one
            pass
        if last is not None or lo == after:
            return last
        window *= 8


def plan_catch_up(timing: Timing, cursor: datetime, now: datetime, policy: str) -> list[datetime]:
    """Fire times missed in ``(cursor, now]`` that ``policy`` says to fire now.

    ``none``: none of them; ``one``: only the most recent; ``all``: every one, oldest first.
    """
    if policy == "none" or now <= cursor:
        return []
    if policy == "one":
        last = latest_fire(timing, cursor, now)
        return [last] if last is not None else []
    return list(fires_between(timing, cursor, now))


@dataclass(frozen=True)
class Schedule:
    """A task published periodically. Build with :func:`schedule` (Python) or ``schedules:``
    (YAML); both validate the same way."""

    name: str
    task: str
    timing: Interval | Cron
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    queue: str | None = None
    exchange: str | None = None
    routing_key: str | None = None
    #: The message expires this long after its (nominal) fire time; a worker dead-letters it
    #: (reason ``expired``) instead of running it late.
    expires: timedelta | None = None
    #: Publish up to this long after the fire time (spreads load); the id keeps the fire time.
    jitter: timedelta = timedelta(0)
    catch_up: str = "one"
    #: The zone fire times are shown in (and cron is matched in); an IANA name.
    timezone: str = "UTC"

    def next_after(self, t: datetime) -> datetime:
        return self.timing.next_after(t)

    def fire_id(self, fire: datetime) -> str:
        """The deterministic id of one firing: ``<name>:<fire time UTC>`` — the message id, so
        a duplicate of the same firing is recognisable anywhere."""
        return f"{self.name}:{format_utc(fire)}"

    def publish_at(self, fire: datetime) -> datetime:
        """When to publish ``fire``: the fire time plus a jitter derived from the fire id, so
        every scheduler (and a successor after failover) computes the same moment."""
        if not self.jitter:
            return fire
        digest = hashlib.blake2b(self.fire_id(fire).encode(), digest_size=8).digest()
        micros = int(self.jitter / timedelta(microseconds=1))
        return fire + timedelta(microseconds=int.from_bytes(digest, "big") % (micros + 1))

    def describe(self) -> str:
        return f"{self.name}: {self.task} {self.timing.describe()}, catch_up {self.catch_up}"


def _opt_name(value: Any, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ScheduleFieldError(key, f"expected a non-empty string, got {value!r}")
    return value


def _start(value: Any, tz: tzinfo) -> datetime:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ScheduleFieldError(
                "start", f"expected an ISO 8601 date-time, got {value!r}"
            ) from None
    if not isinstance(value, datetime):
        raise ScheduleFieldError("start", f"expected an ISO 8601 date-time, got {value!r}")
    # No offset means the schedule's own zone.
    return (value if value.tzinfo else value.replace(tzinfo=tz)).astimezone(UTC)


def build_schedule(name: str, spec: Mapping[str, Any], default_timezone: str = "UTC") -> Schedule:
    """Validate one schedule's fields; raises :class:`ScheduleFieldError` naming the field."""
    if not isinstance(name, str) or not _SCHEDULE_NAME.match(name):
        raise ScheduleFieldError(
            "", f"schedule names use letters, digits, '_', '.', '-' (no ':'), got {name!r}"
        )
    unknown = [k for k in spec if k not in SCHEDULE_KEYS]
    if unknown:
        raise ScheduleFieldError(unknown[0], f"unknown key (allowed: {', '.join(SCHEDULE_KEYS)})")
    task = spec.get("task")
    if not isinstance(task, str) or not task:
        raise ScheduleFieldError("task", f"is required: the task name to send, got {task!r}")

    tz_name = spec.get("timezone") or default_timezone
    if not isinstance(tz_name, str):
        raise ScheduleFieldError("timezone", f"expected a zone name, got {tz_name!r}")
    try:
        tz = zone(tz_name)
    except ValueError as exc:
        raise ScheduleFieldError("timezone", str(exc)) from None

    every, cron = spec.get("every"), spec.get("cron")
    if (every is None) == (cron is None):
        raise ScheduleFieldError("every", "give exactly one of 'every' or 'cron'")
    timing: Interval | Cron
    if every is not None:
        try:
            period = parse_duration(every)
        except ValueError as exc:
            raise ScheduleFieldError("every", str(exc)) from None
        if period < timedelta(seconds=1):
            raise ScheduleFieldError("every", f"must be at least 1s, got {every!r}")
        anchor = _start(spec["start"], tz) if spec.get("start") is not None else EPOCH
        timing = Interval(period, anchor)
    else:
        if spec.get("start") is not None:
            raise ScheduleFieldError("start", "only applies to 'every' schedules")
        if not isinstance(cron, str):
            raise ScheduleFieldError("cron", f"expected a cron expression string, got {cron!r}")
        try:
            timing = Cron.parse(cron, tz_name)
        except ValueError as exc:
            raise ScheduleFieldError("cron", str(exc)) from None

    args = spec.get("args", ())
    if not isinstance(args, (list, tuple)):
        raise ScheduleFieldError("args", f"expected a list, got {type(args).__name__}")
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise ScheduleFieldError("kwargs", "expected a mapping with string keys")
    queue = _opt_name(spec.get("queue"), "queue")
    exchange = spec.get("exchange")
    if exchange is not None and not isinstance(exchange, str):
        raise ScheduleFieldError("exchange", f"expected an exchange name, got {exchange!r}")
    routing_key = spec.get("routing_key")
    if routing_key is not None and not isinstance(routing_key, str):
        raise ScheduleFieldError("routing_key", f"expected a string, got {routing_key!r}")
    if queue is not None and (exchange is not None or routing_key is not None):
        raise ScheduleFieldError("queue", "give either 'queue' or 'exchange'/'routing_key'")

    durations: dict[str, timedelta | None] = {}
    for key in ("expires", "jitter"):
        if spec.get(key) is None:
            durations[key] = None
            continue
        try:
            durations[key] = parse_duration(spec[key])
        except ValueError as exc:
            raise ScheduleFieldError(key, str(exc)) from None
    if durations["expires"] is not None and not durations["expires"]:
        raise ScheduleFieldError("expires", "must be at least 1s")
    catch_up = spec.get("catch_up", "one")
    if catch_up not in CATCH_UP_POLICIES:
        raise ScheduleFieldError(
            "catch_up", f"expected one of {', '.join(CATCH_UP_POLICIES)}, got {catch_up!r}"
        )
    return Schedule(
        name=name,
        task=task,
        timing=timing,
        args=tuple(args),
        kwargs=dict(kwargs),
        queue=queue,
        exchange=exchange,
        routing_key=routing_key,
        expires=durations["expires"],
        jitter=durations["jitter"] or timedelta(0),
        catch_up=catch_up,
        timezone=tz_name,
    )


def schedule(name: str, task: str, **fields: Any) -> Schedule:
    """A schedule from Python, validated like YAML ``schedules:``::

        cleanup = schedule("cleanup", "myapp.tasks.cleanup", cron="0 3 * * *",
                           timezone="Europe/Berlin", catch_up="one")

    A module listed under ``imports`` that holds :class:`Schedule` objects at module level
    contributes them to ``amqptasks beat``. Errors are :class:`ConfigError`
    (``schedules.<name>.<field>: problem``).
    """
    try:
        return build_schedule(name, {"task": task, **fields})
    except ScheduleFieldError as exc:
        key = f"schedules.{name}" + (f".{exc.key}" if exc.key else "")
        raise ConfigError("<python>", key, exc.problem) from None
