"""The worker: wiring, start-up checks, lifecycle and signals.

A worker is a few parts, each in its own module of this package:

* :mod:`.consume` — the consuming connection's life (wait for the broker, declare, consume,
  reconnect) and the dispatch of each delivery;
* :mod:`.fastpath` — the common delivery settled without an asyncio task;
* :mod:`.pipeline` — the one fixed pipeline for everything else;
* :mod:`.settle` — the only code that acks, rejects, requeues, retries or dead-letters;
* :mod:`.middleware` — the hooks features plug into (replies, dedupe, ...);
* :mod:`.observer` — what both paths tell about each delivery: the :mod:`.tracker` (what
  ``inspect`` reports) and, with events on, the :mod:`.events` emitter listen;
* :mod:`.control` — the control queue and the inspect/control commands;
* :mod:`.revoke` — revoked ids (the broker's revocations stream) and the hook that settles
  them; :mod:`.throttle` — the rate-limit stage before the slot;
* :mod:`.pool` / :mod:`.process_pool` — where task code runs and how limits are enforced.

Concurrency: at most ``concurrency`` tasks run at once; ``prefetch = concurrency ×
prefetch_multiplier`` deliveries per consumer may wait for a slot. ``async def`` tasks run on
the event loop; sync tasks in a thread pool, inline (``asyncio``) or in child processes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import tracing
from ..app import App
from ..canvas import BUILTIN_TASKS
from ..config import DEFAULT_POLICY, Settings, TaskPolicy, redact_url
from ..errors import AmqpTasksError, BrokerError, TopologyError
from ..events import EventSource
from ..tasks import Task
from ..topology import EVENTS_EXCHANGE
from ..transport.pika_async import AsyncPikaPublisher
from ..transport.pika_consumer import PikaConsumer
from .autoscale import Pool
from .builtins import builtin_tasks
from .consume import ConsumeLoop
from .control import ControlServer
from .dedupe import Dedupe
from .events import EventEmitter, worker_snapshot_fields
from .fastpath import FastPath
from .middleware import Middleware
from .observer import Observer, Observers
from .pipeline import Pipeline
from .pool import InlineRunner, ThreadRunner
from .process_pool import ProcessRunner
from .replies import ReplyMiddleware
from .results import ResultsMiddleware, WorkflowMiddleware
from .revoke import Revocations
from .settle import Settler
from .stats import Stats
from .storecalls import StoreRunner
from .throttle import Throttle
from .tracing import TracingMiddleware
from .tracker import Tracker
from .workflow import Workflow

__all__ = ["POOLS", "Worker", "WorkerOptions", "default_hostname"]

log = logging.getLogger("amqptasks.worker")
POOLS = ("threads", "asyncio", "processes")


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
    #: Give up when no broker answered within this many seconds of start (None: wait forever).
    connect_timeout: float | None = None
    #: Publish task and worker events (None: the config's ``events.enabled``).
    events: bool | None = None
    #: Seconds between worker-heartbeat events (None: the config's ``events.heartbeat_interval``).
    heartbeat_interval: float | None = None
    #: Time limits of every task that sets none itself (decorator, then config ``tasks``).
    time_limit: float | None = None
    soft_time_limit: float | None = None
    #: (MAX, MIN): grow with the backlog, shrink when idle (:mod:`.autoscale`); None: fixed.
    autoscale: tuple[int, int] | None = None
    #: Seconds of unused slots before the autoscaler shrinks the pool (None: its default).
    autoscale_idle: float | None = None

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
        observers: Sequence[Observer] = (),
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
        self.options = options
        self.hostname = options.hostname or default_hostname()
        #: Routes and encodes the messages a workflow step publishes (like a caller would).
        self.app = App(settings)
        self.tasks: dict[str, Task] = {}
        self.tasks.update(builtin_tasks(self.tasks, self.app))
        self.tasks.update(tasks)
        self.app.tasks = self.tasks
        # The worker's --time-limit/--soft-time-limit sit below the task's own limits.
        limits = TaskPolicy(time_limit=options.time_limit, soft_time_limit=options.soft_time_limit)
        self.policies: dict[str, TaskPolicy] = {
            name: t.policy.merged(settings.task_policy(name)).merged(limits).merged(DEFAULT_POLICY)
            for name, t in self.tasks.items()
        }
        self.publisher = AsyncPikaPublisher(
            settings.broker.urls,
            timeout=settings.broker.publish_timeout,
            name=f"{self.hostname} publisher",
            heartbeat=settings.broker.heartbeat,
        )
        self.revocations = Revocations(settings.revoke, self.hostname, self.publisher.publish)
        store = self.app.store
        self.store = StoreRunner(store) if store is not None else None
        replies = ReplyMiddleware(
            self.publisher.publish, settings.results.ignore_result, self.policies
        )
        workflow = Workflow(
            self.app, self.publisher.publish, self.store, self.hostname, replies.reply_failure
        )
        stored: list[Middleware] = []
        if self.store is not None:
            stored.append(
                ResultsMiddleware(
                    self.store,
                    self.policies,
                    self.hostname,
                    default_ignore=settings.results.ignore_result,
                    default_track_started=settings.results.track_started,
                )
            )
        # after_run hooks run in reverse: the result is stored, then the workflow continued,
        # then the caller answered; the duplicate checks come first in should_run.
        if settings.tracing.enabled:
            tracing.require(settings.source)  # a config error at start, not at the first task
        self.middleware: list[Middleware] = [
            self.revocations.middleware,  # first: a revoked id needs no store lookup
            # Next: its span wraps every other hook that runs (after_run runs in reverse).
            *([TracingMiddleware()] if settings.tracing.enabled else []),
            replies,
            WorkflowMiddleware(workflow),
            *stored,
            *middleware,
            # Last, so its should_run claims a message only once every other hook said yes
            # (a claim is released by after_run, which then always follows).
            Dedupe(),
        ]
        self.stats = Stats()
        self._stopping = asyncio.Event()
        self._done = asyncio.Event()
        self._signals = 0
        self._exit_code = 0
        #: True after a second signal: exit without waiting for running tasks.
        self.cold = False
        self.settler = Settler(self.publisher.publish, self.hostname, self.middleware)
        self.pipeline = Pipeline(
            settings,
            self.tasks,
            self.policies,
            self.hostname,
            self.middleware,
            self.settler,
            self.stats,
            concurrency=options.concurrency,
            stopping=self._stopping,
        )
        self.fast = FastPath(
            self.pipeline, self.tasks, self.policies, self.middleware, pool=options.pool
        )
        self.consuming = ConsumeLoop(
            settings,
            options.queues,
            prefetch=options.prefetch,
            hostname=self.hostname,
            pipeline=self.pipeline,
            fast=self.fast,
            stats=self.stats,
            stopping=self._stopping,
            done=self._done,
            declare=options.declare,
            connect_timeout=options.connect_timeout,
        )
        #: The pool's size at run time: ``control pool-grow|pool-shrink|autoscale``.
        self.pool = Pool(self.pipeline, self.consuming, options.prefetch_multiplier)
        self.tracker = Tracker(self.stats)
        watching: list[Observer] = [self.tracker, *observers]
        self.events: EventEmitter | None = None
        if settings.events.enabled if options.events is None else options.events:
            self.events = EventEmitter(
                AsyncPikaPublisher(
                    settings.broker.urls,
                    timeout=settings.broker.publish_timeout,
                    name=f"{self.hostname} events",
                    heartbeat=settings.broker.heartbeat,
                ),
                EventSource(self.hostname),
                self.stats,
                self._snapshot,
                heartbeat_interval=options.heartbeat_interval or settings.events.heartbeat_interval,
            )
            watching.append(self.events)
        self.pipeline.observer = self.settler.observer = Observers(watching)
        self.throttle = self.pipeline.throttle = Throttle(
            self.policies,
            publish=self.publisher.publish,
            exempt=self.revocations.revoked.__contains__,
        )
        self.revocations.bind(self.pipeline, self.fast)
        self.revocations.on_revoked.append(self.throttle.release)
        self.consuming.before_consume += [self.revocations.attach, self.throttle.attach]
        self.control = ControlServer(self)
        self.consuming.attach_hooks.append(self._attached)
        self._stop_task: asyncio.Task[None] | None = None
        self._limit_problems: list[str] | None = None

    def __repr__(self) -> str:
        return f"<Worker {self.hostname} broker={self.settings.broker.display}>"

    @property
    def on_ready(self) -> Callable[[], None] | None:
        """Called each time every consumer is attached (the CLI prints "ready: consuming")."""
        return self.consuming.on_ready

    @on_ready.setter
    def on_ready(self, callback: Callable[[], None] | None) -> None:
        self.consuming.on_ready = callback

    async def _attached(self, consumer: PikaConsumer) -> None:
        """After each (re)connect: the control queue, the events exchange, worker-online."""
        await self.control.attach(consumer)
        if self.events is not None:
            await consumer.declare_exchange(EVENTS_EXCHANGE, "topic")
            self.events.online()

    def _snapshot(self) -> dict[str, Any]:
        from .. import __version__

        return worker_snapshot_fields(
            pool=self.options.pool,
            concurrency=self.pool.size,
            prefetch=self.pool.prefetch,
            queues=self.consuming.queues,
            active=len(self.tracker.active),
            reserved=len(self.tracker.reserved),
            processed=self.stats.processed,
            version=__version__,
        )

    @property
    def processed(self) -> int:
        return self.stats.processed

    @property
    def reconnects(self) -> int:
        return self.stats.reconnects

    # -- start-up checks ------------------------------------------------------------------------
    def check_limits(self) -> list[str]:
        """Problems with time limits, found before consuming (not at 3 a.m.).

        A hard limit at or above the broker's ``consumer_timeout`` is refused: the broker would
        close the channel (and redeliver) before the limit fires. Limits the chosen pool cannot
        enforce are warned about.
        """
        if self._limit_problems is not None:
            return self._limit_problems  # checked already (the CLI checks before run())
        errors: list[str] = []
        self._limit_problems = errors
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
                and self.options.pool == "asyncio"
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
            f"  broker:      {s.broker.display}",
            f"  config:      {s.source}",
            f"  results:     {redact_url(s.results.backend)}",
            f"  pool:        {self.options.pool}  concurrency={self.options.concurrency} "
            f"prefetch={self.options.prefetch} (per consumer){extra}",
            *(
                [f"  autoscale:   max={self.options.autoscale[0]} min={self.options.autoscale[1]}"]
                if self.options.autoscale
                else []
            ),
            f"  events:      {'on' if self.events is not None else 'off'}",
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
            if name not in BUILTIN_TASKS
        )
        return "\n".join(lines)

    # -- lifecycle ------------------------------------------------------------------------------
    async def _start_runner(self) -> None:
        if self.options.pool == "threads":
            self.pipeline.runner = ThreadRunner(self.options.concurrency)
        elif self.options.pool == "asyncio":
            self.pipeline.runner = InlineRunner()
        else:
            runner = ProcessRunner(
                self.options.concurrency,
                self.settings.imports,
                max_tasks_per_child=self.options.max_tasks_per_child,
                max_memory_per_child=self.options.max_memory_per_child,
            )
            await runner.start()
            self.pipeline.runner = runner

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
            if self.options.autoscale is not None:
                maximum, minimum = self.options.autoscale
                try:
                    await self.pool.autoscale(maximum, minimum, idle=self.options.autoscale_idle)
                except ValueError as exc:
                    raise AmqpTasksError(f"autoscale: {exc}") from None
            if self.store is not None:
                self.store.start()
            if self.events is not None:
                self.events.start()
            await self.consuming.run()
        except (BrokerError, TopologyError, AmqpTasksError) as exc:
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
                self.stats.running,
            )
            self.request_stop()
        else:
            log.warning(
                "%s again: cold shutdown — unfinished tasks are not acked and return to the queue",
                signal.Signals(sig).name,
            )
            self._exit_code = 1
            self.cold = True
            self._stopping.set()
            for t in list(self.pipeline.inflight):
                t.cancel()
            self._done.set()

    def request_stop(self) -> None:
        """Begin a warm shutdown from a callback on the loop (a signal, a control command)."""
        if self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(self.stop())

    async def stop(self) -> None:
        """Warm shutdown: stop consuming, let running tasks finish and settle, then exit."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        await self.consuming.cancel()
        self.fast.cancel_pending()
        while self.pipeline.inflight or self.fast.pending or self.fast.finishing:
            if self.pipeline.inflight:
                await asyncio.wait(set(self.pipeline.inflight), timeout=0.1)
            else:
                await asyncio.sleep(0.02)
        self._done.set()

    async def _shutdown(self) -> None:
        self._stopping.set()
        await self.pool.close()
        await self.throttle.close()
        await self.consuming.close()
        if self.store is not None:
            await self.store.close()
        if self.events is not None:
            await self.events.close()
        await self.publisher.close()
        if self.pipeline.runner is not None:
            self.pipeline.runner.close()
