"""The synchronous fast path: the common delivery settled without creating an asyncio task.

The common case — a sync task with no time limits, no rate limit, no early ack, no
``expires``/``eta``, no workflow links beyond a group membership and no middleware wanting
the message (e.g. no revoked id; a reply or a stored result is written by the middleware's
``fast_success``) — runs right on the loop (``--pool asyncio``) or goes straight to the
thread pool (``threads``). Finished thread-pool calls come back to the loop through a
:class:`~amqptasks.handoff.Handoff`, one loop wake-up per batch. A success is acked through
the ack window; a failure joins the full pipeline's
:meth:`~.pipeline.Pipeline.finish` (retry decision, hooks, settle), so both paths settle alike.

Profiles showed asyncio task creation per delivery was a visible share of the no-op consume
rate; this path is why the worker keeps up with a raw pika consumer.

Which tasks may take it is decided from the policies once, and again by :meth:`FastPath.refresh`
when ``control rate-limit`` / ``time-limit`` change a policy at run time. A thread-pool call
records its thread, so a revoke with ``terminate`` reaches it as it reaches the pipeline's
(:meth:`FastPath.terminate`: ``TaskRevoked`` at the thread's next bytecode, settled at once).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import traceback
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from ..config import TaskPolicy
from ..errors import TaskRevoked
from ..handoff import Handoff
from ..protocol import Envelope
from ..tasks import BoundTask, Request, Task
from ..transport.pika_consumer import PikaDelivery as Delivery
from .middleware import Context, Middleware, Outcome
from .pipeline import Pipeline, log_failure, log_success, revoked_outcome
from .pool import ThreadRunner, raise_in_thread
from .results import continues
from .slots import SyncWaiter

__all__ = ["FastPath"]

log = logging.getLogger("amqptasks.worker")


class _Thread:
    """Which thread runs a fast-path call (None before and after), for a terminate."""

    __slots__ = ("ident", "lock", "stopped")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ident: int | None = None
        self.stopped = False


def _tracked(fn: Any, cell: _Thread, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    with cell.lock:
        if cell.stopped:
            return None  # terminated before it started: settled already, never runs
        cell.ident = threading.get_ident()
    try:
        return fn(*args, **kwargs)
    finally:
        with cell.lock:
            cell.ident = None
            if cell.stopped:  # a TaskRevoked injected as it returned must not hit the pool
                raise_in_thread(threading.get_ident(), None)


#: A fast-path call in the thread pool: its delivery, envelope, task, start time and thread.
_FastCall = tuple[Delivery, Envelope, Task, float, _Thread]


class _Finishing:
    """One success going through its finishers one after another, in ``after_run`` order
    (reversed middleware order: the result stored, then the caller answered), so a caller
    that heard the reply finds the record in the store. Acked after the last; the first
    error stops the chain and gives the delivery back."""

    __slots__ = ("delivery", "env", "fast", "result", "steps")

    def __init__(
        self, fast: FastPath, delivery: Delivery, env: Envelope, result: Any, steps: list[Any]
    ) -> None:
        self.fast = fast
        self.delivery = delivery
        self.env = env
        self.result = result
        self.steps = steps  # popped from the end

    def next(self, exc: BaseException | None = None) -> None:
        """Ask the next finisher (called again by its ``done``), or settle."""
        while exc is None and self.steps:
            m = self.steps.pop()
            try:
                if m.fast_success(self.env, self.result, self.next):
                    return  # its done() calls next() on the loop, later
            except Exception as e:  # e.g. a record that cannot be built: back to the queue
                exc = e
        self.fast.finishing.discard(self)
        self.fast._finished_after(self.delivery, self.env, exc)


class FastPath:
    """Decides whether a decoded delivery may skip the full pipeline, and runs it if so."""

    def __init__(
        self,
        pipeline: Pipeline,
        tasks: Mapping[str, Task],
        policies: Mapping[str, TaskPolicy],
        middleware: list[Middleware],
        *,
        pool: str,
    ) -> None:
        self.pipeline = pipeline
        self.middleware = middleware
        self.policies = policies
        self.all_tasks = tasks
        self.pool = pool
        #: Tasks this path may run.
        self.tasks: dict[str, Task] = {}
        self.refresh()
        #: Middleware with a fast_success hook (e.g. the result store), asked after a success.
        self.finishers = [
            m for m in middleware if type(m).fast_success is not Middleware.fast_success
        ]
        #: Successes whose finishers (a store write) are still running: acked when they end.
        self.finishing: set[_Finishing] = set()
        #: Calls in the thread pool -> what settling them needs (loop thread only).
        self.pending: dict[concurrent.futures.Future[Any], _FastCall] = {}
        #: Deliveries waiting in the slot queue for a thread (loop thread only).
        self.queued: dict[SyncWaiter, tuple[Delivery, Envelope]] = {}
        self._finished: Handoff[concurrent.futures.Future[Any]] = Handoff()
        self._loop: asyncio.AbstractEventLoop | None = None

    def refresh(self) -> None:
        """Decide again which tasks may take this path (a policy changed at run time)."""
        policies = self.policies
        limit = policies.get
        self.tasks = {
            name: t
            for name, t in self.all_tasks.items()
            if self.pool in ("asyncio", "threads")
            and not t.is_async
            and (p := limit(name)) is not None
            and not p.acks_early
            and not p.time_limit
            and not p.soft_time_limit
            and not (p.rate_limit is not None and p.rate_limit.active)
        }

    def run(self, delivery: Delivery, env: Envelope) -> bool:
        """Run ``env`` here if it qualifies; False sends it down the full pipeline."""
        if (
            env.task not in self.tasks
            or delivery.redelivered  # may have run before: the pipeline asks the store first
            or env.expires is not None
            or env.eta is not None
            or continues(env)
            or env.time_limit
            or env.soft_time_limit
            or self._wanted(env)
        ):
            return False
        slots = self.pipeline.slots
        if slots.try_take():
            self._start(delivery, env)
            return True
        if not isinstance(self.pipeline.runner, ThreadRunner):
            return False
        # Every thread busy: wait in the slot queue, in arrival order with the pipeline's
        # waiters (see slots.py for why not the pipeline itself).
        waiter = SyncWaiter(lambda: self._granted(waiter, delivery, env))
        self.queued[waiter] = (delivery, env)
        self.pipeline.observer.received(env, delivery.queue)  # reserved: inspect, events
        slots.enqueue(waiter)
        return True

    def _wanted(self, env: Envelope) -> bool:
        """Whether some middleware wants ``env`` (then the full pipeline runs it). A loop,
        not ``any(<genexpr>)``: this runs once per delivery."""
        for m in self.middleware:  # noqa: SIM110 (see the docstring)
            if m.wants(env):
                return True
        return False

    def _granted(self, waiter: SyncWaiter, delivery: Delivery, env: Envelope) -> None:
        """A queued delivery's turn: start it — unless its connection died meanwhile (the
        broker gives it out again) or something now wants it (a revoke, a new policy: the
        full pipeline decides then)."""
        self.queued.pop(waiter, None)
        slots = self.pipeline.slots
        observer = self.pipeline.observer
        try:
            if delivery.stale:
                slots.release()
                observer.returned(env, delivery.queue)
            elif self.pipeline.stopping.is_set():  # a warm shutdown began: not started now
                slots.release()
                observer.returned(env, delivery.queue)
                self.pipeline.spawn(self.pipeline.settler.requeue(delivery), delivery)
            elif env.task not in self.tasks or self._wanted(env):
                slots.release()
                self.pipeline.spawn(self.pipeline.process(delivery, env), delivery)
            else:
                self._start(delivery, env, received=True)
        except Exception:  # never strand the slot queue that called us
            log.exception("starting %s[%s] failed; it returns to its queue", env.task, env.id)
            self.pipeline.spawn(self.pipeline.settler.requeue(delivery), delivery)

    def _start(self, delivery: Delivery, env: Envelope, *, received: bool = False) -> None:
        """Run ``env`` with the slot taken: inline (asyncio pool) or in the thread pool.
        ``received``: it waited for the slot, and observers heard it was received then."""
        task = self.tasks[env.task]
        if received:
            self.pipeline.observer.started(env, delivery.queue)
        else:
            self.pipeline.observer.began(env, delivery.queue)
        args: tuple[Any, ...] = env.args
        if task.bind:
            request = Request(
                env.id, env.task, env.retries, delivery.queue, self.pipeline.hostname, env.headers
            )
            args = (BoundTask(task, request), *args)
        start = time.perf_counter()
        runner = self.pipeline.runner
        if isinstance(runner, ThreadRunner):
            # Straight to the thread pool; the outcome comes back to the loop thread. Until a
            # thread picks it up the call is cancellable, so a warm shutdown can requeue it.
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            cell = _Thread()
            future = runner.executor.submit(_tracked, task.fn, cell, args, env.kwargs)
            self.pending[future] = (delivery, env, task, start, cell)
            future.add_done_callback(self._thread_finished)
            return
        try:
            result = task.fn(*args, **env.kwargs)
        except Exception as exc:
            self.pipeline.slots.release()
            self._failed(delivery, env, task, start, exc, traceback.format_exc())
            return
        self.pipeline.slots.release()
        self._succeeded(delivery, env, start, result)

    def cancel_pending(self) -> None:
        """Warm shutdown: calls not started yet are requeued by their done callbacks, and
        deliveries still waiting for a slot go back to their queue."""
        for future in list(self.pending):
            future.cancel()
        for waiter, (delivery, env) in list(self.queued.items()):
            if waiter.cancel():
                del self.queued[waiter]
                self.pipeline.observer.returned(env, delivery.queue)
                self.pipeline.spawn(self.pipeline.settler.requeue(delivery), delivery)

    def cancel_stale(self) -> None:
        """The connection died: calls not started yet from it are dropped (the broker gives
        their messages out again; starting them now would run them twice)."""
        for future, (delivery, _env, _task, _start, _cell) in list(self.pending.items()):
            if delivery.stale:
                future.cancel()
        for waiter, (delivery, env) in list(self.queued.items()):
            if delivery.stale and waiter.cancel():
                del self.queued[waiter]
                self.pipeline.observer.returned(env, delivery.queue)

    def terminate(self, ids: set[str]) -> list[str]:
        """Revoke with terminate: ``TaskRevoked`` in the thread of each running call of
        ``ids`` at its next bytecode (a thread cannot be killed: a blocking C call such as
        ``time.sleep`` finishes first), and its delivery settled as revoked at once; what the
        thread returns later is discarded. Returns the ids reached."""
        stopped = []
        for future, (delivery, env, task, start, cell) in list(self.pending.items()):
            if env.id not in ids:
                continue
            with cell.lock:
                cell.stopped = True
                if cell.ident is not None:
                    raise_in_thread(cell.ident, TaskRevoked)
            future.cancel()  # not started yet: it never will
            del self.pending[future]
            self.pipeline.slots.release()
            stopped.append(env.id)
            outcome = revoked_outcome(
                env,
                time.perf_counter() - start,
                started=True,
                how=" (its thread gets TaskRevoked at its next bytecode)",
            )
            ctx = Context(env, task, delivery.queue, self.pipeline.hostname)
            finish = self.pipeline.finish(
                delivery,
                env,
                task,
                self.policies[env.task],
                ctx,
                outcome,
                datetime.now(timezone.utc),
            )
            self.pipeline.spawn(finish, delivery)
        return stopped

    def _thread_finished(self, future: concurrent.futures.Future[Any]) -> None:
        """Done callback: runs in the pool thread (or on the loop when the call was
        cancelled). Queues the future and wakes the loop only if no wake is pending."""
        if self._finished.put(future):
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._settle_finished)

    def _settle_finished(self) -> None:
        for future in self._finished.take():
            entry = self.pending.pop(future, None)
            if entry is None:
                continue  # terminated by a revoke: settled already
            delivery, env, task, start, _cell = entry
            self.pipeline.slots.release()
            try:
                if future.cancelled():  # never started: back to the queue (warm shutdown)
                    self.pipeline.observer.returned(env, delivery.queue)
                    self.pipeline.spawn(self.pipeline.settler.requeue(delivery), delivery)
                    continue
                exc = future.exception()
                if exc is None:
                    self._succeeded(delivery, env, start, future.result())
                else:
                    tb = "".join(traceback.format_exception(exc))
                    self._failed(delivery, env, task, start, exc, tb)
            except Exception:  # one bad settle must not strand the rest of the batch
                log.exception("settling %s[%s] failed; it returns to its queue", env.task, env.id)
                self.pipeline.spawn(self.pipeline.settler.requeue(delivery), delivery)

    def _succeeded(self, delivery: Delivery, env: Envelope, start: float, result: Any) -> None:
        self.pipeline.stats.processed += 1
        runtime = time.perf_counter() - start
        log_success(env, runtime, result)
        self.pipeline.observer.succeeded(env, delivery.queue, runtime, result)
        if not self.finishers:
            delivery.ack_now()
            return
        # self.finishers is in middleware order; steps pop from the end: after_run's order.
        finishing = _Finishing(self, delivery, env, result, list(self.finishers))
        self.finishing.add(finishing)
        finishing.next()

    def _finished_after(self, delivery: Delivery, env: Envelope, exc: BaseException | None) -> None:
        """A success whose finishers ended: ack it, or — a result that could not be kept —
        give it back to its queue (it runs again; at-least-once, nothing lost)."""
        if exc is None:
            delivery.ack_now()
            return
        log.error(
            "the result of %s[%s] could not be stored or answered (%s); it goes back to its queue",
            env.task,
            env.id,
            exc,
        )
        self.pipeline.spawn(self.pipeline.settler.requeue(delivery), delivery)

    def _failed(
        self,
        delivery: Delivery,
        env: Envelope,
        task: Task,
        start: float,
        exc: BaseException,
        tb: str,
    ) -> None:
        outcome = Outcome(False, exc=exc, traceback=tb, runtime=time.perf_counter() - start)
        log_failure(env, outcome.runtime, exc)
        ctx = Context(env, task, delivery.queue, self.pipeline.hostname)
        finish = self.pipeline.finish(
            delivery,
            env,
            task,
            self.policies[env.task],
            ctx,
            outcome,
            datetime.now(timezone.utc),
        )
        self.pipeline.spawn(finish, delivery)
