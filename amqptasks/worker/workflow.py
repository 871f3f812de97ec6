"""Continuing workflows: what a worker publishes after a task with links finished.

After a success (before the ack): the next step of the chain and the callbacks, and — for a
chord member — the chord's accounting in the store; the member whose result completes the
chord claims the body (``chord_mark_body_sent`` with its own message id as the token, so the
same message redelivered after a crash may claim it again, and no other can), then publishes
it, confirmed, under the body's id fixed when the workflow was applied. After a failure for
good: the errbacks, FAILURE records (and rpc replies) for every result of the chain that will
now never come, and for a chord member the chord's failure: the body never runs, its results
are failures naming the member, and its errbacks run once.

What to publish is decided by the pure functions of :mod:`amqptasks.canvas`; this module does
the I/O: routing each planned message like ``App.prepare`` (the worker holds an ``App`` for
that), publishing it confirmed, and talking to the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .. import canvas
from ..app import App
from ..protocol import REPLY_FORMAT_HEADER, Envelope, dumps
from ..results import FAILURE, ResultMeta, utcnow
from .middleware import Publish
from .storecalls import StoreRunner

__all__ = ["ABANDONED", "Workflow"]

#: ``reason`` of the FAILURE records written for steps that will not run because an earlier
#: step (or a chord member) failed for good: never the outcome of those steps' own messages,
#: so a replay of the failed step that succeeds runs them after all (worker/results.py).
CHAIN_FAILED, CHORD_FAILED = "chain-failed", "chord-failed"
ABANDONED = frozenset({CHAIN_FAILED, CHORD_FAILED})

log = logging.getLogger("amqptasks.worker")

#: Send a FAILURE reply for ``task_id`` to ``reply_to`` (the rpc backend's side of abandoning):
#: (reply_to, task_id, error_type, message, reason, reply_format).
ReplyFailure = Callable[[str, str, str, str, str, str], Awaitable[None]]


class Workflow:
    """Publishes the continuation of workflows for one worker."""

    def __init__(
        self,
        app: App,
        publish: Publish,
        store: StoreRunner | None,
        hostname: str,
        reply_failure: ReplyFailure | None = None,
    ) -> None:
        self.app = app
        self.publish_raw = publish
        self.store = store
        self.hostname = hostname
        self.reply_failure = reply_failure

    # -- after a task -----------------------------------------------------------------------------
    async def succeeded(self, env: Envelope, result: Any, message_token: str) -> None:
        """Publish what follows a success; raises if a publish is not confirmed (then the
        delivery is not acked and the broker gives it back: the continuation is republished
        under the same ids)."""
        links = env.links
        if not links:
            return
        await self.publish_plan(canvas.after_success(links, result), env)
        membership = links.get("chord")
        if membership is not None:
            await self._chord_member(env, membership, result, message_token)

    async def failed(
        self, env: Envelope, error_type: str, error_message: str, message_token: str
    ) -> None:
        """Publish what follows a failure for good (or a dead-lettering before the run)."""
        links = env.links
        if not links:
            return
        await self.publish_plan(canvas.after_failure(links, env.id), env)
        lost = canvas.abandoned(links)
        if lost:
            detail = f"an earlier step {env.task}[{env.id}] failed: {error_type}: {error_message}"
            await self._abandon(env, lost, error_type, detail, CHAIN_FAILED)
            # A chain in a chord's header: its last step, which will never run, was the
            # member; the chord fails for it now instead of waiting for it forever.
            for sig, member_of in canvas.abandoned_members(links):
                abandoned = self._failure(sig.options["task_id"], sig.task, error_type, detail)
                await self._chord_failed(env, dict(member_of), abandoned, message_token)
        membership = links.get("chord")
        if membership is not None:
            meta = self._failure(env.id, env.task, error_type, error_message)
            await self._chord_failed(env, membership, meta, message_token)

    def _failure(self, task_id: str, task: str, error_type: str, message: str) -> ResultMeta:
        """A chord member's failure as its chord records it."""
        return ResultMeta(
            id=task_id,
            status=FAILURE,
            task=task,
            error_type=error_type,
            error_message=message,
            date_done=utcnow(),
            worker=self.hostname,
        )

    # -- chords -----------------------------------------------------------------------------------
    def _require_store(self, env: Envelope) -> StoreRunner:
        if self.store is None:
            raise RuntimeError(
                f"task {env.task}[{env.id}] is a chord member but this worker has no result "
                "store (results.backend is rpc://): chords need sqlite:// or redis://"
            )
        return self.store

    async def _chord_member(
        self, env: Envelope, membership: dict[str, Any], result: Any, token: str
    ) -> None:
        store = self._require_store(env)
        try:
            dumps(result)
        except TypeError as exc:
            # The member's own record is this EncodeError (worker/results.py); its chord
            # cannot hold the value either, so the member failed and the chord fails for it.
            why = f"result of type {type(result).__name__} is not JSON-serialisable: {exc}"
            encode_error = self._failure(env.id, env.task, "EncodeError", why)
            await self._chord_failed(env, membership, encode_error, token)
            return
        meta = ResultMeta(
            id=env.id, status="SUCCESS", task=env.task, result=result, date_done=utcnow()
        )
        progress = await store.chord_add(
            membership["id"], membership["size"], membership["index"], meta
        )
        if progress.failed is not None or not progress.complete or progress.results is None:
            return
        # Claim the body with this message's id: a duplicate of another member cannot, while
        # this same message redelivered after a crash (claimed, body not yet published) can.
        if not await store.call(store.store.chord_mark_body_sent, membership["id"], token):
            return
        await self.publish_plan(canvas.chord_body(membership, progress.results), env)

    async def _chord_failed(
        self, env: Envelope, membership: dict[str, Any], meta: ResultMeta, token: str
    ) -> None:
        store = self._require_store(env)
        progress = await store.chord_add(
            membership["id"], membership["size"], membership["index"], meta
        )
        failed = progress.failed
        if failed is None or failed.id != meta.id:
            return  # an earlier member failed first and already failed the chord
        if not await store.call(store.store.chord_mark_body_sent, membership["id"], token):
            return
        lost, errbacks = canvas.chord_failed(membership)
        detail = (
            f"chord member {meta.task}[{meta.id}] (index {membership['index']}) failed: "
            f"{meta.error_type}: {meta.error_message}"
        )
        await self._abandon(env, lost, "ChordError", detail, CHORD_FAILED)
        await self.publish_plan(errbacks, env)

    # -- I/O --------------------------------------------------------------------------------------
    async def _abandon(
        self, env: Envelope, ids: list[str], error_type: str, detail: str, reason: str
    ) -> None:
        """FAILURE records (and rpc replies) for results that will never come."""
        if self.store is not None:
            now = utcnow()
            await asyncio.gather(
                *(
                    self.store.save(
                        ResultMeta(
                            id=i,
                            status=FAILURE,
                            error_type=error_type,
                            error_message=detail,
                            reason=reason,
                            date_done=now,
                            parent_id=env.id,
                            root_id=env.root_id or env.id,
                        )
                    )
                    for i in ids
                )
            )
        if env.reply_to and self.reply_failure is not None:
            for i in ids:
                await self.reply_failure(
                    env.reply_to, i, error_type, detail, reason, env.reply_format
                )

    async def publish_plan(self, plan: canvas.Plan, parent: Envelope) -> None:
        """Register the plan's groups, then publish its messages (all confirmed)."""
        if not plan.messages:
            return
        if plan.groups and self.store is not None:
            for group_id, ids in plan.groups:
                await self.store.call(self.store.store.save_group, group_id, ids)
        publishes: list[Awaitable[None]] = []
        for m in plan.messages:
            options = m.options
            if parent.reply_format != "amqptasks":  # a Celery caller: its steps reply alike
                headers = {
                    **(options.get("headers") or {}),
                    REPLY_FORMAT_HEADER: parent.reply_format,
                }
                options = {**options, "headers": headers}
            prepared = self.app.prepare(
                m.task,
                m.args,
                m.kwargs,
                reply_to=parent.reply_to,
                links=m.links,
                parent_id=parent.id,
                root_id=parent.root_id or parent.id,
                **options,
            )
            publishes.extend(
                self.publish_raw(ex, key, prepared.body, prepared.props)
                for ex, key in prepared.destinations
            )
        await asyncio.gather(*publishes)
