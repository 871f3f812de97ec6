"""Hooks around the worker's one fixed pipeline.

decode → ``should_run`` → ``before_run`` hooks → run → ``after_run`` hooks (reverse order) →
settle once. A message settled to its dead-letter queue *without running* (undecodable, unknown
task, expired, refused content type, too large) goes to ``on_reject`` instead, after its
dead-letter copy is confirmed and before the ack.

Features (replies, results, events, ...) are :class:`Middleware` subclasses overriding typed
no-op hooks — never ``if`` chains inside the worker loop. A hook that raises is logged and
skipped: a broken feature must not lose or double-settle a message.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..protocol import Envelope, Properties

if TYPE_CHECKING:
    from ..tasks import Task

__all__ = [
    "Context",
    "Middleware",
    "Outcome",
    "Publish",
    "Rejection",
    "run_after",
    "run_before",
    "run_on_reject",
    "run_should_run",
]

log = logging.getLogger("amqptasks.worker")

#: (exchange, routing_key, body, properties) -> awaitable confirmed publish.
Publish = Callable[[str, str, bytes, Properties], Awaitable[None]]


@dataclass(slots=True)
class Outcome:
    """What running a task produced."""

    ok: bool
    result: Any = None
    exc: BaseException | None = None
    traceback: str | None = None
    runtime: float = 0.0
    #: Set by the retry decision: the task runs again after this many seconds.
    retry_countdown: float | None = None
    #: The outcome was known before running (a duplicate settled with its stored outcome):
    #: no retry decision, nothing to store again.
    preset: bool = False
    #: Set by an ``after_run`` hook whose part of settling failed (e.g. a workflow step that
    #: could not be published): the delivery is dead-lettered with (reason, detail), not acked.
    dead_letter: tuple[str, str] | None = None
    #: The task id is revoked: settled as REVOKED (acked, no retry, no dead letter), whether
    #: it never started or was stopped while it ran (``terminated``).
    revoked: bool = False
    terminated: bool = False


@dataclass(slots=True)
class Context:
    """One delivery on its way through the pipeline."""

    envelope: Envelope
    task: Task
    queue: str
    hostname: str
    #: The broker delivered this message before (a worker died or lost its connection).
    redelivered: bool = False
    #: A ``should_run`` hook that returns False may set the outcome to settle with instead
    #: of running (e.g. the stored outcome of a duplicate); None settles with a plain ack.
    preset: Outcome | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A message dead-lettered before it ran: why, and what is known of it.

    ``envelope`` is None when the body could not be decoded; ``properties`` are always there
    (a reply can still be addressed with their ``reply_to`` and ``correlation_id``).
    """

    id: str
    reason: str
    detail: str
    queue: str
    hostname: str
    properties: Properties
    envelope: Envelope | None = None


class Middleware:
    """Base class: every hook is a no-op; override the ones a feature needs."""

    def wants(self, envelope: Envelope) -> bool:
        """Whether this middleware has anything to do for ``envelope``. The worker's inline
        fast path (which runs no hooks) is only taken when no middleware wants a message."""
        return True

    async def should_run(self, ctx: Context) -> bool:
        """False settles the delivery without running it: with ``ctx.preset`` when set (then
        ``after_run`` hooks see that outcome), else with an ack (e.g. a duplicate). Called after
        decoding and lookup; a delivery that passed every ``should_run`` gets ``after_run``.
        A hook saying no may put why in ``ctx.extra["skip"]``: the ``task-revoked`` event's
        reason (``duplicate`` when unset)."""
        return True

    async def before_run(self, ctx: Context) -> None:
        """Called before the task runs (after decoding and lookup)."""

    async def after_run(self, ctx: Context, outcome: Outcome) -> None:
        """Called after the task ran, before the delivery is settled. Runs in reverse order."""

    async def on_reject(self, rejection: Rejection) -> None:
        """Called when a message was dead-lettered without running, before its ack."""

    def fast_success(
        self, envelope: Envelope, result: Any, done: Callable[[BaseException | None], None]
    ) -> bool:
        """The fast path's ``after_run`` for a success (a message no middleware ``wants``):
        called on the loop, synchronously. True means the delivery must wait for this hook
        (e.g. the result being stored): it is acked only once ``done(None)`` was called, and
        given back to its queue on ``done(exc)``; call ``done`` exactly once, on the loop,
        never before returning. A callback, not an awaitable: a future's done callback costs
        one more loop pass before the ack. Failures always go through the full ``after_run``
        hooks."""
        return False


async def run_should_run(middleware: list[Middleware], ctx: Context) -> bool:
    """False as soon as one middleware says so; a hook that raises counts as True (a broken
    hook must never drop work)."""
    for m in middleware:
        try:
            if not await m.should_run(ctx):
                return False
        except Exception:
            log.exception("middleware %s.should_run failed", type(m).__name__)
    return True


async def run_before(middleware: list[Middleware], ctx: Context) -> None:
    for m in middleware:
        try:
            await m.before_run(ctx)
        except Exception:
            log.exception("middleware %s.before_run failed", type(m).__name__)


async def run_after(middleware: list[Middleware], ctx: Context, outcome: Outcome) -> None:
    for m in reversed(middleware):
        try:
            await m.after_run(ctx, outcome)
        except Exception:
            log.exception("middleware %s.after_run failed", type(m).__name__)


async def run_on_reject(middleware: list[Middleware], rejection: Rejection) -> None:
    for m in reversed(middleware):
        try:
            await m.on_reject(rejection)
        except Exception:
            log.exception("middleware %s.on_reject failed", type(m).__name__)
