"""Settlement: the only code that acks, rejects, requeues or republishes a delivery.

Every path through the worker ends here, exactly once per delivery:

* ``ack`` — the outcome is safe: the task returned; or its retry copy / dead-letter copy /
  re-delayed copy was confirmed by the broker first;
* ``dead-letter`` — the untouched body with ``x-amqptasks-*`` reason headers is published to
  the queue's dead-letter queue, confirmed, then the delivery is acked. If that publish fails
  the delivery is rejected without requeue, so the broker's own dead-lettering
  (``x-dead-letter-exchange`` on every work queue) still lands it in the same DLQ;
* ``requeue`` — prefetched work not started when a warm shutdown begins.

A failed ack (the channel died) is only logged: the broker redelivers what was not acked, which
is the at-least-once contract.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime, timezone

from ..celery_compat import encode_any, message_id_of
from ..config import TaskPolicy
from ..errors import TaskExpired, TimeLimitExceeded, WorkerLost
from ..protocol import (
    BROKER_DEATH_HEADERS,
    DEAD_LETTER_REASONS,
    DL_PREFIX,
    Envelope,
    dead_letter_properties,
    new_id,
)
from ..topology import DLX_EXCHANGE, delay_route, delay_seconds
from ..transport.pika_consumer import PikaDelivery as Delivery
from .middleware import Middleware, Outcome, Publish, Rejection, run_on_reject
from .observer import Observer

__all__ = ["Settler", "failure_reason"]

log = logging.getLogger("amqptasks.worker")


def failure_reason(error: BaseException | None) -> str:
    """The dead-letter reason of a task that ran and failed for good."""
    if isinstance(error, TimeLimitExceeded):
        return "time-limit"
    if isinstance(error, WorkerLost):
        return "worker-lost"
    if isinstance(error, TaskExpired):
        return "expired"
    return "task-failed"


class Settler:
    """Acks, rejects, requeues, retries and dead-letters deliveries for one worker."""

    def __init__(self, publish: Publish, hostname: str, middleware: list[Middleware]) -> None:
        self.publish = publish
        self.hostname = hostname
        self.middleware = middleware
        self.observer: Observer = Observer()  # events and inspect (set by the Worker)

    async def ack(self, delivery: Delivery) -> None:
        try:
            await delivery.ack()
        except Exception as exc:  # channel gone: the broker redelivers (at-least-once)
            log.error(
                "ack of a delivery on %s failed (%s); it will be redelivered", delivery.queue, exc
            )

    async def requeue(self, delivery: Delivery) -> None:
        try:
            await delivery.requeue()
        except Exception as exc:  # the channel closes next, which requeues anyway
            log.debug("requeue failed (%s); channel close will return it", exc)

    async def reject(self, delivery: Delivery, ident: str) -> None:
        try:
            await delivery.reject()
        except Exception as exc:
            log.error("reject of %s failed (%s); it will be redelivered", ident, exc)

    async def settle(
        self,
        delivery: Delivery,
        env: Envelope,
        policy: TaskPolicy,
        outcome: Outcome,
        now: datetime,
    ) -> None:
        """Settle a delivery whose task ran: ack, retry copy then ack, or dead-letter (a
        revoked one, ran or not, is acked: its REVOKED state is the record of it)."""
        if outcome.revoked:
            await self.ack(delivery)  # also after an early ack: the window acks a tag once
            return
        if policy.acks_early:
            if not outcome.ok:
                log.error(
                    "task %s[%s] failed after an early ack (at-most-once): %s",
                    env.task,
                    env.id,
                    outcome.exc,
                    extra={"task_id": env.id, "task_name": env.task},
                )
            return
        if outcome.dead_letter is not None:
            reason, detail = outcome.dead_letter
            await self.dead_letter(delivery, reason, detail, env=env, ran=True)
        elif outcome.ok:
            await self.ack(delivery)
        elif outcome.retry_countdown is not None:
            log.warning(
                "task %s[%s] retry %d in %.1fs: %s",
                env.task,
                env.id,
                env.retries + 1,
                outcome.retry_countdown,
                outcome.exc,
                extra={"task_id": env.id, "task_name": env.task},
            )
            retried = replace(env, retries=env.retries + 1, eta=None)
            if await self.republish(
                delivery, retried, delay_seconds(outcome.retry_countdown), failed_at=now
            ):
                await self.ack(delivery)
        else:
            error = outcome.exc
            await self.dead_letter(
                delivery,
                failure_reason(error),
                f"{type(error).__name__}: {error}",
                env=env,
                exc=error,
                tb=outcome.traceback,
                ran=True,
            )

    async def republish(
        self, delivery: Delivery, env: Envelope, delay: int, *, failed_at: datetime | None = None
    ) -> bool:
        """Publish ``env`` to ``delivery.queue`` after ``delay`` s (confirmed). False when the
        copy could not be confirmed: the delivery is then rejected to its dead-letter queue."""
        headers = {k: v for k, v in env.headers.items() if not k.startswith(BROKER_DEATH_HEADERS)}
        if failed_at is not None:
            headers.setdefault(DL_PREFIX + "first-failed-at", failed_at.isoformat())
        headers.setdefault(DL_PREFIX + "original-exchange", delivery.exchange)
        headers.setdefault(DL_PREFIX + "original-routing-key", delivery.routing_key)
        # In the format it came in: a Celery message stays Celery's (its time limits and
        # workflow travel with it; docs/migration.md).
        body, props = encode_any(replace(env, headers=headers))
        exchange, key = delay_route(delivery.queue, delay) if delay >= 1 else ("", delivery.queue)
        try:
            await self.publish(exchange, key, body, props)
        except Exception as exc:
            log.error(
                "copy of %s for %s not confirmed (%s); rejecting it to the dead-letter "
                "queue instead",
                env.id,
                delivery.queue,
                exc,
            )
            await self.reject(delivery, env.id)
            return False
        return True

    async def dead_letter(
        self,
        delivery: Delivery,
        reason: str,
        detail: str,
        *,
        env: Envelope | None = None,
        exc: BaseException | None = None,
        tb: str | None = None,
        ran: bool = False,
    ) -> None:
        """Publish the dead-letter copy (confirmed), tell the ``on_reject`` hooks when the
        message never ran, then ack; reject to the broker's own dead-lettering if the copy
        cannot be confirmed."""
        # One id in the log, the dead letter and `amqptasks dlq`: the decoder's rule, and a
        # generated id is written onto the copy so it stays the same everywhere.
        assert reason in DEAD_LETTER_REASONS, f"undocumented dead-letter reason {reason!r}"
        ident = env.id if env else message_id_of(delivery.body, delivery.properties) or new_id()
        log.error(
            "message %s on %s dead-lettered: %s: %s",
            ident,
            delivery.queue,
            reason,
            detail,
            extra={"task_id": ident, "task_name": env.task if env else None},
        )
        exc_type = getattr(exc, "exc_type", None) or (type(exc).__name__ if exc else None)
        props = dead_letter_properties(
            delivery.properties,
            reason=reason,
            detail=detail,
            queue=delivery.queue,
            exchange=delivery.exchange,
            routing_key=delivery.routing_key,
            hostname=self.hostname,
            failed_at=datetime.now(timezone.utc),
            exc_type=exc_type,
            exc_message=str(exc) if exc is not None else None,
            traceback=tb,
            attempts=(env.retries + 1) if env else 1,
            message_id=ident,
        )
        try:
            await self.publish(DLX_EXCHANGE, delivery.queue, delivery.body, props)
            confirmed = True
        except Exception as pub_exc:
            log.error(
                "dead-letter copy of %s not confirmed (%s); rejecting so the broker "
                "dead-letters it instead",
                ident,
                pub_exc,
            )
            await self.reject(delivery, ident)
            confirmed = False
        self.observer.dead_lettered(delivery.queue, reason, env)
        if not ran:  # either way it is in the dead-letter queue now, or about to be
            rejection = Rejection(
                ident, reason, detail, delivery.queue, self.hostname, delivery.properties, env
            )
            self.observer.rejected(rejection)
            await run_on_reject(self.middleware, rejection)
        if confirmed:
            await self.ack(delivery)
