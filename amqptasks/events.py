"""Task and worker events: the format every listener reads. Pure: no I/O, no client library.

An event is a JSON object (``docs/events.md`` is the human spec, ``schema/event-v1.json`` the
machine one). Workers and publishers publish them to the topic exchange
:data:`~amqptasks.topology.EVENTS_EXCHANGE` with the routing key ``task.<state>`` or
``worker.<state>`` (``task-succeeded`` -> ``task.succeeded``), so a listener binds only what it
wants and the broker does the filtering.

One AMQP message carries a *batch*: a JSON array of events that all share the message's routing
key. Batching is what makes events cheap enough to leave on (measured in docs/events.md): a
worker running 20,000 no-op tasks a second produces 60,000 events a second, and one publish
each would cost the broker and the worker more than the tasks themselves.

Order: the events of one task are published in the order they happened (sent < received <
started < one terminal event). :func:`encode_batch` keeps that when it groups a batch by
routing key. ``clock`` counts the events of one emitting process, so ``(hostname, pid,
clock)`` identifies an event and sorting by it gives the exact emission order.
"""

from __future__ import annotations

import fnmatch
import itertools
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import DecodeError
from .protocol import Envelope, dumps, loads

__all__ = [
    "EVENT_VERSION",
    "MAX_EVENTS_PER_MESSAGE",
    "PREVIEW_LIMIT",
    "STATES",
    "TASK_STATES",
    "TASK_TYPES",
    "TYPES",
    "WORKER_STATES",
    "WORKER_TYPES",
    "EventFilter",
    "EventSource",
    "decode_batch",
    "encode_batch",
    "encode_groups",
    "preview",
    "preview_text",
    "rfc3339",
    "routing_key",
    "state_of",
    "with_exception",
    "with_result",
]

EVENT_VERSION = 1
TASK_STATES = (
    "sent",
    "received",
    "started",
    "succeeded",
    "failed",
    "retried",
    "rejected",
    "revoked",
    "expired",
)
WORKER_STATES = ("online", "heartbeat", "offline")
STATES = TASK_STATES + WORKER_STATES
TASK_TYPES = tuple(f"task-{s}" for s in TASK_STATES)
WORKER_TYPES = tuple(f"worker-{s}" for s in WORKER_STATES)
TYPES = TASK_TYPES + WORKER_TYPES
#: args, kwargs and results are carried as JSON text cut to this many characters.
PREVIEW_LIMIT = 1024
#: Tracebacks keep their last this many characters (the frame that raised is at the end).
TRACEBACK_LIMIT = 8192
#: A batch larger than this is split into several messages (bounded message size).
MAX_EVENTS_PER_MESSAGE = 1000

#: Where an event stands in its task's life; a batch is published in this order.
_RANK = {
    "worker-online": 0,
    "task-sent": 1,
    "task-received": 2,
    "task-started": 3,
    **{f"task-{s}": 4 for s in TASK_STATES[3:]},
    "worker-heartbeat": 5,
    "worker-offline": 6,
}
_KEYS = {t: t.replace("-", ".", 1) for t in TYPES}


def routing_key(event_type: str) -> str:
    """``task-succeeded`` -> ``task.succeeded`` (unknown types keep their text, dashed)."""
    return _KEYS.get(event_type) or event_type.replace("-", ".", 1)


def state_of(event_type: str) -> str:
    """``task-succeeded`` -> ``succeeded``."""
    return event_type.split("-", 1)[-1]


_second: tuple[int, str] = (-1, "")
_milli: tuple[int, str] = (-1, "")


def rfc3339(ts: float) -> str:
    """A POSIX time as RFC 3339 UTC with milliseconds: ``2030-01-02T03:04:05.123Z``.

    Every event is stamped, so the text is cached per millisecond (a busy worker stamps
    dozens of events in one) and the date part per second. Exact order comes from
    ``clock``, not from the time.
    """
    global _second, _milli
    ms = int(ts * 1000)
    cached = _milli
    if cached[0] == ms:
        return cached[1]
    whole, frac = divmod(ms, 1000)
    second = _second
    if second[0] != whole:
        second = _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    text = f"{second[1]}.{frac:03d}Z"
    _milli = (ms, text)
    return text


def preview(value: Any, limit: int = PREVIEW_LIMIT) -> tuple[str, bool]:
    """``value`` as JSON text (``repr`` when JSON cannot encode it), cut to ``limit``
    characters with a trailing ``…``; and whether it was cut."""
    try:
        text = dumps(value).decode()
    except TypeError:
        text = repr(value)
    if len(text) > limit:
        return text[:limit] + "…", True
    return text, False


class EventSource:
    """Builds the events of one emitting process (a worker, a publisher): the common fields,
    and the per-process ``clock``."""

    def __init__(self, hostname: str, pid: int | None = None) -> None:
        self.hostname = hostname
        self.pid = os.getpid() if pid is None else pid
        self._clock = itertools.count()

    def event(self, event_type: str) -> dict[str, Any]:
        """A new event with the fields every event has."""
        return {
            "v": EVENT_VERSION,
            "type": event_type,
            "time": rfc3339(time.time()),
            "hostname": self.hostname,
            "pid": self.pid,
            "clock": next(self._clock),
        }

    def task_event(
        self, event_type: str, env: Envelope, queue: str | None, when: str | None = None
    ) -> dict[str, Any]:
        """An event about ``env``'s task (stamped ``when``, default now), with its workflow
        ids when it has them. One dict literal: this runs three times per task."""
        e = {
            "v": EVENT_VERSION,
            "type": event_type,
            "time": when or rfc3339(time.time()),
            "hostname": self.hostname,
            "pid": self.pid,
            "clock": next(self._clock),
            "id": env.id,
            "task": env.task,
            "queue": queue,
        }
        if queue is None:
            del e["queue"]
        if env.root_id is not None or env.parent_id is not None or env.links:
            _workflow_ids(e, env)
        return e

    def with_call(self, e: dict[str, Any], env: Envelope) -> dict[str, Any]:
        """Add what a task was called with: args and kwargs previews, retries, eta, expires."""
        try:
            args = dumps(env.args).decode() if env.args else "[]"
            kwargs = dumps(env.kwargs).decode() if env.kwargs else "{}"
        except TypeError:  # e.g. a pickle body's objects: preview() uses repr()
            args = kwargs = ""
        if not args or len(args) > PREVIEW_LIMIT or len(kwargs) > PREVIEW_LIMIT:
            args, cut_args = preview(env.args)
            kwargs, cut_kwargs = preview(env.kwargs)
            if cut_args or cut_kwargs:
                e["truncated"] = [n for n, c in (("args", cut_args), ("kwargs", cut_kwargs)) if c]
        e["args"] = args
        e["kwargs"] = kwargs
        e["retries"] = env.retries
        e["eta"] = None if env.eta is None else env.eta.isoformat()
        e["expires"] = None if env.expires is None else env.expires.isoformat()
        return e


def _workflow_ids(e: dict[str, Any], env: Envelope) -> None:
    if env.root_id is not None:
        e["root_id"] = env.root_id
    if env.parent_id is not None:
        e["parent_id"] = env.parent_id
    chord = env.links.get("chord") if env.links else None
    if isinstance(chord, dict) and isinstance(chord.get("id"), str):
        e["chord_id"] = chord["id"]
    group_id = env.links.get("group_id") if env.links else None
    if isinstance(group_id, str):
        e["group_id"] = group_id


def with_result(e: dict[str, Any], runtime: float, result: Any) -> dict[str, Any]:
    e["runtime"] = round(runtime, 6)
    if result is None:
        e["result"] = "null"
        return e
    e["result"], cut = preview(result)
    if cut:
        e["truncated"] = ["result"]
    return e


def with_exception(
    e: dict[str, Any], exc: BaseException | None, traceback: str | None
) -> dict[str, Any]:
    type_name = getattr(exc, "exc_type", None) or type(exc).__name__
    e["exception"] = {"type": type_name, "message": preview_text(str(exc))}
    e["traceback"] = traceback[-TRACEBACK_LIMIT:] if traceback else None
    return e


def preview_text(text: str, limit: int = PREVIEW_LIMIT) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


# -- batches ---------------------------------------------------------------------------------
#: Events of one type, in emission order, by type: one batch *segment*. Within a segment no
#: task has two deliveries, so publishing it type by type in task-life order keeps every
#: task's events in order.
Groups = dict[str, list[Mapping[str, Any]]]


def encode_groups(
    groups: Groups, max_per_message: int = MAX_EVENTS_PER_MESSAGE
) -> list[tuple[str, bytes, int]]:
    """One segment as messages ``(routing key, body, count)``, type by type in task-life
    order (received before started before terminal), at most ``max_per_message`` each."""
    out: list[tuple[str, bytes, int]] = []
    for kind in sorted(groups, key=lambda k: _RANK.get(k, 4)):
        members = groups[kind]
        key = routing_key(kind)
        for i in range(0, len(members), max_per_message):
            chunk = members[i : i + max_per_message]
            out.append((key, dumps(chunk), len(chunk)))
    return out


def encode_batch(
    events: Sequence[Mapping[str, Any]], max_per_message: int = MAX_EVENTS_PER_MESSAGE
) -> list[tuple[str, bytes, int]]:
    """Group ``events`` (in emission order) into messages: ``(routing key, body, count)``.

    Each message holds events of one type, in emission order; see :func:`encode_groups`.
    When a task id that already has events in the batch starts again (a second delivery of
    the same id: a retry copy, a duplicate), the batch is cut there and the part before it
    goes first.
    """
    out: list[tuple[str, bytes, int]] = []
    groups: Groups = {}
    ranks: dict[str, int] = {}
    for e in events:
        kind = e["type"]
        rank = _RANK.get(kind, 4)
        task_id = e.get("id")
        if task_id is not None:
            seen = ranks.get(task_id)
            if seen is not None and seen >= rank:
                out.extend(encode_groups(groups, max_per_message))
                groups, ranks = {}, {}
            ranks[task_id] = rank
        groups.setdefault(kind, []).append(e)
    out.extend(encode_groups(groups, max_per_message))
    return out


def decode_batch(body: bytes) -> list[dict[str, Any]]:
    """The events of one message: a JSON array of event objects (a single object is taken
    as a batch of one, for producers that do not batch). Raises :class:`DecodeError`."""
    data = loads(body)
    items = [data] if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise DecodeError("an events message must be a JSON array of event objects")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise DecodeError(f"event [{i}] is not an object with a string 'type'")
    return items


# -- filters ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class EventFilter:
    """What a listener wants: task name globs, states, worker host name globs, queues.

    Empty means "any". A task, queue or task-state filter matches task events only.
    """

    tasks: tuple[str, ...] = ()
    states: frozenset[str] = field(default_factory=frozenset)
    workers: tuple[str, ...] = ()
    queues: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = self.states - set(STATES)
        if unknown:
            raise ValueError(
                f"unknown state(s) {', '.join(sorted(unknown))} (choose from {', '.join(STATES)})"
            )

    @classmethod
    def parse(
        cls,
        tasks: Iterable[str] = (),
        states: Iterable[str] = (),
        workers: Iterable[str] = (),
        queues: Iterable[str] = (),
    ) -> EventFilter:
        def split(values: Iterable[str]) -> tuple[str, ...]:
            return tuple(p.strip() for v in values for p in v.split(",") if p.strip())

        return cls(split(tasks), frozenset(split(states)), split(workers), split(queues))

    def routing_keys(self) -> tuple[str, ...]:
        """Binding keys that let the broker drop what this filter would drop anyway."""
        if not self.states:
            return ("task.#",) if (self.tasks or self.queues) else ("#",)
        wanted = [s for s in STATES if s in self.states]
        if self.tasks or self.queues:
            wanted = [s for s in wanted if s in TASK_STATES]
        return tuple(("task." if s in TASK_STATES else "worker.") + s for s in wanted)

    def matches(self, event: Mapping[str, Any]) -> bool:
        kind = str(event.get("type", ""))
        if self.states and state_of(kind) not in self.states:
            return False
        if (self.tasks or self.queues) and not kind.startswith("task-"):
            return False
        if self.workers and not any(
            fnmatch.fnmatchcase(str(event.get("hostname", "")), w) for w in self.workers
        ):
            return False
        if self.tasks and not any(
            fnmatch.fnmatchcase(str(event.get("task") or ""), t) for t in self.tasks
        ):
            return False
        return not self.queues or event.get("queue") in self.queues
