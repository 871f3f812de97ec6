"""``--pool processes``: sync tasks in child processes (CPU-bound work, hard time limits).

Each child is a ``spawn``-ed interpreter that imports the task modules and then serves one call
at a time over a pipe. The parent never acks a delivery for a child that died: the call
reports :class:`WorkerLost` (killed, OOM, ``os._exit``) and the retry policy decides (retry
through a broker-side delay, then the dead-letter queue). A dead or retired child is replaced.

* soft limit: ``SIGALRM`` in the child raises :class:`SoftTimeLimitExceeded` inside the task;
* hard limit: the parent SIGKILLs the child and reports :class:`TimeLimitExceeded`;
* ``max_tasks_per_child``: a child retires after that many calls;
* ``max_memory_per_child`` (KiB): a child whose peak RSS passed it retires after its call;
* :meth:`ProcessRunner.resize`: growing starts children at once; shrinking retires idle
  children at once and busy ones when their call returns (a running task is never killed).
* revoke with ``terminate``: the parent SIGKILLs the child running the call and replaces it;
  the call is settled as revoked (not as ``WorkerLost``, so not retried).

The pipe carries pickles between our own processes only (never message bodies from the
broker as such: the parent has already decoded and validated them).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import resource
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from typing import Any

from ..errors import (
    Retry,
    SoftTimeLimitExceeded,
    TaskExpired,
    TaskRevoked,
    TimeLimitExceeded,
    WorkerLost,
)
from ..tasks import BoundTask
from .middleware import Outcome
from .pool import Call

__all__ = ["ProcessRunner", "RemoteFailure"]

log = logging.getLogger("amqptasks.pool")


class RemoteFailure(Exception):
    """A task's exception as a child reported it: named after the remote type."""

    def __init__(self, exc_type: str, message: str, mro: tuple[str, ...]) -> None:
        super().__init__(message)
        self.exc_type = exc_type
        self.exc_mro = mro


def _named(exc_type: str, message: str, mro: tuple[str, ...]) -> RemoteFailure:
    cls = type(exc_type if exc_type.isidentifier() else "RemoteFailure", (RemoteFailure,), {})
    failure: RemoteFailure = cls(exc_type, message, mro)
    return failure


# -- child side ----------------------------------------------------------------------------------
def _on_alarm(_sig: int, _frame: Any) -> None:
    raise SoftTimeLimitExceeded("soft time limit exceeded")


def _child_main(
    conn: multiprocessing.connection.Connection,
    imports: list[str],
    sys_path: list[str],
    max_tasks: int,
    max_memory_kib: int,
) -> None:
    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides about shutdown
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGALRM, _on_alarm)
    from ..loader import load_tasks

    tasks = load_tasks(imports)
    served = 0
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        name, args, kwargs, request, soft = msg
        task = tasks[name]
        call_args = (BoundTask(task, request), *args) if task.bind else args
        if soft:
            signal.setitimer(signal.ITIMER_REAL, soft)
        try:
            reply: tuple[Any, ...] = ("ok", task.fn(*call_args, **kwargs))
        except Retry as exc:
            inner = exc.exc
            reply = (
                "retry",
                exc.countdown,
                exc.max_retries,
                None
                if inner is None
                else (
                    type(inner).__name__,
                    str(inner),
                    tuple(c.__name__ for c in type(inner).__mro__),
                ),
                traceback.format_exc(),
            )
        except BaseException as exc:  # report everything, including SystemExit from a task
            reply = (
                "err",
                type(exc).__name__,
                str(exc),
                tuple(c.__name__ for c in type(exc).__mro__),
                traceback.format_exc(),
            )
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        served += 1
        retire = (max_tasks and served >= max_tasks) or (
            max_memory_kib and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > max_memory_kib
        )
        try:
            conn.send((*reply[:1], bool(retire), *reply[1:]))
        except Exception as exc:  # e.g. an unpicklable result
            conn.send(
                (
                    "err",
                    bool(retire),
                    "EncodeError",
                    f"result cannot be sent from the child: {exc}",
                    ("EncodeError",),
                    "",
                )
            )
        if retire:
            return


# -- parent side ---------------------------------------------------------------------------------
@dataclass(eq=False)  # identity-hashed: children are tracked in a set
class _Child:
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection


class ProcessRunner:
    """A pool of ``size`` child processes; one call per child at a time."""

    def __init__(
        self,
        size: int,
        imports: tuple[str, ...],
        *,
        max_tasks_per_child: int = 0,
        max_memory_per_child: int = 0,
    ) -> None:
        self.size = size
        self.imports = list(imports)
        self.max_tasks = max_tasks_per_child
        self.max_memory = max_memory_per_child
        self._ctx = multiprocessing.get_context("spawn")
        self._idle: asyncio.Queue[_Child] | None = None
        self._all: set[_Child] = set()
        self.replaced = 0
        #: Children to retire instead of reusing (a shrink waiting for busy children).
        self._surplus = 0
        #: Threads that wait for the children's replies, one per running call: the loop's
        #: default executor has min(32, CPUs + 4) threads, so a larger pool's replies would
        #: wait there for a free thread (and a task would seem to run longer than it did).
        self._readers = self._reader_pool(size)

    @staticmethod
    def _reader_pool(size: int) -> concurrent.futures.ThreadPoolExecutor:
        return concurrent.futures.ThreadPoolExecutor(size, thread_name_prefix="amqptasks-reply")

    def _spawn(self) -> _Child:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_child_main,
            name="amqptasks-child",
            args=(child, self.imports, [p for p in sys.path if p], self.max_tasks, self.max_memory),
            daemon=True,
        )
        process.start()
        child.close()
        c = _Child(process, parent)
        self._all.add(c)
        return c

    async def start(self) -> None:
        self._idle = asyncio.Queue()
        for _ in range(self.size):
            self._idle.put_nowait(self._spawn())

    def _retire(self, child: _Child, kill: bool) -> None:
        self._all.discard(child)
        if kill and child.process.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.process.pid or 0, signal.SIGKILL)
        child.process.join(5)
        child.conn.close()

    def _replace(self, child: _Child, kill: bool) -> None:
        self._retire(child, kill)
        self.replaced += 1
        assert self._idle is not None
        if self._surplus:
            self._surplus -= 1  # the pool shrinks: this one is not replaced
        else:
            self._idle.put_nowait(self._spawn())

    def _give_back(self, child: _Child) -> None:
        """A child whose call is over: idle again, or retired when the pool shrinks."""
        assert self._idle is not None
        if self._surplus:
            self._surplus -= 1
            self._let_go(child)
        else:
            self._idle.put_nowait(child)

    def _let_go(self, child: _Child) -> None:
        """Retire an idle child without blocking the loop: it exits on ``None``, and is
        joined (killed after 5 s) in a thread."""
        self._all.discard(child)
        with contextlib.suppress(Exception):
            child.conn.send(None)
        asyncio.get_running_loop().run_in_executor(None, self._reap, child)

    @staticmethod
    def _reap(child: _Child) -> None:
        child.process.join(5)
        if child.process.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.process.pid or 0, signal.SIGKILL)
            child.process.join(5)
        child.conn.close()

    def resize(self, size: int) -> None:
        """Run ``size`` children: start the missing ones now; retire idle ones now and busy
        ones as their calls return (never killing a running task)."""
        assert self._idle is not None, "start() first"
        if size < 1:
            raise ValueError(f"a pool needs at least one child, got {size}")
        if size > self.size:
            undo = min(self._surplus, size - self.size)
            self._surplus -= undo  # busy children still due to retire stay instead
            for _ in range(size - self.size - undo):
                self._idle.put_nowait(self._spawn())
            old, self._readers = self._readers, self._reader_pool(size + self._surplus)
            old.shutdown(wait=False)  # its threads finish the replies they wait for
        else:
            self._surplus += self.size - size
            while self._surplus and not self._idle.empty():
                self._surplus -= 1
                self._let_go(self._idle.get_nowait())
        self.size = size

    @property
    def children(self) -> int:
        """Children alive now (busy ones waiting to retire included)."""
        return len(self._all)

    async def run(self, call: Call) -> Outcome:
        assert self._idle is not None, "start() first"
        child = await self._idle.get()
        if call.terminated:  # revoked while it waited for a child: it never starts
            self._idle.put_nowait(child)
            return Outcome(False, exc=TaskRevoked("revoked before it started"), traceback="")
        if call.expires is not None and datetime.now(timezone.utc) >= call.expires:
            self._give_back(child)  # never handed a call that is already too late
            return Outcome(
                False,
                exc=TaskExpired(
                    f"expired at {call.expires.isoformat()} while it waited for a free child "
                    "process"
                ),
                traceback="",
            )
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            child.conn.send((call.task.name, call.args, call.kwargs, call.request, call.soft))
        except (OSError, ValueError):
            self._replace(child, kill=True)
            return Outcome(
                False,
                exc=WorkerLost("child process was gone before the call"),
                traceback="",
                runtime=0.0,
            )
        receive = loop.run_in_executor(self._readers, child.conn.recv)
        call.started = True
        call.stopper = partial(self._kill, child)
        try:
            reply = await asyncio.wait_for(
                asyncio.shield(receive), call.hard if call.hard else None
            )
        except asyncio.TimeoutError:
            self._replace(child, kill=True)
            with contextlib.suppress(Exception):
                await receive
            return Outcome(
                False,
                exc=TimeLimitExceeded(
                    f"task {call.task.name} exceeded its time limit of {call.hard}s; its child "
                    f"process (pid {child.process.pid}) was killed"
                ),
                traceback="",
                runtime=time.perf_counter() - start,
            )
        except (EOFError, OSError):
            code = child.process.exitcode
            self._replace(child, kill=True)
            if call.terminated:
                log.warning(
                    "child process %s killed: %s[%s] was revoked with terminate; replaced",
                    child.process.pid,
                    call.task.name,
                    call.request.id,
                )
                return Outcome(
                    False,
                    exc=WorkerLost("terminated: the child process was killed"),
                    traceback="",
                    runtime=time.perf_counter() - start,
                )
            log.error(
                "child process %s died running %s[%s] (exit code %s)",
                child.process.pid,
                call.task.name,
                call.request.id,
                code,
            )
            return Outcome(
                False,
                exc=WorkerLost(f"the child process running the task died (exit code {code})"),
                traceback="",
                runtime=time.perf_counter() - start,
            )
        finally:
            call.stopper = None
        kind, retire = reply[0], reply[1]
        if call.terminated:
            # Killed (or about to be) after it had answered: never hand it another call.
            self._replace(child, kill=True)
        elif retire:
            self._replace(child, kill=False)
        else:
            self._give_back(child)
        runtime = time.perf_counter() - start
        if kind == "ok":
            return Outcome(True, result=reply[2], runtime=runtime)
        if kind == "retry":
            _, _, countdown, max_retries, inner, tb = reply
            exc = Retry(
                exc=_named(*inner) if inner else None, countdown=countdown, max_retries=max_retries
            )
            return Outcome(False, exc=exc, traceback=tb, runtime=runtime)
        _, _, exc_type, message, mro, tb = reply
        failure: BaseException = _named(exc_type, message, mro)
        if exc_type == "SoftTimeLimitExceeded":
            failure = SoftTimeLimitExceeded(message)
        return Outcome(False, exc=failure, traceback=tb, runtime=runtime)

    @staticmethod
    def _kill(child: _Child) -> None:
        """Revoke with terminate: the call's child dies now; ``run`` sees it go and replaces
        it."""
        if child.process.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.process.pid or 0, signal.SIGKILL)

    def close(self) -> None:
        for child in list(self._all):
            with contextlib.suppress(Exception):
                child.conn.send(None)
        for child in list(self._all):
            child.process.join(2)
            self._retire(child, kill=True)
        self._readers.shutdown(wait=False)
