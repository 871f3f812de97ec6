"""Where a task's code runs, and how its time limits are enforced — honestly, per pool.

=============  ======================================  ==========================================
runner         soft_time_limit                         time_limit (hard)
=============  ======================================  ==========================================
async tasks    ``asyncio.CancelledError`` raised at    the worker stops waiting, reports
(any pool)     the task's current ``await``            ``TimeLimitExceeded`` and settles; a task
               (catchable; reported as                 that swallows cancellation keeps running
               ``SoftTimeLimitExceeded``)              detached until it returns
threads        ``SoftTimeLimitExceeded`` raised in     Python cannot kill a thread: the worker
               the thread at its next bytecode (not    reports ``TimeLimitExceeded``, settles,
               inside a blocking C call)               and the thread runs on until it returns
asyncio        not enforced (the sync task blocks the  not enforced: the start-up check warns
(inline)       event loop; nothing can interrupt it)
processes      SIGALRM in the child raises             the child is killed (SIGKILL) and replaced
               ``SoftTimeLimitExceeded``
=============  ======================================  ==========================================

A revoke with ``terminate`` stops a running call the same way each pool can (:meth:`Call.stop`):
an async task is cancelled; a thread gets :class:`~amqptasks.errors.TaskRevoked` raised at its
next bytecode and the call returns at once (the thread runs on until it reacts); a child
process is killed and replaced; a sync task inline on the loop cannot be reached (the loop is
busy running it, so the command is handled only once it returned).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import ctypes
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, Protocol

from ..errors import SoftTimeLimitExceeded, TaskRevoked, TimeLimitExceeded
from ..tasks import BoundTask, Request, Task
from .middleware import Outcome

__all__ = ["AsyncRunner", "Call", "InlineRunner", "Runner", "ThreadRunner", "raise_in_thread"]


@dataclass(slots=True)
class Call:
    """One execution to run: the task, its arguments, its request and its limits (0 = none)."""

    task: Task
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    request: Request
    soft: float = 0.0
    hard: float = 0.0
    #: The message's deadline: a runner that had to wait for a free worker (a child process)
    #: checks it again before starting the call.
    expires: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: Set by the runner once the task's code started.
    started: bool = False
    #: Set by the runner while the call runs: stops it (a revoke with ``terminate``).
    stopper: Callable[[], None] | None = None
    #: Stopped by a revoke (or told not to start): whatever it returned, it is settled as
    #: revoked.
    terminated: bool = False

    def stop(self) -> bool:
        """Stop the call as its pool can (see the module docstring), or make sure it never
        starts when it has not yet (a child process was not free); False when it cannot be
        reached (already done, or inline on the loop)."""
        if self.stopper is not None:
            self.terminated = True
            self.stopper()
            return True
        if not self.started:
            self.terminated = True
            return True
        return False

    def arguments(self) -> tuple[Any, ...]:
        if self.task.bind:
            return (BoundTask(self.task, self.request), *self.args)
        return self.args


class Runner(Protocol):
    async def run(self, call: Call) -> Outcome: ...

    def resize(self, size: int) -> None:
        """Follow the pool's new size (``control pool-grow``, ``--autoscale``); the slots
        decide how many calls run, the runner only needs room for them."""

    def close(self) -> None: ...


def _failure(exc: BaseException, start: float, tb: str | None = None) -> Outcome:
    return Outcome(
        False, exc=exc, traceback=tb or traceback.format_exc(), runtime=time.perf_counter() - start
    )


class AsyncRunner:
    """``async def`` tasks on the worker's event loop."""

    async def run(self, call: Call) -> Outcome:
        start = time.perf_counter()
        # A task of its own, so a revoke with terminate can cancel it alone.
        job = asyncio.ensure_future(call.task.fn(*call.arguments(), **call.kwargs))
        call.started = True
        call.stopper = job.cancel
        try:
            return await self._run(call, job, start)
        finally:
            call.stopper = None

    async def _run(self, call: Call, job: asyncio.Future[Any], start: float) -> Outcome:
        if not call.soft and not call.hard:
            try:
                return Outcome(True, result=await job, runtime=time.perf_counter() - start)
            except asyncio.CancelledError:
                if call.terminated:  # the job was cancelled, not the worker's task
                    return _failure(TaskRevoked(f"task {call.task.name} was terminated"), start)
                raise
            except Exception as exc:
                return _failure(exc, start)
        soft = call.soft or call.hard
        done, _ = await asyncio.wait({job}, timeout=soft)
        soft_hit = not done
        if soft_hit:
            job.cancel()  # CancelledError at the task's current await: its chance to clean up
            remaining = (call.hard - soft) if call.hard and call.hard > soft else 0.05
            done, _ = await asyncio.wait({job}, timeout=remaining)
            if not done:
                return _failure(
                    TimeLimitExceeded(
                        f"task {call.task.name} exceeded its time limit of {call.hard or soft}s"
                    ),
                    start,
                    tb="",
                )
        try:
            return Outcome(True, result=job.result(), runtime=time.perf_counter() - start)
        except asyncio.CancelledError:
            return _failure(
                SoftTimeLimitExceeded(
                    f"task {call.task.name} exceeded its soft time limit of {soft}s"
                ),
                start,
                tb="",
            )
        except Exception as exc:
            tb = "".join(traceback.format_exception(exc))
            return _failure(exc, start, tb)

    def close(self) -> None:
        pass


class InlineRunner:
    """Sync tasks called directly on the event loop (``--pool asyncio``): fastest for tiny
    tasks that never block; time limits cannot be enforced."""

    async def run(self, call: Call) -> Outcome:
        start = time.perf_counter()
        call.started = True
        try:
            result = call.task.fn(*call.arguments(), **call.kwargs)
        except Exception as exc:
            return _failure(exc, start)
        return Outcome(True, result=result, runtime=time.perf_counter() - start)

    def resize(self, size: int) -> None:
        pass  # calls run on the loop itself: nothing to size

    def close(self) -> None:
        pass


class _Running:
    """Which thread runs a call, so a soft limit can be delivered to it (and only to it)."""

    __slots__ = ("lock", "thread_id")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.thread_id: int | None = None


def raise_in_thread(thread_id: int, exc_type: type[BaseException] | None) -> None:
    """Raise ``exc_type`` in thread ``thread_id`` at its next bytecode (None clears a pending
    one)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc_type) if exc_type else None
    )


class ThreadRunner:
    """Sync tasks in a thread pool of ``size`` threads (the default pool)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.executor = concurrent.futures.ThreadPoolExecutor(
            size, thread_name_prefix="amqptasks-task"
        )

    def resize(self, size: int) -> None:
        """Follow the pool's new size. Python's executor cannot change its thread count, so
        new calls go to a new executor of ``size`` threads; the old one finishes the calls it
        runs (never interrupted) and its threads exit. The slots keep the total at ``size``."""
        if size == self.size:
            return
        old, self.size = self.executor, size
        self.executor = concurrent.futures.ThreadPoolExecutor(
            size, thread_name_prefix="amqptasks-task"
        )
        old.shutdown(wait=False)

    @staticmethod
    def _call(
        fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], running: _Running
    ) -> Any:
        with running.lock:
            running.thread_id = threading.get_ident()
        try:
            return fn(*args, **kwargs)
        finally:
            with running.lock:
                running.thread_id = None
                # A soft limit injected just as the task returned must not hit pool internals.
                raise_in_thread(threading.get_ident(), None)

    async def run(self, call: Call) -> Outcome:
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        running = _Running()
        # The task sees the context of its delivery (e.g. its trace span) as an async task
        # would; run_in_executor alone would give it the thread's own.
        context = contextvars.copy_context()
        future = loop.run_in_executor(
            self.executor,
            partial(context.run, self._call, call.task.fn, call.arguments(), call.kwargs, running),
        )
        call.started = True
        call.stopper = partial(self._stop, future, running)
        try:
            if not call.soft and not call.hard:
                result = await future
            else:
                result = await self._limited(call, future, running)
        except asyncio.CancelledError:
            if call.terminated:  # _stop cancelled the wait, not the worker's task
                return _failure(
                    TaskRevoked(
                        f"task {call.task.name} was terminated; its thread cannot be killed and "
                        "gets TaskRevoked at its next Python bytecode"
                    ),
                    start,
                    tb="",
                )
            raise
        except TimeLimitExceeded as exc:
            return _failure(exc, start, tb="")
        except Exception as exc:
            return _failure(exc, start, "".join(traceback.format_exception(exc)))
        finally:
            call.stopper = None
        return Outcome(True, result=result, runtime=time.perf_counter() - start)

    @staticmethod
    def _stop(future: asyncio.Future[Any], running: _Running) -> None:
        """Revoke with terminate: TaskRevoked in the thread at its next bytecode, and stop
        waiting for it (the delivery is settled now; the thread runs on until it reacts)."""
        with running.lock:
            if running.thread_id is not None:
                raise_in_thread(running.thread_id, TaskRevoked)
        future.cancel()

    async def _limited(self, call: Call, future: asyncio.Future[Any], running: _Running) -> Any:
        soft = call.soft or call.hard
        done, _ = await asyncio.wait({future}, timeout=soft)
        if done:
            return future.result()
        if call.soft:
            with running.lock:
                if running.thread_id is not None:
                    raise_in_thread(running.thread_id, SoftTimeLimitExceeded)
        if call.hard and call.hard > soft:
            done, _ = await asyncio.wait({future}, timeout=call.hard - soft)
            if done:
                return future.result()
        elif call.soft and not call.hard:
            return await future  # soft only: wait for the task to react
        raise TimeLimitExceeded(
            f"task {call.task.name} exceeded its time limit of {call.hard}s; its thread "
            "cannot be killed and runs on detached"
        )

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
