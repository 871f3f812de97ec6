"""The worker: consume, run, settle each delivery exactly once.

One fixed pipeline per delivery (see :mod:`amqptasks.middleware`)::

    size -> decode -> lookup -> expiry -> not-yet-due? -> slot -> before_run -> run
         -> retry decision -> after_run -> settle

Settling is one of, decided in one place (:meth:`Worker._process`):

* ``ack`` — the outcome is safe: the task returned; or its retry copy / dead-letter copy /
  re-delayed copy was confirmed by the broker first;
* ``dead-letter`` — the untouched body with ``x-amqptasks-*`` reason headers is published to
  the queue's dead-letter queue, confirmed, then the delivery is acked. If that publish fails
  the delivery is rejected without requeue, so the broker's own dead-lettering
  (``x-dead-letter-exchange`` on every work queue) still lands it in the same DLQ;
* ``requeue`` — prefetched work not started when a warm shutdown begins.

Concurrency: at most ``concurrency`` tasks run at once; ``prefetch = concurrency ×
prefetch_multiplier`` deliveries may wait for a slot. ``async def`` tasks run on the event
loop; sync tasks in a thread pool, inline (``asyncio``) or in child processes.

The consuming connection is re-established with exponential backoff when it drops (broker
restart, network): consumers are re-attached to every queue; a task that was running keeps
running, and its ack (on a dead channel) is skipped — the broker already gave the delivery
back (at-least-once).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import socket
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from .config import DEFAULT_POLICY, Settings, TaskPolicy, redact_url
from .dedupe import Dedupe
from .errors import AmqpTasksError, BrokerError, ProtocolError, TimeLimitExceeded, WorkerLost
from .handoff import Handoff
from .middleware import (
    Context,
    Middleware,
    Outcome,
    ResultsMiddleware,
    run_after,
    run_before,
    run_should_run,
)
from .pool import AsyncRunner, Call, InlineRunner, Runner, ThreadRunner
from .process_pool import ProcessRunner
from .protocol import (
    BROKER_DEATH_HEADERS,
    DL_PREFIX,
    Envelope,
    dead_letter_properties,
    decode,
    encode,
)
from .retry import decide
from .tasks import BoundTask, Request, Task
from .topology import DLX_EXCHANGE, delay_route, delay_seconds
from .transport.aio import AsyncPublisher, declare_topology
from .transport.pika_consumer import PikaConsumer
from .transport.pika_consumer import PikaDelivery as Delivery

__all__ = ["Worker", "WorkerOptions", "default_hostname"]

#: A fast-path call in the thread pool: its delivery, envelope, task and start time.
_FastCall = tuple[Delivery, Envelope, Task, float]

log = logging.getLogger("amqptasks.worker")
POOLS = ("threads", "asyncio", "processes")


def _log_success(env: Envelope, runtime: float, result: Any) -> None:
    if log.isEnabledFor(logging.INFO):  # skip formatting on the hot path when not shown
        log.info("task %s[%s] succeeded in %.3fs: %.200r", env.task, env.id, runtime, result)


def _log_failure(env: Envelope, runtime: float, exc: BaseException | None) -> None:
    log.warning(
        "task %s[%s] failed in %.3fs: %s: %s", env.task, env.id, runtime, type(exc).__name__, exc
    )


def default_hostname() -> str:
    return f"amqptasks@{socket.gethostname()}"


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    queues: tuple[str, ...]
    concurrency: int = 8
    prefetch_multiplier: int = 4
    pool: str = "threads"
    hostname: str = ""
    declare: bool = True
    max_tasks_per_child: int = 0
    max_memory_per_child: int = 0  # KiB

    @property
    def prefetch(self) -> int:
        return self.concurrency * self.prefetch_multiplier


class Worker:
    """Consumes ``options.queues`` and runs ``tasks``; ``await run()`` returns an exit code."""

    def __init__(
        self,
        settings: Settings,
        tasks: Mapping[str, Task],
        options: WorkerOptions,
        middleware: Sequence[Middleware] = (),
    ) -> None:
        if options.pool not in POOLS:
            raise AmqpTasksError(
                f"pool {options.pool!r} is not available (choose from {', '.join(POOLS)})"
            )
        work = {q.name for q in settings.topology.work_queues()}
        missing = [q for q in options.queues if q not in work]
        if missing:
            declared = ", ".join(q.name for q in settings.topology.work_queues())
            raise AmqpTasksError(
                f"queue(s) {', '.join(missing)} not declared in {settings.source} "
                f"(declared: {declared})"
            )
        self.settings = settings
        self.tasks = dict(tasks)
        self.options = options
        self.hostname = options.hostname or default_hostname()
        self.policies: dict[str, TaskPolicy] = {
            name: t.policy.merged(settings.task_policy(name)).merged(DEFAULT_POLICY)
            for name, t in self.tasks.items()
        }
        self.publisher = AsyncPublisher(
            settings.broker.url,
            timeout=settings.broker.publish_timeout,
            name=f"{self.hostname} publisher",
            heartbeat=settings.broker.heartbeat,
        )
        self.consumer: PikaConsumer | None = None
        self.middleware: list[Middleware] = [
            ResultsMiddleware(self.publisher.publish, settings.results.ignore_result),
            *middleware,
            # Last, so its should_run claims a message only once every other hook said yes
            # (a claim is released by after_run, which then always follows).
            Dedupe(),
        ]
        self._async_runner = AsyncRunner()
        self._runner: Runner | None = None
        self._slots = asyncio.Semaphore(options.concurrency)
        self._stopping = asyncio.Event()
        self._done = asyncio.Event()
        self._lost = asyncio.Event()
        self._inflight: set[asyncio.Task[Any]] = set()
        self._running = 0
        self._signals = 0
        self._exit_code = 0
        self.processed = 0
        self.reconnects = 0
        #: True after a second signal: exit without waiting for running tasks.
        self.cold = False
        #: Tasks the synchronous fast path may run (see :meth:`_on_delivery`).
        self._fast_tasks: dict[str, Task] = {
            name: t
            for name, t in self.tasks.items()
            if options.pool in ("asyncio", "threads")
            and not t.is_async
            and not self.policies[name].acks_early
            and not self.policies[name].time_limit
            and not self.policies[name].soft_time_limit
        }
        #: Fast-path calls in the thread pool -> what settling them needs (loop thread only).
        self._fast_pending: dict[concurrent.futures.Future[Any], _FastCall] = {}
        #: Finished fast-path futures handed from pool threads to the loop, one wake per batch.
        self._finished: Handoff[concurrent.futures.Future[Any]] = Handoff()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Called each time every consumer is attached (the CLI prints "ready: consuming").
        self.on_ready: Callable[[], None] | None = None

    # -- start-up checks ------------------------------------------------------------------------
    def check_limits(self) -> list[str]:
        """Problems with time limits, found before consuming (not at 3 a.m.).

        A hard limit at or above the broker's ``consumer_timeout`` is refused: the broker would
        close the channel (and redeliver) before the limit fires. Limits the chosen pool cannot
        enforce are warned about.
        """
        errors = []
        timeout = self.settings.broker.consumer_timeout
        for name, policy in sorted(self.policies.items()):
            hard = policy.time_limit or 0
            if hard and hard >= timeout:
                errors.append(
                    f"task {name}: time_limit {hard:g}s is not below the broker's "
                    f"consumer_timeout ({timeout:g}s, broker.consumer_timeout)"
                )
            task = self.tasks[name]
            if (
                (hard or policy.soft_time_limit)
                and not task.is_async
                and (self.options.pool == "asyncio")
            ):
                log.warning(
                    "task %s has time limits, which --pool asyncio cannot enforce for "
                    "sync tasks (use threads or processes)",
                    name,
                )
        return errors

    def banner(self) -> str:
        s = self.settings
        sub = s.topology.subset(self.options.queues)
        extra = ""
        if self.options.pool == "processes":
            extra = (
                f" max-tasks-per-child={self.options.max_tasks_per_child or '-'} "
                f"max-memory-per-child={self.options.max_memory_per_child or '-'}KiB"
            )
        lines = [
            f"amqptasks worker {self.hostname}",
            f"  broker:      {redact_url(s.broker.url)}",
            f"  config:      {s.source}",
            f"  pool:        {self.options.pool}  concurrency={self.options.concurrency} "
            f"prefetch={self.options.prefetch} (per consumer){extra}",
            "  queues:",
        ]
        for q in self.options.queues:
            lines.append(f"    {q}  (dead letters: {q}.dlq)")
            for b in sub.bindings_of(q):
                if not b.exchange.startswith("amqptasks."):
                    lines.append(f"      <- {b.exchange} [{b.routing_key}]")
        lines.append("  tasks:")
        lines.extend(
            f"    {name}{'  (async)' if t.is_async else ''}"
            for name, t in sorted(self.tasks.items())
        )
        return "\n".join(lines)

    # -- lifecycle ------------------------------------------------------------------------------
    async def _start_runner(self) -> None:
        if self.options.pool == "threads":
            self._runner = ThreadRunner(self.options.concurrency)
            self._loop = asyncio.get_running_loop()
        elif self.options.pool == "asyncio":
            self._runner = InlineRunner()
        else:
            runner = ProcessRunner(
                self.options.concurrency,
                self.settings.imports,
                max_tasks_per_child=self.options.max_tasks_per_child,
                max_memory_per_child=self.options.max_memory_per_child,
            )
            await runner.start()
            self._runner = runner

    async def run(self) -> int:
        """Consume until a signal, reconnecting after connection loss; return the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            problems = self.check_limits()
            if problems:
                raise AmqpTasksError("refusing to start:\n  " + "\n  ".join(problems))
            await self._start_runner()
            if self.options.declare:
                await declare_topology(
                    self.settings.broker.url, self.settings.topology.subset(self.options.queues)
                )
            await self._consume_forever()
        except (BrokerError, AmqpTasksError) as exc:
            log.error("%s", exc)
            self._exit_code = 1
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self._shutdown()
        return self._exit_code

    async def _consume_forever(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            self._lost.clear()
            consumer = PikaConsumer(
                self.settings.broker.url,
                prefetch=self.options.prefetch,
                name=f"{self.hostname} consumer",
                heartbeat=self.settings.broker.heartbeat,
            )
            try:
                await consumer.connect()
                self.consumer = consumer
                consumer.add_close_callback(self._on_connection_lost)
                for q in self.options.queues:
                    await consumer.consume(q, self._on_delivery)
            except BrokerError as exc:
                await consumer.close()
                if attempt == 0 and self.reconnects == 0:
                    raise  # never connected at all: a configuration problem, say so and exit
                log.warning("reconnect failed: %s", exc)
            else:
                attempt = 0
                if self.on_ready is not None:
                    self.on_ready()
                stop = asyncio.ensure_future(self._done.wait())
                lost = asyncio.ensure_future(self._lost.wait())
                await asyncio.wait({stop, lost}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                lost.cancel()
                if self._done.is_set():
                    return
            delay = min(self.settings.broker.reconnect_max_delay, 0.5 * 2**attempt)
            attempt += 1
            self.reconnects += 1
            log.warning(
                "consuming connection lost; reconnecting in %.1fs (attempt %d)", delay, attempt
            )
            try:
                await asyncio.wait_for(self._done.wait(), delay)
                return
            except asyncio.TimeoutError:
                pass

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals == 1:
            log.warning(
                "%s: warm shutdown — finishing %d running task(s), returning the rest",
                signal.Signals(sig).name,
                self._running,
            )
            asyncio.get_running_loop().create_task(self.stop())
        else:
            log.warning(
                "%s again: cold shutdown — unfinished tasks are not acked and return to the queue",
                signal.Signals(sig).name,
            )
            self._exit_code = 1
            self.cold = True
            self._stopping.set()
            for t in list(self._inflight):
                t.cancel()
            self._done.set()

    def _on_connection_lost(self, exc: BaseException | None) -> None:
        if self._stopping.is_set():
            return
        log.error(
            "connection to the broker lost (%s); unacked messages return to their queues", exc
        )
        self._lost.set()

    async def stop(self) -> None:
        """Warm shutdown: stop consuming, let running tasks finish and settle, then exit."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self.consumer is not None:
            await self.consumer.cancel()
        for future in list(self._fast_pending):
            future.cancel()  # not started yet: requeued by its done callback
        while self._inflight or self._fast_pending:
            if self._inflight:
                await asyncio.wait(set(self._inflight), timeout=0.1)
            else:
                await asyncio.sleep(0.02)
        self._done.set()

    async def _shutdown(self) -> None:
        self._stopping.set()
        if self.consumer is not None:
            await self.consumer.close()  # anything not acked goes back to its queue
        await self.publisher.close()
        if self._runner is not None:
            self._runner.close()

    # -- the pipeline -----------------------------------------------------------------------------
    def _on_delivery(self, delivery: Delivery) -> None:
        """Called by the consumer for each delivery, on the loop, without a task.

        The common case — a sync task with no time limits, no early ack, and no middleware
        wanting the message (e.g. no reply) — runs right here inline (``--pool asyncio``) or
        goes straight to the thread pool (``threads``), without creating an asyncio task;
        everything else becomes a task running the full pipeline (:meth:`_process`). Both
        settle through the same ack window.
        """
        env: Envelope | None = None
        if not self._stopping.is_set() and len(delivery.body) <= self.settings.max_body_size:
            try:
                env = decode(delivery.body, delivery.properties, self.settings.accept)
            except Exception:
                env = None  # the full pipeline decodes again and dead-letters with the reason
        if env is None or not self._fast_run(delivery, env):
            self._spawn(self._process(delivery, env), delivery)

    def _spawn(self, work: Any, delivery: Delivery) -> None:
        task = asyncio.get_running_loop().create_task(self._guard(work, delivery))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    def _fast_run(self, delivery: Delivery, env: Envelope) -> bool:
        if (
            env.task not in self._fast_tasks
            or env.expires is not None
            or (env.eta is not None or env.links)
            or any(m.wants(env) for m in self.middleware)
        ):
            return False
        task = self._fast_tasks[env.task]
        args: tuple[Any, ...] = env.args
        if task.bind:
            request = Request(
                env.id, env.task, env.retries, delivery.queue, self.hostname, env.headers
            )
            args = (BoundTask(task, request), *args)
        start = time.perf_counter()
        if isinstance(self._runner, ThreadRunner):
            # Straight to the thread pool; the outcome comes back to the loop thread. Until a
            # thread picks it up the call is cancellable, so a warm shutdown can requeue it.
            future = self._runner.executor.submit(task.fn, *args, **env.kwargs)
            self._fast_pending[future] = (delivery, env, task, start)
            future.add_done_callback(self._thread_finished)
            return True
        try:
            result = task.fn(*args, **env.kwargs)
        except Exception as exc:
            self._fast_failed(delivery, env, task, start, exc, traceback.format_exc())
            return True
        self._fast_succeeded(delivery, env, start, result)
        return True

    def _thread_finished(self, future: concurrent.futures.Future[Any]) -> None:
        """Done callback of a fast-path call: runs in the pool thread (or on the loop when the
        call was cancelled). Queues the future and wakes the loop only if no wake is pending."""
        if self._finished.put(future):
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._settle_finished)

    def _settle_finished(self) -> None:
        for future in self._finished.take():
            delivery, env, task, start = self._fast_pending.pop(future)
            try:
                if future.cancelled():  # never started: back to the queue (warm shutdown)
                    self._spawn(self._requeue(delivery), delivery)
                    continue
                exc = future.exception()
                if exc is None:
                    self._fast_succeeded(delivery, env, start, future.result())
                else:
                    tb = "".join(traceback.format_exception(exc))
                    self._fast_failed(delivery, env, task, start, exc, tb)
            except Exception:  # one bad settle must not strand the rest of the batch
                log.exception("settling %s[%s] failed; it returns to its queue", env.task, env.id)
                self._spawn(self._requeue(delivery), delivery)

    def _fast_succeeded(self, delivery: Delivery, env: Envelope, start: float, result: Any) -> None:
        self.processed += 1
        _log_success(env, time.perf_counter() - start, result)
        delivery.ack_now()

    def _fast_failed(
        self,
        delivery: Delivery,
        env: Envelope,
        task: Task,
        start: float,
        exc: BaseException,
        tb: str,
    ) -> None:
        outcome = Outcome(False, exc=exc, traceback=tb, runtime=time.perf_counter() - start)
        _log_failure(env, outcome.runtime, exc)
        ctx = Context(env, task, delivery.queue, self.hostname)
        self._spawn(
            self._finish(
                delivery,
                env,
                task,
                self.policies[env.task],
                ctx,
                outcome,
                datetime.now(timezone.utc),
            ),
            delivery,
        )

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
            await self._reject(delivery, "<unknown>")

    async def _process(self, delivery: Delivery, env: Envelope | None = None) -> None:
        """The full pipeline; ``env`` is the envelope when the caller already decoded it."""
        if self._stopping.is_set():
            await self._requeue(delivery)
            return
        if len(delivery.body) > self.settings.max_body_size:
            await self._dead_letter(
                delivery,
                "too-large",
                f"body of {len(delivery.body)} bytes is over the limit of "
                f"{self.settings.max_body_size} (serialization.max_body_size)",
            )
            return
        now = datetime.now(timezone.utc)
        try:
            if env is None:
                env = decode(delivery.body, delivery.properties, self.settings.accept, now=now)
        except ProtocolError as exc:
            await self._dead_letter(delivery, exc.reason, str(exc))
            return
        except Exception as exc:  # the decoder must never leave a delivery unsettled
            await self._dead_letter(delivery, "decode-error", f"{type(exc).__name__}: {exc}")
            return
        task = self.tasks.get(env.task)
        if task is None:
            await self._dead_letter(
                delivery,
                "unknown-task",
                f"task {env.task!r} is not registered on worker {self.hostname}",
                env=env,
            )
            return
        if env.expires is not None and env.is_expired(now):
            await self._dead_letter(
                delivery,
                "expired",
                f"expired at {env.expires.isoformat()} before it started",
                env=env,
            )
            return
        if env.eta is not None and delay_seconds((env.eta - now).total_seconds()) >= 1:
            # Not due yet (a producer's eta, or a delay level rounding early): back to the
            # broker's delay levels, never held here.
            if await self._republish(delivery, env, delay_seconds((env.eta - now).total_seconds())):
                await self._ack(delivery)
            return
        if env.links:
            await self._dead_letter(
                delivery,
                "unsupported",
                f"workflow fields ({', '.join(sorted(env.links))}) are not supported yet",
                env=env,
            )
            return
        if not await self._slot():
            await self._requeue(delivery)
            return
        policy = self.policies[env.task]
        self._running += 1
        try:
            ctx = Context(env, task, delivery.queue, self.hostname)
            if not await run_should_run(self.middleware, ctx):
                await self._ack(delivery)  # settled without running (e.g. a duplicate)
                return
            if policy.acks_early:
                await self._ack(delivery)
            await run_before(self.middleware, ctx)
            try:
                outcome = await self._execute(task, env, delivery.queue, policy)
            except Exception as exc:  # a bug around the task: its failure, settled as one,
                # so every after_run hook (e.g. a Dedupe claim's release) still runs
                log.exception("running %s[%s] failed inside the worker", env.task, env.id)
                outcome = Outcome(False, exc=exc, traceback=traceback.format_exc())
        finally:
            self._running -= 1
            self._slots.release()
        await self._finish(delivery, env, task, policy, ctx, outcome, now)

    async def _finish(
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
        if not outcome.ok and not policy.acks_early:
            assert outcome.exc is not None
            decision = decide(policy, outcome.exc, env.retries, task.autoretry_for)
            if decision.retry:
                outcome.retry_countdown = decision.countdown
            else:
                outcome.exc = decision.exc
        await run_after(self.middleware, ctx, outcome)
        self.processed += 1
        if policy.acks_early:
            if not outcome.ok:
                log.error(
                    "task %s[%s] failed after an early ack (at-most-once): %s",
                    env.task,
                    env.id,
                    outcome.exc,
                )
            return
        if outcome.ok:
            await self._ack(delivery)
        elif outcome.retry_countdown is not None:
            log.warning(
                "task %s[%s] retry %d in %.1fs: %s",
                env.task,
                env.id,
                env.retries + 1,
                outcome.retry_countdown,
                outcome.exc,
            )
            retried = replace(env, retries=env.retries + 1, eta=None)
            if await self._republish(
                delivery, retried, delay_seconds(outcome.retry_countdown), failed_at=now
            ):
                await self._ack(delivery)
        else:
            error = outcome.exc
            reason = (
                "time-limit"
                if isinstance(error, TimeLimitExceeded)
                else "worker-lost"
                if isinstance(error, WorkerLost)
                else "task-failed"
            )
            await self._dead_letter(
                delivery,
                reason,
                f"{type(error).__name__}: {error}",
                env=env,
                exc=error,
                tb=outcome.traceback,
            )

    async def _execute(self, task: Task, env: Envelope, queue: str, policy: TaskPolicy) -> Outcome:
        request = Request(
            id=env.id,
            task=env.task,
            retries=env.retries,
            queue=queue,
            hostname=self.hostname,
            headers=env.headers,
        )
        call = Call(
            task,
            env.args,
            env.kwargs,
            request,
            soft=policy.soft_time_limit or 0.0,
            hard=policy.time_limit or 0.0,
        )
        runner = self._async_runner if task.is_async else self._runner
        assert runner is not None
        outcome = await runner.run(call)
        if outcome.ok:
            _log_success(env, outcome.runtime, outcome.result)
        else:
            _log_failure(env, outcome.runtime, outcome.exc)
        return outcome

    async def _slot(self) -> bool:
        """Wait for a free concurrency slot; False if a warm shutdown starts meanwhile."""
        if not self._slots.locked():
            await self._slots.acquire()
            return True
        acquire = asyncio.ensure_future(self._slots.acquire())
        stop = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({acquire, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if acquire.done() and not acquire.cancelled():
            if self._stopping.is_set():
                self._slots.release()
                return False
            return True
        acquire.cancel()
        return False

    # -- settling ---------------------------------------------------------------------------------
    async def _ack(self, delivery: Delivery) -> None:
        try:
            await delivery.ack()
        except Exception as exc:  # channel gone: the broker redelivers (at-least-once)
            log.error(
                "ack of a delivery on %s failed (%s); it will be redelivered", delivery.queue, exc
            )

    async def _requeue(self, delivery: Delivery) -> None:
        try:
            await delivery.requeue()
        except Exception as exc:  # the channel closes next, which requeues anyway
            log.debug("requeue failed (%s); channel close will return it", exc)

    async def _reject(self, delivery: Delivery, ident: str) -> None:
        try:
            await delivery.reject()
        except Exception as exc:
            log.error("reject of %s failed (%s); it will be redelivered", ident, exc)

    async def _republish(
        self, delivery: Delivery, env: Envelope, delay: int, *, failed_at: datetime | None = None
    ) -> bool:
        """Publish ``env`` to ``delivery.queue`` after ``delay`` s (confirmed). False when the
        copy could not be confirmed: the delivery is then rejected to its dead-letter queue."""
        headers = {k: v for k, v in env.headers.items() if not k.startswith(BROKER_DEATH_HEADERS)}
        if failed_at is not None:
            headers.setdefault(DL_PREFIX + "first-failed-at", failed_at.isoformat())
        headers.setdefault(DL_PREFIX + "original-exchange", delivery.exchange)
        headers.setdefault(DL_PREFIX + "original-routing-key", delivery.routing_key)
        body, props = encode(replace(env, headers=headers))
        exchange, key = delay_route(delivery.queue, delay) if delay >= 1 else ("", delivery.queue)
        try:
            await self.publisher.publish(exchange, key, body, props)
        except Exception as exc:
            log.error(
                "copy of %s for %s not confirmed (%s); rejecting it to the dead-letter "
                "queue instead",
                env.id,
                delivery.queue,
                exc,
            )
            await self._reject(delivery, env.id)
            return False
        return True

    async def _dead_letter(
        self,
        delivery: Delivery,
        reason: str,
        detail: str,
        *,
        env: Envelope | None = None,
        exc: BaseException | None = None,
        tb: str | None = None,
    ) -> None:
        ident = env.id if env else delivery.properties.message_id or "<no id>"
        log.error("message %s on %s dead-lettered: %s: %s", ident, delivery.queue, reason, detail)
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
        )
        try:
            await self.publisher.publish(DLX_EXCHANGE, delivery.queue, delivery.body, props)
        except Exception as pub_exc:
            log.error(
                "dead-letter copy of %s not confirmed (%s); rejecting so the broker "
                "dead-letters it instead",
                ident,
                pub_exc,
            )
            await self._reject(delivery, ident)
            return
        await self._ack(delivery)
