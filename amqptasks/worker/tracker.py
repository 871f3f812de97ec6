"""Which deliveries a worker holds right now, and what became of those it held.

``inspect reserved`` (taken, waiting for a slot), ``inspect active`` (running),
``inspect query-task`` and the per-task outcome counts of ``inspect stats`` read this. It is
an :class:`~.observer.Observer`, so both paths keep it up to date without knowing it exists.
Entries are keyed by the envelope object, not the task id: two copies of one id (a duplicate,
a redelivery after a reconnect) are two deliveries.
"""

from __future__ import annotations

import time
from typing import Any

from ..errors import TaskExpired
from ..events import preview, rfc3339
from ..protocol import Envelope
from .middleware import Outcome, Rejection
from .observer import Observer
from .stats import Stats

__all__ = ["Held", "Tracker"]


class Held:
    """One delivery this worker holds: its envelope, queue, and when it was taken/started."""

    __slots__ = ("env", "queue", "received", "started")

    def __init__(self, env: Envelope, queue: str, received: float) -> None:
        self.env = env
        self.queue = queue
        self.received = received
        self.started: float | None = None

    def describe(self, now: float | None = None) -> dict[str, Any]:
        """The documented form (schema/control-v1.json ``$defs.held``)."""
        env = self.env
        out: dict[str, Any] = {
            "id": env.id,
            "task": env.task,
            "queue": self.queue,
            "args": preview(env.args)[0],
            "kwargs": preview(env.kwargs)[0],
            "retries": env.retries,
            "received": rfc3339(self.received),
        }
        if self.started is not None:
            out["started"] = rfc3339(self.started)
            out["runtime"] = round((now or time.time()) - self.started, 6)
        if env.expires is not None:
            out["expires"] = env.expires.isoformat()
        return out


class Tracker(Observer):
    """Reserved and active deliveries; per-task outcome counts go to :class:`Stats`."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.reserved: dict[int, Held] = {}
        self.active: dict[int, Held] = {}

    def received(self, env: Envelope, queue: str) -> None:
        self.reserved[id(env)] = Held(env, queue, time.time())

    def started(self, env: Envelope, queue: str) -> None:
        held = self.reserved.pop(id(env), None) or Held(env, queue, time.time())
        held.started = time.time()
        self.active[id(env)] = held

    def began(self, env: Envelope, queue: str) -> None:
        held = Held(env, queue, time.time())
        held.started = held.received
        self.active[id(env)] = held

    def succeeded(self, env: Envelope, queue: str, runtime: float, result: Any) -> None:
        self.active.pop(id(env), None)
        self.stats.outcomes[env.task, "succeeded"] += 1

    def failed(self, env: Envelope, queue: str, outcome: Outcome) -> None:
        self.active.pop(id(env), None)
        if outcome.retry_countdown is not None:
            what = "retried"
        elif isinstance(outcome.exc, TaskExpired):
            what = "expired"
        else:
            what = "failed"
        self.stats.outcomes[env.task, what] += 1

    def rejected(self, rejection: Rejection) -> None:
        env = rejection.envelope
        if env is not None:
            self.reserved.pop(id(env), None)
            self.active.pop(id(env), None)
        what = "expired" if rejection.reason == "expired" else "rejected"
        self.stats.outcomes[env.task if env is not None else "(undecodable)", what] += 1

    def skipped(self, env: Envelope, queue: str, reason: str, terminated: bool = False) -> None:
        self.active.pop(id(env), None)
        self.reserved.pop(id(env), None)
        self.stats.outcomes[env.task, "revoked"] += 1

    def returned(self, env: Envelope, queue: str) -> None:
        self.reserved.pop(id(env), None)
        self.active.pop(id(env), None)

    def state_of(self, task_id: str) -> tuple[str, list[Held]]:
        """``("active" | "reserved" | "unknown", holdings)`` for one task id."""
        active = [h for h in self.active.values() if h.env.id == task_id]
        if active:
            return "active", active
        reserved = [h for h in self.reserved.values() if h.env.id == task_id]
        if reserved:
            return "reserved", reserved
        return "unknown", []
