"""Recognise a second copy of a message that carries a deterministic identity, and settle it
without running it.

Two producers in amqptasks can, in a narrow failure window, publish the same thing twice with
the same identity:

* ``amqptasks beat`` publishes each firing and its state in one transaction, so a failover does
  not publish a tick twice (see ``docs/scheduler.md``). What is left — a broker node crashing in
  the middle of that commit, or two schedulers with separate state queues — can still produce
  a second message with the same deterministic id ``<schedule>:<fire time>``
  (header ``x-amqptasks-schedule``).
* ``amqptasks dlq replay`` confirms each copy before acking its dead letter and keeps a ledger,
  but a kill -9 between a copy's confirm and its ledger line makes the next run publish that
  copy again. Both copies carry the same ``x-amqptasks-replay`` marker (a digest of the dead
  letter; see ``docs/reliability.md``).

This middleware is the worker-side backstop for both: a worker remembers the identities it has
run and skips a copy it sees again. Its reach is one worker process (memory, bounded): a copy
delivered to another worker, or after a restart, still runs. Only first attempts are considered
(``retries`` 0), and an identity is remembered only once its run succeeded (or was handed over
to a retry), so a firing or replay that failed and is replayed from its DLQ runs again, as it
should (a new dead-lettering gives a new replay marker).

The worker installs it by default and calls :meth:`Dedupe.should_run` before running.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from ..dlq import REPLAY_HEADER
from ..protocol import Envelope
from ..schedule import SCHEDULE_HEADER
from .middleware import Context, Middleware, Outcome

__all__ = ["Dedupe"]

log = logging.getLogger("amqptasks.worker")


def _identity(env: Envelope) -> str | None:
    """The deterministic identity of a first attempt, or None for an ordinary message."""
    if env.retries:
        return None
    marker = env.headers.get(REPLAY_HEADER)
    if marker:
        return f"replay:{marker.decode() if isinstance(marker, bytes) else marker}"
    if SCHEDULE_HEADER in env.headers:
        return f"schedule:{env.id}"
    return None


class Dedupe(Middleware):
    """Runs each scheduled firing and each replayed dead letter at most once per worker process.

    A copy is acked without running only once its twin *succeeded* here (or was handed to a
    retry). A copy that arrives while its twin is still running waits for the twin's outcome
    (holding its slot): acking it at once would lose the task if this process died before the
    twin finished — e.g. the broker's redelivery of a message this worker is still running
    after a reconnect.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self.skipped = 0
        self._done: OrderedDict[str, None] = OrderedDict()
        self._running: dict[str, asyncio.Event] = {}

    def wants(self, envelope: Envelope) -> bool:
        headers = envelope.headers
        return bool(headers) and (SCHEDULE_HEADER in headers or REPLAY_HEADER in headers)

    async def should_run(self, ctx: Context) -> bool:
        """False for a copy of something this worker has run: the worker acks it without
        running it. The worker calls this last of all ``should_run`` hooks, so a claim made
        here is always followed by :meth:`after_run`."""
        ident = _identity(ctx.envelope)
        if ident is None:
            return True
        while (twin := self._running.get(ident)) is not None:
            await twin.wait()  # its outcome decides: succeeded -> skip; failed -> run
        if ident in self._done:
            self.skipped += 1
            log.warning(
                "task %s[%s]: a copy of %s that already ran on this worker: settled, not run",
                ctx.envelope.task,
                ctx.envelope.id,
                ident,
            )
            return False
        self._running[ident] = asyncio.Event()
        return True

    async def after_run(self, ctx: Context, outcome: Outcome) -> None:
        ident = _identity(ctx.envelope)
        if ident is None:
            return
        claim = self._running.pop(ident, None)
        if claim is None:
            return
        if outcome.ok or outcome.retry_countdown is not None:
            self._done[ident] = None
            while len(self._done) > self.capacity:
                self._done.popitem(last=False)
        claim.set()
