"""Results that outlive the caller, and workflows that continue: two middlewares.

:class:`ResultsMiddleware` (installed when ``results.backend`` is a store) writes each task's
state — STARTED (opt-in ``track_started``), RETRY, and the final SUCCESS / FAILURE, or a
FAILURE with the dead-letter reason for a message that never ran — *before* the delivery is
acked, so a result is never lost to a crash between the two. It is also the fleet-wide
duplicate filter: a redelivered message (or a workflow step a crashed worker republished)
whose id already has a final state is settled with that stored outcome instead of running
again — on any worker, since the store is shared. So after a kill -9 only the tasks that were
running at that instant can run twice. A replayed dead letter (``amqptasks dlq replay``) is
the exception: a person asked for it to run again, so its stored FAILURE is forgotten first.

:class:`WorkflowMiddleware` (always installed) publishes what follows a task with workflow
links (:mod:`.workflow`). If a continuation cannot be confirmed the delivery is dead-lettered
with reason ``workflow-error``: replaying it re-runs the continuation (the task itself is not
run again when its SUCCESS is stored).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from ..config import TaskPolicy, policy_flag
from ..dlq import REPLAY_HEADER
from ..protocol import Envelope, dumps
from ..results import (
    FAILURE,
    READY_STATES,
    RETRY,
    REVOKED,
    STARTED,
    SUCCESS,
    ResultMeta,
    StoredRecord,
    encode_success,
    utcnow,
)
from .middleware import Context, Middleware, Outcome, Rejection
from .replies import REJECTION_ERRORS
from .storecalls import StoreRunner
from .workflow import ABANDONED, Workflow

__all__ = ["ResultsMiddleware", "StoredFailure", "WorkflowMiddleware", "continues"]


def continues(envelope: Envelope) -> bool:
    """Whether a message has workflow links with something to do after it: a plain group
    member carries only its ``group_id`` (the result record names it), which needs nothing
    from the workflow — so it may take the fast path, and a group of 10,000 runs at the
    fast path's rate."""
    links = envelope.links
    return bool(links) and (len(links) > 1 or "group_id" not in links)


log = logging.getLogger("amqptasks.worker")


class StoredFailure(Exception):
    """A failure read back from the store (a duplicate settled with its first outcome)."""

    def __init__(self, exc_type: str, message: str) -> None:
        super().__init__(message)
        self.exc_type = exc_type


def _error_type(exc: BaseException | None) -> str:
    return getattr(exc, "exc_type", None) or type(exc).__name__


class ResultsMiddleware(Middleware):
    """Writes task states to the result store; settles known outcomes without running."""

    def __init__(
        self,
        store: StoreRunner,
        policies: Mapping[str, TaskPolicy],
        hostname: str,
        *,
        default_ignore: bool,
        default_track_started: bool,
    ) -> None:
        self.store = store
        self.policies = policies
        self.hostname = hostname
        self.default_ignore = default_ignore
        self.default_track_started = default_track_started
        self.duplicates = 0

    def _keeps(self, task: str) -> bool:
        return not policy_flag(self.policies.get(task), "ignore_result", self.default_ignore)

    def wants(self, envelope: Envelope) -> bool:
        """The full pipeline only where the store must be asked first (a workflow step, a
        replayed copy; the fast path leaves redeliveries to the pipeline anyway) or a STARTED
        state is to be written; a plain success is stored by :meth:`fast_success`."""
        return (
            envelope.parent_id is not None
            or REPLAY_HEADER in envelope.headers
            or self._tracks_started(envelope.task)
        )

    def fast_success(
        self, envelope: Envelope, result: Any, done: Callable[[BaseException | None], None]
    ) -> bool:
        if not self._keeps(envelope.task):
            return False
        try:  # the common case, encoded in one step (see EncodedRecord for why)
            record: StoredRecord = encode_success(
                envelope.id,
                result,
                task=envelope.task,
                worker=self.hostname,
                retries=envelope.retries,
                parent_id=envelope.parent_id,
                root_id=envelope.root_id,
                group_id=envelope.links.get("group_id"),
            )
        except TypeError:  # not JSON-safe: _success stores the EncodeError FAILURE
            record = self._success(envelope, result)
        self.store.save_then(record, done)
        return True

    def _tracks_started(self, task: str) -> bool:
        return policy_flag(self.policies.get(task), "track_started", self.default_track_started)

    async def should_run(self, ctx: Context) -> bool:
        env = ctx.envelope
        replayed = REPLAY_HEADER in env.headers
        if not (ctx.redelivered or env.parent_id is not None or replayed):
            return True  # a first delivery of an original message cannot have run before
        stored: ResultMeta | None = await self.store.call(self.store.store.get, env.id)
        if stored is None or stored.status not in READY_STATES:
            return True
        if stored.status == FAILURE and (replayed or stored.reason in ABANDONED):
            # Asked to run again (a replay), or this step never ran: its FAILURE was written
            # when an earlier step failed, and its message arrives now because that step was
            # replayed and succeeded. Either way the old record must not stand in its way
            # (a READY record is never overwritten, so it is forgotten first).
            await self.store.call(self.store.store.forget, [env.id])
            return True
        self.duplicates += 1
        log.warning(
            "task %s[%s] already has a final state (%s) in the result store: settled with it, "
            "not run again",
            env.task,
            env.id,
            stored.status,
            extra={"task_id": env.id, "task_name": env.task},
        )
        if stored.status == SUCCESS:
            ctx.preset = Outcome(True, result=stored.result, preset=True)
        elif stored.status == FAILURE:
            error = StoredFailure(stored.error_type or "TaskError", stored.error_message or "")
            ctx.preset = Outcome(False, exc=error, traceback=stored.traceback, preset=True)
        return False  # REVOKED (no preset): acked, nothing more

    async def before_run(self, ctx: Context) -> None:
        if self._tracks_started(ctx.envelope.task) and self._keeps(ctx.envelope.task):
            # Not awaited: the run need not wait for it; the store thread writes in order and
            # a READY record is never replaced by this one anyway.
            self.store.save(self._meta(ctx.envelope, STARTED))

    async def after_run(self, ctx: Context, outcome: Outcome) -> None:
        env = ctx.envelope
        if not self._keeps(env.task):
            return
        if outcome.revoked:  # never started, or terminated: REVOKED, before the ack
            await self.store.save(
                self._meta(
                    env,
                    REVOKED,
                    reason="revoked",
                    error_type="TaskRevoked",
                    error_message=str(outcome.exc) if outcome.exc else "revoked",
                )
            )
            return
        if outcome.preset:
            return
        if outcome.retry_countdown is not None:
            meta = self._meta(
                env,
                RETRY,
                retries=env.retries + 1,
                error_type=_error_type(outcome.exc),
                error_message=str(outcome.exc),
            )
        elif outcome.ok:
            meta = self._success(env, outcome.result)
        else:
            meta = self._meta(
                env,
                FAILURE,
                error_type=_error_type(outcome.exc),
                error_message=str(outcome.exc),
                traceback=outcome.traceback,
            )
        await self.store.save(meta)

    async def on_reject(self, rejection: Rejection) -> None:
        env = rejection.envelope
        if env is not None and not self._keeps(env.task):
            return
        await self.store.save(
            ResultMeta(
                id=rejection.id,
                status=FAILURE,
                task=env.task if env is not None else None,
                error_type=REJECTION_ERRORS.get(rejection.reason, "Rejected"),
                error_message=rejection.detail,
                reason=rejection.reason,
                date_done=utcnow(),
                worker=self.hostname,
                parent_id=env.parent_id if env is not None else None,
                root_id=env.root_id if env is not None else None,
            )
        )

    def _success(self, env: Envelope, result: Any) -> ResultMeta:
        try:
            dumps(result)
        except TypeError as exc:  # stored as what the caller will get: an EncodeError
            return self._meta(
                env,
                FAILURE,
                error_type="EncodeError",
                error_message=f"result of type {type(result).__name__} is not "
                f"JSON-serialisable: {exc}",
            )
        return self._meta(env, SUCCESS, result=result)

    def _meta(self, env: Envelope, status: str, **fields: Any) -> ResultMeta:
        fields.setdefault("retries", env.retries)
        return ResultMeta(
            id=env.id,
            status=status,
            task=env.task,
            date_done=utcnow(),
            worker=self.hostname,
            parent_id=env.parent_id,
            root_id=env.root_id,
            group_id=env.links.get("group_id"),
            **fields,
        )


class WorkflowMiddleware(Middleware):
    """Publishes chain steps, callbacks, errbacks and chord bodies, confirmed, before the ack."""

    def __init__(self, workflow: Workflow) -> None:
        self.workflow = workflow

    def wants(self, envelope: Envelope) -> bool:
        return continues(envelope)

    async def after_run(self, ctx: Context, outcome: Outcome) -> None:
        env = ctx.envelope
        if not env.links or outcome.retry_countdown is not None:
            return
        try:
            if outcome.ok:
                await self.workflow.succeeded(env, outcome.result, env.id)
            else:
                exc = outcome.exc
                await self.workflow.failed(env, _error_type(exc), str(exc), env.id)
        except Exception as exc:
            log.error(
                "task %s[%s]: its workflow could not be continued (%s: %s); dead-lettering "
                "the message (replay continues it)",
                env.task,
                env.id,
                type(exc).__name__,
                exc,
                extra={"task_id": env.id, "task_name": env.task},
            )
            outcome.dead_letter = (
                "workflow-error",
                f"continuing the workflow failed: {type(exc).__name__}: {exc}",
            )

    async def on_reject(self, rejection: Rejection) -> None:
        env = rejection.envelope
        if env is None or not env.links:
            return
        error_type = REJECTION_ERRORS.get(rejection.reason, "Rejected")
        try:
            await self.workflow.failed(env, error_type, rejection.detail, env.id)
        except Exception:
            log.exception("task %s[%s]: its workflow could not be failed", env.task, env.id)
