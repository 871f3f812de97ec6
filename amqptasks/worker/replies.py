"""Direct reply-to answers (the ``rpc`` result backend): the caller that published a task hears
its outcome without any store.

A reply goes to the message's ``reply_to`` once the outcome is final: the task returned, or
failed for good (no retry left), or the message was dead-lettered without running — an unknown
task, an expired message, a refused content type, a body too large or undecodable. A caller
blocked in ``get()`` therefore learns at once why its task will never run, instead of waiting
for its timeout (the message itself is in the dead-letter queue).

Tasks with ``ignore_result`` (or the config default) never reply. A reply whose caller is gone
is unroutable: logged at debug level; the task's outcome stands.

The body is the documented reply (schema/reply-v1.json), or, for a Celery caller (a Celery
protocol v2 message, or a workflow step published for one), what Celery's ``rpc://`` backend
reads (:func:`amqptasks.celery_compat.encode_celery_reply`; docs/migration.md).

A plain success is answered from the worker's fast path (:meth:`ReplyMiddleware.fast_success`)
and acked once the reply's publish is confirmed, as the full pipeline does. Why: a message
with ``reply_to`` used to take the full pipeline, and a group of 10,000 (each member wants
its reply) ran at the pipeline's rate, a fifth of the fast path's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ..celery_compat import encode_celery_reply, is_celery
from ..config import policy_flag
from ..protocol import (
    CONTENT_TYPE_JSON,
    FAILURE,
    SUCCESS,
    Envelope,
    Properties,
    Reply,
    encode_reply,
    reply_format_of,
)
from .middleware import Context, Middleware, Outcome, Publish, Rejection

if TYPE_CHECKING:
    from ..config import TaskPolicy

__all__ = ["REJECTION_ERRORS", "ReplyMiddleware"]

log = logging.getLogger("amqptasks.worker")

#: The error type a caller's ``get()`` raises for each dead-letter reason of a message that
#: never ran (the name of the matching class in :mod:`amqptasks.errors`).
REJECTION_ERRORS = {
    "unknown-task": "TaskNotRegistered",
    "expired": "TaskExpired",
    "content-type-refused": "ContentTypeRefused",
    "decode-error": "DecodeError",
    "too-large": "MessageTooLarge",
    "celery-unsupported": "CeleryUnsupported",
}


def _reply_format(rejection: Rejection) -> str:
    """The reply format of a message that may not have decoded: its envelope's, else what its
    properties say (a Celery message is recognised by its headers alone)."""
    if rejection.envelope is not None:
        return rejection.envelope.reply_format
    if is_celery(rejection.properties):
        return "celery"
    try:
        return reply_format_of(rejection.properties)
    except Exception:  # the header itself is what failed to decode
        return "amqptasks"


class ReplyMiddleware(Middleware):
    """Answers ``reply_to`` with the documented reply body (schema/reply-v1.json)."""

    def __init__(
        self,
        publish: Publish,
        default_ignore: bool,
        policies: Mapping[str, TaskPolicy],
    ) -> None:
        self.publish = publish
        self.default_ignore = default_ignore
        #: The worker's merged task policies (decorator, then the YAML ``tasks:`` entry):
        #: their ``ignore_result``, for every reply (the fast path's successes included).
        self.policies = policies
        self._sending: set[asyncio.Future[None]] = set()

    def _ignores(self, task: str) -> bool:
        return policy_flag(self.policies.get(task), "ignore_result", self.default_ignore)

    def wants(self, envelope: Envelope) -> bool:
        # Never the full pipeline for a reply (the base class says True): a success is
        # answered by fast_success, a failure or retry by after_run, which runs anyway.
        return False

    def fast_success(
        self, envelope: Envelope, result: Any, done: Callable[[BaseException | None], None]
    ) -> bool:
        if not envelope.reply_to or self._ignores(envelope.task):
            return False
        reply = Reply(envelope.id, SUCCESS, envelope.task, result=result)
        sending = asyncio.ensure_future(
            self._send(
                envelope.reply_to,
                envelope.correlation_id or envelope.id,
                reply,
                envelope.reply_format,
            )
        )
        self._sending.add(sending)

        def sent(f: asyncio.Future[None]) -> None:
            self._sending.discard(f)
            if f.cancelled():  # the worker stopped first: back to the queue, answered later
                done(RuntimeError("the reply was not sent: the worker stopped"))
            else:
                done(f.exception())

        sending.add_done_callback(sent)
        return True

    async def after_run(self, ctx: Context, outcome: Outcome) -> None:
        env = ctx.envelope
        if not env.reply_to or self._ignores(env.task):
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
                error_type=getattr(exc, "exc_type", None) or type(exc).__name__,
                error_message=str(exc),
                traceback=outcome.traceback,
                reason="revoked" if outcome.revoked else None,
            )
        await self._send(
            env.reply_to, env.correlation_id or env.id, reply, env.reply_format, outcome.exc
        )

    async def on_reject(self, rejection: Rejection) -> None:
        props = rejection.properties
        if not props.reply_to:
            return
        env = rejection.envelope
        reply = Reply(
            rejection.id,
            FAILURE,
            env.task if env is not None else "",
            error_type=REJECTION_ERRORS.get(rejection.reason, "Rejected"),
            error_message=f"{rejection.detail} (dead-lettered to {rejection.queue}.dlq)",
            reason=rejection.reason,
        )
        await self._send(
            props.reply_to, props.correlation_id or rejection.id, reply, _reply_format(rejection)
        )

    async def reply_failure(
        self,
        reply_to: str,
        task_id: str,
        error_type: str,
        message: str,
        reason: str,
        reply_format: str = "amqptasks",
    ) -> None:
        """A FAILURE reply for a result that will never come (a workflow step abandoned
        because an earlier one failed), so a caller waiting on it hears at once."""
        reply = Reply(
            task_id, FAILURE, "", error_type=error_type, error_message=message, reason=reason
        )
        await self._send(reply_to, task_id, reply, reply_format)

    async def _send(
        self,
        reply_to: str,
        correlation_id: str,
        reply: Reply,
        reply_format: str = "amqptasks",
        exc: BaseException | None = None,
    ) -> None:
        props = Properties(
            content_type=CONTENT_TYPE_JSON, correlation_id=correlation_id, message_id=reply.id
        )
        if reply_format == "celery":
            # The exception as Celery sends it: its module (so a caller that has it loaded
            # gets the same class) and its args; a failure reported by a child process or read
            # from the store is known by name only.
            local = exc is not None and getattr(exc, "exc_type", None) is None
            body = encode_celery_reply(
                reply,
                exc_module=type(exc).__module__ if local else None,
                exc_args=list(exc.args) if local and exc is not None else None,
            )
        else:
            body = encode_reply(reply)
        try:
            await self.publish("", reply_to, body, props)
        except Exception as exc:  # the caller may be gone; the task's outcome stands
            log.debug("reply for %s[%s] not delivered: %s", reply.task, reply.id, exc)
