"""Recognise a second copy of the same scheduled firing and settle it without running it.

``amqptasks beat`` publishes each firing and its state in one transaction, so a failover does
not publish a tick twice (see ``docs/scheduler.md``). What is left — a broker node crashing in
the middle of that commit, or two schedulers with separate state queues — can still produce a
second message with the same deterministic id ``<schedule>:<fire time>``. This middleware is
the worker-side backstop for those: a worker remembers the scheduled ids it has run and skips
a copy it sees again.

Its reach is one worker process (memory, bounded): a copy delivered to another worker, or
after a restart, still runs. Only messages with the ``x-amqptasks-schedule`` header and no
retries are considered, and an id is remembered only once its run succeeded (or handed over
to a retry), so a dead-lettered firing replayed from its DLQ runs again as it should.

The worker installs it by default and calls :meth:`ScheduledDedupe.should_run` before running.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from .middleware import Context, Middleware, Outcome
from .protocol import Envelope
from .schedule import SCHEDULE_HEADER

__all__ = ["ScheduledDedupe"]

log = logging.getLogger("amqptasks.worker")


class ScheduledDedupe(Middleware):
    """Runs each scheduled firing (by message id) at most once per worker process."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self.skipped = 0
        self._done: OrderedDict[str, None] = OrderedDict()
        self._running: set[str] = set()

    def wants(self, envelope: Envelope) -> bool:
        return SCHEDULE_HEADER in envelope.headers

    @staticmethod
    def _applies(ctx: Context) -> bool:
        env = ctx.envelope
        return SCHEDULE_HEADER in env.headers and env.retries == 0

    async def should_run(self, ctx: Context) -> bool:
        """False for a copy of a firing this worker is running or has run: the worker acks it
        without running it (proposed hook, called after decode/lookup, before a slot)."""
        if not self._applies(ctx):
            return True
        ident = ctx.envelope.id
        if ident in self._done or ident in self._running:
            self.skipped += 1
            log.warning(
                "scheduled firing %s already ran on this worker: duplicate settled, not run",
                ident,
            )
            return False
        self._running.add(ident)
        return True

    async def after_run(self, ctx: Context, outcome: Outcome) -> None:
        ident = ctx.envelope.id
        if not self._applies(ctx) or ident not in self._running:
            return
        self._running.discard(ident)
        if outcome.ok or outcome.retry_countdown is not None:
            self._done[ident] = None
            while len(self._done) > self.capacity:
                self._done.popitem(last=False)
