"""The worker's one fixed pipeline for a delivery that does not take the fast path::

    stopping? -> size -> decode -> lookup -> expiry -> not-yet-due? -> rate limit -> slot
      -> expiry again -> should_run -> (early ack) -> before_run -> run -> retry decision
      -> after_run -> settle

(``should_run`` may answer with a known outcome instead — a duplicate whose result is stored,
a revoked id — which then goes through the retry-less rest of the pipeline as if the task had
just run.) The rate-limit stage (:mod:`.throttle`) waits for the task's token *before* a
concurrency slot is taken, so a throttled delivery never holds a slot while it waits; it only
holds its place in the prefetch the user configured. A running call is registered while it
runs, so a revoke with ``terminate`` can stop it (:meth:`Pipeline.terminate`).

Each step either passes the delivery on or settles it (through :class:`.settle.Settler`), so a
delivery is settled exactly once. Expiry is checked again once a concurrency slot is free: a
message can wait behind long tasks for longer than its ``expires`` allows, and a task must not
start after its deadline (the process pool checks a third time, when a child is free).
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from ..celery_compat import decode_any
from ..config import Settings, TaskPolicy
from ..errors import ProtocolError, TaskExpired, TaskRevoked
from ..protocol import Envelope
from ..tasks import Request, Task
from ..topology import delay_seconds
from ..transport.pika_consumer import PikaDelivery as Delivery
from .middleware import Context, Middleware, Outcome, run_after, run_before, run_should_run
from .observer import Observer
from .pool import AsyncRunner, Call, Runner
from .retry import decide
from .settle import Settler
from .slots import Slots
from .stats import Stats
from .throttle import Throttle

__all__ = ["Pipeline", "log_failure", "log_success", "revoked_outcome"]

log = logging.getLogger("amqptasks.worker")


def revoked_outcome(env: Envelope, runtime: float, *, started: bool, how: str = "") -> Outcome:
    """The outcome of a call a revoke with terminate stopped (``started``: it was running,
    else it never began), logged: settled REVOKED by :meth:`Pipeline.finish`, whichever path
    (the pipeline's runners, the fast path's threads) stopped it."""
    what = "terminated" if started else "not started"
    log.warning(
        "task %s[%s] %s after %.3fs: it was revoked%s",
        env.task,
        env.id,
        what,
        runtime,
        how,
        extra={"task_id": env.id, "task_name": env.task},
    )
    return Outcome(
        False,
        exc=TaskRevoked(f"task {env.task}[{env.id}] was revoked ({what})"),
        traceback="",
        runtime=runtime,
        revoked=True,
        terminated=started,
    )


def log_success(env: Envelope, runtime: float, result: Any) -> None:
    if log.isEnabledFor(logging.INFO):  # skip formatting on the hot path when not shown
        log.info(
            "task %s[%s] succeeded in %.3fs: %.200r",
            env.task,
            env.id,
            runtime,
            result,
            extra={"task_id": env.id, "task_name": env.task},
        )


def log_failure(env: Envelope, runtime: float, exc: BaseException | None) -> None:
    log.warning(
        "task %s[%s] failed in %.3fs: %s: %s",
        env.task,
        env.id,
        runtime,
        type(exc).__name__,
        exc,
        extra={"task_id": env.id, "task_name": env.task},
    )


class Pipeline:
    """Runs deliveries through the full pipeline, at most ``concurrency`` tasks at once."""

    def __init__(
        self,
        settings: Settings,
        tasks: Mapping[str, Task],
        policies: Mapping[str, TaskPolicy],
        hostname: str,
        middleware: list[Middleware],
        settler: Settler,
        stats: Stats,
        *,
        concurrency: int,
        stopping: asyncio.Event,
    ) -> None:
        self.settings = settings
        self.tasks = tasks
        self.policies = policies
        self.hostname = hostname
        self.middleware = middleware
        self.settler = settler
        self.stats = stats
        self.stopping = stopping
        self.runner: Runner | None = None
        self.async_runner = AsyncRunner()
        self.inflight: set[asyncio.Task[Any]] = set()
        self.slots = Slots(concurrency)
        self.observer: Observer = Observer()  # events and inspect (set by the Worker)
        self.throttle = Throttle()  # no rate limits (the Worker sets the real one)
        #: Calls running now, by id() (a revoke with terminate stops them).
        self.calls: dict[int, Call] = {}

    # -- tasks on the loop ----------------------------------------------------------------------
    def spawn(self, work: Any, delivery: Delivery) -> None:
        """Run ``work`` (a coroutine settling ``delivery``) as a task the worker waits for."""
        task = asyncio.get_running_loop().create_task(self._guard(work, delivery))
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)

    async def _guard(self, work: Any, delivery: Delivery) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not leave the delivery unsettled silently
            log.exception(
                "unexpected error processing a delivery on %s; rejecting it to its "
                "dead-letter queue",
                delivery.queue,
            )
            await self.settler.reject(delivery, "<unknown>")

    # -- the pipeline ---------------------------------------------------------------------------
    async def process(self, delivery: Delivery, env: Envelope | None = None) -> None:
        """The full pipeline; ``env`` is the envelope when the caller already decoded it."""
        settler = self.settler
        if self.stopping.is_set():
            await settler.requeue(delivery)
            return
        if len(delivery.body) > self.settings.max_body_size:
            await settler.dead_letter(
                delivery,
                "too-large",
                f"body of {len(delivery.body)} bytes is over the limit of "
                f"{self.settings.max_body_size} (serialization.max_body_size)",
            )
            return
        now = datetime.now(timezone.utc)
        try:
            if env is None:
                env = decode_any(
                    delivery.body,
                    delivery.properties,
                    self.settings.accept,
                    now=now,
                    celery_ingest=self.settings.celery_ingest,
                    chords=self.settings.results.has_store,
                )
        except ProtocolError as exc:
            await settler.dead_letter(delivery, exc.reason, str(exc))
            return
        except Exception as exc:  # the decoder must never leave a delivery unsettled
            await settler.dead_letter(delivery, "decode-error", f"{type(exc).__name__}: {exc}")
            return
        task = self.tasks.get(env.task)
        if task is None:
            await settler.dead_letter(
                delivery,
                "unknown-task",
                f"task {env.task!r} is not registered on worker {self.hostname}",
                env=env,
            )
            return
        if env.is_expired(now):
            await self._expired(delivery, env, "before it started")
            return
        if env.eta is not None and delay_seconds((env.eta - now).total_seconds()) >= 1:
            # Not due yet (a producer's eta, or a delay level rounding early): back to the
            # broker's delay levels, never held here.
            if await settler.republish(
                delivery, env, delay_seconds((env.eta - now).total_seconds())
            ):
                await settler.ack(delivery)
            return
        self.observer.received(env, delivery.queue)
        if env.task in self.throttle.limited and not await self.throttle.admit(env, self.stopping):
            self.observer.returned(env, delivery.queue)
            await settler.requeue(delivery)  # a warm shutdown began while it waited
            return
        if not await self.slots.take(self.stopping):
            self.observer.returned(env, delivery.queue)
            await settler.requeue(delivery)
            return
        if delivery.stale:  # its connection died while it waited: the broker has it again
            self.slots.release()
            self.observer.returned(env, delivery.queue)
            return
        if env.is_expired(datetime.now(timezone.utc)):
            self.slots.release()
            await self._expired(delivery, env, "while it waited for a free slot")
            return
        policy = self.policies[env.task]
        self.stats.running += 1
        try:
            ctx = Context(env, task, delivery.queue, self.hostname, delivery.redelivered)
            if not await run_should_run(self.middleware, ctx):
                if ctx.preset is None:
                    skip = ctx.extra.get("skip", "duplicate")
                    self.observer.skipped(env, delivery.queue, skip)
                    await settler.ack(delivery)  # settled without running (e.g. a duplicate)
                    return
                outcome = ctx.preset  # its outcome is known: settled with it, not run
            else:
                if policy.acks_early:
                    await settler.ack(delivery)
                await run_before(self.middleware, ctx)
                self.observer.started(env, delivery.queue)
                try:
                    outcome = await self._execute(task, env, delivery.queue, policy)
                except Exception as exc:  # a bug around the task: its failure, settled as
                    # one, so every after_run hook (e.g. a Dedupe claim's release) still runs
                    log.exception("running %s[%s] failed inside the worker", env.task, env.id)
                    outcome = Outcome(False, exc=exc, traceback=traceback.format_exc())
        finally:
            self.stats.running -= 1
            self.slots.release()
        await self.finish(delivery, env, task, policy, ctx, outcome, now)

    def terminate(self, ids: set[str], *, running: bool = True) -> list[str]:
        """Stop the calls of task ``ids`` (a revoke with terminate); with ``running=False``
        only those that have not started yet (a child process was not free): a revoked id
        must not start. Returns the ids of the calls stopped."""
        stopped = []
        for call in list(self.calls.values()):
            if (
                call.request.id in ids
                and not call.terminated
                and (running or not call.started)
                and call.stop()
            ):
                stopped.append(call.request.id)
        return stopped

    async def _expired(self, delivery: Delivery, env: Envelope, when: str) -> None:
        assert env.expires is not None
        await self.settler.dead_letter(
            delivery, "expired", f"expired at {env.expires.isoformat()} {when}", env=env
        )

    async def finish(
        self,
        delivery: Delivery,
        env: Envelope,
        task: Task,
        policy: TaskPolicy,
        ctx: Context,
        outcome: Outcome,
        now: datetime,
    ) -> None:
        """Retry decision, ``after_run`` hooks, then settle: the one place a ran task's
        delivery is settled."""
        if outcome.revoked:
            self.observer.skipped(env, delivery.queue, "revoked", outcome.terminated)
            await run_after(self.middleware, ctx, outcome)
            if outcome.terminated:
                self.stats.processed += 1
            await self.settler.settle(delivery, env, policy, outcome, now)
            return
        if (
            not outcome.ok
            and not outcome.preset
            and not policy.acks_early
            and not isinstance(outcome.exc, TaskExpired)
        ):
            assert outcome.exc is not None
            decision = decide(policy, outcome.exc, env.retries, task.autoretry_for)
            if decision.retry:
                outcome.retry_countdown = decision.countdown
            else:
                outcome.exc = decision.exc
        self.observer.finished(env, delivery.queue, outcome)
        await run_after(self.middleware, ctx, outcome)
        self.stats.processed += 1
        await self.settler.settle(delivery, env, policy, outcome, now)

    async def _execute(self, task: Task, env: Envelope, queue: str, policy: TaskPolicy) -> Outcome:
        request = Request(
            id=env.id,
            task=env.task,
            retries=env.retries,
            queue=queue,
            hostname=self.hostname,
            headers=env.headers,
        )
        # A message's own limits (Celery's timelimit header) win over the task's, as in
        # Celery. Each limit comes from its own source, so a soft limit can end up at or
        # above the hard one (a task's soft 30 s under a worker's --time-limit 2): it could
        # never fire first, and the runners would wait for it before the hard one.
        soft = env.soft_time_limit or policy.soft_time_limit or 0.0
        hard = env.time_limit or policy.time_limit or 0.0
        if hard and soft >= hard:
            soft = 0.0
        call = Call(task, env.args, env.kwargs, request, soft=soft, hard=hard, expires=env.expires)
        runner = self.async_runner if task.is_async else self.runner
        assert runner is not None
        self.calls[id(call)] = call
        try:
            outcome = await runner.run(call)
        finally:
            self.calls.pop(id(call), None)
        if call.terminated:
            return revoked_outcome(env, outcome.runtime, started=call.started)
        if outcome.ok:
            log_success(env, outcome.runtime, outcome.result)
        else:
            log_failure(env, outcome.runtime, outcome.exc)
        return outcome
