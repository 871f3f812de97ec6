"""Direct reply-to answers (the ``rpc`` result backend): the caller that published a task hears
its outcome without any store.

A reply goes to the message's ``reply_to`` once the outcome is final: the task returned, or
failed for good (no retry left), or the message was dead-lettered without running — an unknown
task, an expired message, a refused content type, a body too large or undecodable. A caller
blocked in ``get()`` therefore learns at once why its task will never run, instead of waiting
for its timeout (the message itself is in the dead-letter queue).

Tasks with ``ignore_result`` (or the config default) never reply. A reply whose caller is gone
is unroutable: logged at debug level; the task's outcome stands.
"""

from __future__ import annotations

import logging

from ..protocol import (
    CONTENT_TYPE_JSON,
    FAILURE,
    SUCCESS,
    Envelope,
    Properties,
    Reply,
    encode_reply,
)
from .middleware import Context, Middleware, Outcome, Publish, Rejection

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
}


class ReplyMiddleware(Middleware):
    """Answers ``reply_to`` with the documented reply body (schema/reply-v1.json)."""

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
                error_type=getattr(exc, "exc_type", None) or type(exc).__name__,
                error_message=str(exc),
                traceback=outcome.traceback,
                reason="revoked" if outcome.revoked else None,
            )
        await self._send(env.reply_to, env.correlation_id or env.id, reply)

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
        await self._send(props.reply_to, props.correlation_id or rejection.id, reply)

    async def reply_failure(
        self, reply_to: str, task_id: str, error_type: str, message: str, reason: str
    ) -> None:
        """A FAILURE reply for a result that will never come (a workflow step abandoned
        because an earlier one failed), so a caller waiting on it hears at once."""
        reply = Reply(
            task_id, FAILURE, "", error_type=error_type, error_message=message, reason=reason
        )
        await self._send(reply_to, task_id, reply)

    async def _send(self, reply_to: str, correlation_id: str, reply: Reply) -> None:
        props = Properties(
            content_type=CONTENT_TYPE_JSON, correlation_id=correlation_id, message_id=reply.id
        )
        try:
            await self.publish("", reply_to, encode_reply(reply), props)
        except Exception as exc:  # the caller may be gone; the task's outcome stands
            log.debug("reply for %s[%s] not delivered: %s", reply.task, reply.id, exc)
