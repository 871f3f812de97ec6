"""What happens to each delivery, told by both paths — the seam events and inspect hang on.

The fast path (:mod:`.fastpath`) runs no middleware, yet events and ``inspect active`` must
see its tasks too. So both paths call one small :class:`Observer` at each step a listener
cares about, and never ask whether anybody listens: the worker installs a no-op base, or the
:class:`~.tracker.Tracker` (what ``inspect`` reports), or the events emitter, or several
through :class:`Observers`.

A delivery's story, as the observer hears it::

    received -> started -> succeeded | failed (retried when ``outcome.retry_countdown``)
    received -> rejected (dead-lettered before it ran: expired while it waited, ...)
    received -> skipped  (a ``should_run`` hook said no: a duplicate, a revoked id)
    received -> started -> skipped (revoked with ``terminate`` while it ran)
    received -> returned (back to its queue unstarted: warm shutdown)
    rejected             (dead-lettered before it was taken: undecodable, unknown task, ...)

and, from the one place that dead-letters (:mod:`.settle`), ``dead_lettered`` for every
delivery that went to its dead-letter queue, whether it ran or not.

The fast path says ``began`` (received and started at once: it only takes a delivery with a
free slot). Every call is made on the worker's event loop; observers must be quick and must
not raise (:class:`Observers` logs and swallows what one raises: a broken observer must
never keep a delivery from being settled).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from ..protocol import Envelope
from .middleware import Outcome, Rejection

__all__ = ["Observer", "Observers"]

log = logging.getLogger("amqptasks.worker")


class Observer:
    """Base class: every method is a no-op; override what a feature needs."""

    def received(self, env: Envelope, queue: str) -> None:
        """A due message of a known task was taken; it waits for a slot (it is reserved)."""

    def started(self, env: Envelope, queue: str) -> None:
        """Its task starts now."""

    def began(self, env: Envelope, queue: str) -> None:
        """Received and started at once (the fast path)."""
        self.received(env, queue)
        self.started(env, queue)

    def succeeded(self, env: Envelope, queue: str, runtime: float, result: Any) -> None:
        """The task returned."""

    def failed(self, env: Envelope, queue: str, outcome: Outcome) -> None:
        """The task raised: retried (``outcome.retry_countdown`` set) or failed for good."""

    def finished(self, env: Envelope, queue: str, outcome: Outcome) -> None:
        """The outcome of a task that ran, after the retry decision."""
        if outcome.ok:
            self.succeeded(env, queue, outcome.runtime, outcome.result)
        else:
            self.failed(env, queue, outcome)

    def rejected(self, rejection: Rejection) -> None:
        """Dead-lettered without running (``rejection.reason``: ``expired``, ...)."""

    def skipped(self, env: Envelope, queue: str, reason: str, terminated: bool = False) -> None:
        """Settled without running because a ``should_run`` hook said no — or, with
        ``terminated``, stopped while it ran (a revoke with ``terminate``)."""

    def returned(self, env: Envelope, queue: str) -> None:
        """Given back to its queue without running (a warm shutdown began, or its connection
        died before it started)."""

    def dead_lettered(self, queue: str, reason: str, env: Envelope | None) -> None:
        """Now in ``<queue>.dlq`` with ``reason`` (its copy confirmed, or rejected to the
        broker's own dead-lettering); ``env`` is None for an undecodable body."""


class Observers(Observer):
    """Tells each of several observers, in order; one that raises is logged and skipped."""

    def __init__(self, observers: Iterable[Observer]) -> None:
        self.observers = tuple(observers)

    def received(self, env: Envelope, queue: str) -> None:
        for o in self.observers:
            try:
                o.received(env, queue)
            except Exception:
                _failed(o, "received")

    def started(self, env: Envelope, queue: str) -> None:
        for o in self.observers:
            try:
                o.started(env, queue)
            except Exception:
                _failed(o, "started")

    def began(self, env: Envelope, queue: str) -> None:
        for o in self.observers:
            try:
                o.began(env, queue)
            except Exception:
                _failed(o, "began")

    def succeeded(self, env: Envelope, queue: str, runtime: float, result: Any) -> None:
        for o in self.observers:
            try:
                o.succeeded(env, queue, runtime, result)
            except Exception:
                _failed(o, "succeeded")

    def failed(self, env: Envelope, queue: str, outcome: Outcome) -> None:
        for o in self.observers:
            try:
                o.failed(env, queue, outcome)
            except Exception:
                _failed(o, "failed")

    def finished(self, env: Envelope, queue: str, outcome: Outcome) -> None:
        for o in self.observers:
            try:
                o.finished(env, queue, outcome)
            except Exception:
                _failed(o, "finished")

    def rejected(self, rejection: Rejection) -> None:
        for o in self.observers:
            try:
                o.rejected(rejection)
            except Exception:
                _failed(o, "rejected")

    def skipped(self, env: Envelope, queue: str, reason: str, terminated: bool = False) -> None:
        for o in self.observers:
            try:
                o.skipped(env, queue, reason, terminated)
            except Exception:
                _failed(o, "skipped")

    def returned(self, env: Envelope, queue: str) -> None:
        for o in self.observers:
            try:
                o.returned(env, queue)
            except Exception:
                _failed(o, "returned")

    def dead_lettered(self, queue: str, reason: str, env: Envelope | None) -> None:
        for o in self.observers:
            try:
                o.dead_lettered(queue, reason, env)
            except Exception:
                _failed(o, "dead_lettered")


def _failed(observer: Observer, step: str) -> None:
    log.exception("observer %s.%s failed", type(observer).__name__, step)
