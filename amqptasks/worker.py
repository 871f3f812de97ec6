"""The worker: consume, run, settle each delivery exactly once.

One fixed pipeline per delivery (see :mod:`amqptasks.middleware`)::

    decode -> lookup -> wait for a slot -> before_run -> run -> after_run -> settle

Settling is in one place, :meth:`Worker._settle`, and is one of:

* ``ack`` — the outcome is safe (task returned; or its dead-letter copy is confirmed);
* ``dead-letter`` — publish the untouched body with ``x-amqptasks-*`` reason headers to the
  queue's dead-letter queue, wait for the confirm, then ack. If that publish fails the delivery
  is rejected without requeue, so the broker's own dead-lettering (``x-dead-letter-exchange``
  on every work queue) still lands it in the same DLQ — never acked-and-dropped, never
  requeued forever;
* ``requeue`` — work prefetched but not started when a warm shutdown begins.

Concurrency: at most ``concurrency`` tasks run at once; ``prefetch = concurrency ×
prefetch_multiplier`` deliveries may wait for a slot. ``async def`` tasks run on the event
loop; sync tasks run in a thread pool (``pool="threads"``) or inline on the loop
(``pool="asyncio"``, for tasks that never block).
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
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from typing import Any

from .config import Settings, redact_url
from .errors import AmqpTasksError, BrokerError, ProtocolError
from .middleware import Context, Middleware, Outcome, ResultsMiddleware, run_after, run_before
from .protocol import Envelope, dead_letter_properties, decode
from .tasks import Task
from .topology import DLX_EXCHANGE
from .transport.aio import AsyncConsumer, AsyncPublisher, Delivery, declare_topology

__all__ = ["Worker", "WorkerOptions", "default_hostname"]

log = logging.getLogger("amqptasks.worker")
POOLS = ("threads", "asyncio")


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

    @property
    def prefetch(self) -> int:
        return self.concurrency * self.prefetch_multiplier


class Worker:
    """Consumes ``options.queues`` and runs ``tasks``; ``await run()`` returns an exit code."""

    def __init__(
        self,
        settings: Settings,
        tasks: Mapping[str, Task[Any, Any]],
        options: WorkerOptions,
        middleware: Sequence[Middleware] = (),
    ) -> None:
        if options.pool not in POOLS:
            raise AmqpTasksError(
                f"pool {options.pool!r} is not available (choose from {', '.join(POOLS)})"
            )
        missing = [q for q in options.queues if settings.topology.queue(q) is None]
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
        url = settings.broker.url
        self.consumer = AsyncConsumer(
            url, prefetch=options.prefetch, name=f"{self.hostname} consumer"
        )
        self.publisher = AsyncPublisher(
            url, timeout=settings.broker.publish_timeout, name=f"{self.hostname} publisher"
        )
        self.middleware: list[Middleware] = [
            ResultsMiddleware(self.publisher.publish, settings.results.ignore_result),
            *middleware,
        ]
        self._slots = asyncio.Semaphore(options.concurrency)
        self._stopping = asyncio.Event()
        self._done = asyncio.Event()
        self._inflight: set[asyncio.Task[Any]] = set()
        self._running = 0
        self._signals = 0
        self._exit_code = 0
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.processed = 0
        #: Called once every consumer is attached (the CLI prints "ready: consuming ...").
        self.on_ready: Callable[[], None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def banner(self) -> str:
        s = self.settings
        sub = s.topology.subset(self.options.queues)
        lines = [
            f"amqptasks worker {self.hostname}",
            f"  broker:      {redact_url(s.broker.url)}",
            f"  config:      {s.source}",
            f"  pool:        {self.options.pool}  concurrency={self.options.concurrency} "
            f"prefetch={self.options.prefetch} (per consumer)",
            "  queues:",
        ]
        for q in self.options.queues:
            lines.append(f"    {q}  (dead letters: {q}.dlq)")
            for b in sub.bindings_of(q):
                lines.append(f"      <- {b.exchange} [{b.routing_key}]")
        lines.append("  tasks:")
        lines.extend(
            f"    {name}{'  (async)' if t.is_async else ''}"
            for name, t in sorted(self.tasks.items())
        )
        return "\n".join(lines)

    async def run(self) -> int:
        """Connect, consume until a signal (or a lost connection), drain, return exit code."""
        loop = asyncio.get_running_loop()
        if self.options.pool == "threads":
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self.options.concurrency, thread_name_prefix="amqptasks-task"
            )
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            if self.options.declare:
                await declare_topology(
                    self.settings.broker.url, self.settings.topology.subset(self.options.queues)
                )
            await self.consumer.connect()
            self.consumer.add_close_callback(self._on_connection_lost)
            for q in self.options.queues:
                await self.consumer.consume(q, self._handle)
            if self.on_ready is not None:
                self.on_ready()
            await self._done.wait()
        except (BrokerError, AmqpTasksError) as exc:
            log.error("%s", exc)
            self._exit_code = 1
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self._shutdown()
        return self._exit_code

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
            for t in list(self._inflight):
                t.cancel()
            self._done.set()

    def _on_connection_lost(self, exc: BaseException | None) -> None:
        if self._stopping.is_set():
            return
        log.error(
            "connection to the broker lost (%s); unacked messages return to their "
            "queues; exiting so a supervisor can restart the worker",
            exc,
        )
        self._exit_code = 1
        self._stopping.set()
        self._done.set()

    async def stop(self) -> None:
        """Warm shutdown: stop consuming, let running tasks finish and settle, then exit."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        await self.consumer.cancel()
        while self._inflight:
            await asyncio.wait(set(self._inflight))
        self._done.set()

    async def _shutdown(self) -> None:
        self._stopping.set()
        await self.consumer.close()  # anything not acked goes back to its queue
        await self.publisher.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the pipeline -----------------------------------------------------------------------------
    async def _handle(self, delivery: Delivery) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        try:
            await self._process(delivery)
        finally:
            if task is not None:
                self._inflight.discard(task)

    async def _process(self, delivery: Delivery) -> None:
        if self._stopping.is_set():
            await self._requeue(delivery)
            return
        now = datetime.now(timezone.utc)
        try:
            env = decode(delivery.body, delivery.properties, self.settings.accept, now=now)
        except ProtocolError as exc:
            await self._dead_letter(delivery, exc.reason, str(exc))
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
        if env.is_expired(now):
            await self._dead_letter(
                delivery,
                "expired",
                f"expired at {env.expires.isoformat()}"  # type: ignore[union-attr]
                f" before it started",
                env=env,
            )
            return
        unsupported = _unsupported(env, now)
        if unsupported:
            await self._dead_letter(delivery, "unsupported", unsupported, env=env)
            return
        if not await self._slot():
            await self._requeue(delivery)
            return
        self._running += 1
        try:
            ctx = Context(env, task, delivery.queue, self.hostname)
            if task.acks_early:
                await self._ack(delivery)
            await run_before(self.middleware, ctx)
            outcome = await self._run(task, env)
            await run_after(self.middleware, ctx, outcome)
        finally:
            self._running -= 1
            self._slots.release()
        self.processed += 1
        if task.acks_early:
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
        else:
            error = outcome.exc
            await self._dead_letter(
                delivery,
                "task-failed",
                f"{type(error).__name__}: {error}",
                env=env,
                exc=error,
                tb=outcome.traceback,
            )

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

    async def _run(self, task: Task[Any, Any], env: Envelope) -> Outcome:
        start = time.perf_counter()
        try:
            if task.is_async:
                result = await task.fn(*env.args, **env.kwargs)
            elif self._pool is not None:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(
                    self._pool, partial(task.fn, *env.args, **env.kwargs)
                )
            else:
                result = task.fn(*env.args, **env.kwargs)
        except Exception as exc:
            runtime = time.perf_counter() - start
            log.warning(
                "task %s[%s] failed in %.3fs: %s: %s",
                env.task,
                env.id,
                runtime,
                type(exc).__name__,
                exc,
            )
            return Outcome(False, exc=exc, traceback=traceback.format_exc(), runtime=runtime)
        runtime = time.perf_counter() - start
        if log.isEnabledFor(logging.INFO):
            log.info("task %s[%s] succeeded in %.3fs: %.200r", env.task, env.id, runtime, result)
        return Outcome(True, result=result, runtime=runtime)

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
        props = dead_letter_properties(
            delivery.properties,
            reason=reason,
            detail=detail,
            queue=delivery.queue,
            exchange=delivery.exchange,
            routing_key=delivery.routing_key,
            hostname=self.hostname,
            failed_at=datetime.now(timezone.utc),
            exc_type=type(exc).__name__ if exc is not None else None,
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
            try:
                await delivery.reject()
            except Exception as rej_exc:
                log.error("reject of %s failed (%s); it will be redelivered", ident, rej_exc)
            return
        await self._ack(delivery)


def _unsupported(env: Envelope, now: datetime) -> str | None:
    """Fields this worker cannot honour yet are refused loudly, never silently ignored."""
    if env.eta is not None and env.eta > now:
        return (
            "eta/countdown in the future needs broker-side delays, which this version "
            "does not provide yet"
        )
    if env.links:
        return f"workflow fields ({', '.join(sorted(env.links))}) are not supported yet"
    return None
