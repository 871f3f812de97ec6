"""Hooks around the worker's one fixed pipeline.

decode → ``before_run`` hooks → run → ``after_run`` hooks (reverse order) → settle once.
Features (results now; retries, time limits, events later) are :class:`Middleware` subclasses
overriding typed no-op hooks — never ``if`` chains inside the worker loop. A hook that raises
is logged and skipped: a broken feature must not lose or double-settle a message.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .protocol import CONTENT_TYPE_JSON, FAILURE, SUCCESS, Envelope, Properties, Reply, encode_reply

if TYPE_CHECKING:
    from .tasks import Task

__all__ = ["Context", "Middleware", "Outcome", "Publish", "ResultsMiddleware"]

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


@dataclass(slots=True)
class Context:
    """One delivery on its way through the pipeline."""

    envelope: Envelope
    task: Task
    queue: str
    hostname: str
    extra: dict[str, Any] = field(default_factory=dict)


class Middleware:
    """Base class: every hook is a no-op; override the ones a feature needs."""

    def wants(self, envelope: Envelope) -> bool:
        """Whether this middleware has anything to do for ``envelope``. The worker's inline
        fast path (which runs no hooks) is only taken when no middleware wants a message."""
        return True

    async def should_run(self, ctx: Context) -> bool:
        """False settles the delivery (ack) without running it, e.g. a duplicate. Called after
        decoding and lookup; a delivery that passed every ``should_run`` gets ``after_run``."""
        return True

    async def before_run(self, ctx: Context) -> None:
        """Called before the task runs (after decoding and lookup)."""

    async def after_run(self, ctx: Context, outcome: Outcome) -> None:
        """Called after the task ran, before the delivery is settled. Runs in reverse order."""


class ResultsMiddleware(Middleware):
    """Answers ``reply_to`` with the documented reply (the rpc result backend).

    Tasks with ``ignore_result`` (or the config default) never reply. A reply whose caller is
    gone is unroutable: that is logged at debug level, the task's outcome stands.
    """

    def __init__(self, publish: Publish, default_ignore: bool) -> None:
        self.publish = publish
        self.default_ignore = default_ignore

    def wants(self, envelope: Envelope) -> bool:
        return envelope.reply_to is not None

    async def after_run(self, ctx: Context, outcome: Outcome) -> None:
        env = ctx.envelope
        ignore = ctx.task.ignore_result
        if not env.reply_to or (self.default_ignore if ignore is None else ignore):
            return
        if outcome.retry_countdown is not None:
            return  # not final yet: the caller hears about the last attempt only
        if outcome.ok:
            reply = Reply(env.id, SUCCESS, env.task, result=outcome.result)
        else:
            exc = outcome.exc
            reply = Reply(
                env.id,
                FAILURE,
                env.task,
                error_type=type(exc).__name__,
                error_message=str(exc),
                traceback=outcome.traceback,
            )
        props = Properties(
            content_type=CONTENT_TYPE_JSON,
            correlation_id=env.correlation_id or env.id,
            message_id=env.id,
        )
        try:
            await self.publish("", env.reply_to, encode_reply(reply), props)
        except Exception as exc:  # the caller may be gone; the task's outcome stands
            log.debug("reply for %s[%s] not delivered: %s", env.task, env.id, exc)


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
