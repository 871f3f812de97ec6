"""The result store's blocking calls, run on one thread of their own, saves batched.

The worker's loop must never block on SQLite or Redis, and a result must be written before
its delivery is acked. So every store call becomes an ``asyncio`` future the worker awaits:
saves queued while the thread was busy go out as one ``store.save(batch)`` (one SQLite
transaction, one Redis round trip), and the batch's futures are resolved with one loop wake-up.

A store that fails (Redis restarting, a locked SQLite file) is retried with backoff, holding
the futures — and with them the deliveries, unacked: the worker stalls instead of acking work
whose result it could not keep, logging one line per outage. Every store call is idempotent
(saves keep the first READY state, chord adds are per index), so a retry is safe. At shutdown
the retrying stops after a bound and the futures fail; their deliveries go back to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from ..handoff import Handoff
from ..results import ChordProgress, ResultMeta, ResultStore, StoredRecord

__all__ = ["StoreRunner"]

log = logging.getLogger("amqptasks.worker")
T = TypeVar("T")
_SAVE = object()
_CHORD_ADD = object()
#: Called on the loop with None once a save is stored, or with the error that stopped it.
Done = Callable[[BaseException | None], None]
#: What a job reports to: a future the caller awaits, or a :data:`Done` callback.
_Target = asyncio.Future[Any] | Done


class StoreRunner:
    """One thread that runs ``store``'s calls for one event loop."""

    def __init__(self, store: ResultStore, *, max_retry_delay: float = 5.0) -> None:
        self.store = store
        self.max_retry_delay = max_retry_delay
        self._jobs: deque[tuple[Any, tuple[Any, ...], _Target]] = deque()
        self._cv = threading.Condition()
        self._done: Handoff[tuple[_Target, bool, Any]] = Handoff()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._close_deadline = 0.0
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.saved = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="amqptasks-results", daemon=True)
        self._thread.start()

    # -- loop side ------------------------------------------------------------------------------
    def save(self, meta: StoredRecord) -> asyncio.Future[None]:
        """Write ``meta`` (with whatever else is queued now); resolves once it is stored."""
        return self._submit(_SAVE, (meta,))

    def save_then(self, meta: StoredRecord, done: Done) -> None:
        """Write ``meta`` like :meth:`save`, then call ``done(None)`` — or ``done(exc)`` if it
        could not be stored — on the loop, in the very callback that takes the batch back.

        Why not a future: each future's done callback is one more loop pass (behind a whole
        turn of deliveries) and one handle per result; the fast path acks from ``done``, so
        a result's ack goes out one loop turn after its batch lands. Never called before
        this returns.
        """
        assert self._loop is not None, "start() first"
        with self._cv:
            if not self._closing:
                self._jobs.append((_SAVE, (meta,), done))
                self._cv.notify()
                return
        self._loop.call_soon(done, RuntimeError("the result store is closed"))

    def chord_add(
        self, chord_id: str, size: int, index: int, meta: ResultMeta
    ) -> asyncio.Future[ChordProgress]:
        """``store.chord_add`` on the store thread; adds queued together go out as one
        ``chord_add_many`` (one round trip, one transaction) when the store has it — the
        members of a big chord finish together, and one Redis round trip each was the chord's
        wall time."""
        return self._submit(_CHORD_ADD, (chord_id, size, index, meta))

    def call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``fn(*args)`` (a bound store method) on the store thread, in queue order."""
        return self._submit(fn, args)

    def _submit(self, fn: Any, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        assert self._loop is not None, "start() first"
        future: asyncio.Future[Any] = self._loop.create_future()
        with self._cv:
            if self._closing:
                future.set_exception(RuntimeError("the result store is closed"))
                return future
            self._jobs.append((fn, args, future))
            self._cv.notify()
        return future

    async def close(self, timeout: float = 5.0) -> None:
        """Finish what is queued (retrying at most ``timeout`` seconds), then stop."""
        with self._cv:
            self._closing = True
            self._close_deadline = time.monotonic() + timeout
            self._cv.notify()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout + 5)
        self.store.close()

    def _resolve(self) -> None:
        for target, ok, value in self._done.take():
            if not isinstance(target, asyncio.Future):
                try:
                    target(None if ok else value)
                except Exception:  # one bad callback must not strand the rest of the batch
                    log.exception("a result store callback failed")
            elif target.done():
                continue
            elif ok:
                target.set_result(value)
            else:
                target.set_exception(value)

    # -- store thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._closing:
                    self._cv.wait()
                if not self._jobs and self._closing:
                    return
                jobs = list(self._jobs)
                self._jobs.clear()
            self._execute(jobs)

    def _execute(self, jobs: list[tuple[Any, tuple[Any, ...], _Target]]) -> None:
        results: list[tuple[_Target, bool, Any]] = []
        i = 0
        while i < len(jobs):
            fn, args, future = jobs[i]
            if fn is _SAVE:  # consecutive saves become one batch, written in order
                j = i
                while j < len(jobs) and jobs[j][0] is _SAVE:
                    j += 1
                batch = jobs[i:j]
                ok, value = self._attempt(self.store.save, ([a[0] for _, a, _ in batch],))
                results.extend((f, ok, None if ok else value) for _, _, f in batch)
                if ok:
                    self.saved += len(batch)
                i = j
            elif fn is _CHORD_ADD:
                j = i
                while j < len(jobs) and jobs[j][0] is _CHORD_ADD:
                    j += 1
                results.extend(self._chord_adds(jobs[i:j]))
                i = j
            else:
                ok, value = self._attempt(fn, args)
                results.append((future, ok, value))
                i += 1
        self.batches += 1
        wake = False
        for item in results:
            wake = self._done.put(item) or wake
        if wake and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                self._loop.call_soon_threadsafe(self._resolve)

    def _chord_adds(
        self, batch: list[tuple[Any, tuple[Any, ...], _Target]]
    ) -> list[tuple[_Target, bool, Any]]:
        many = getattr(self.store, "chord_add_many", None)
        if many is None:
            return [(f, *self._attempt(self.store.chord_add, args)) for _, args, f in batch]
        ok, value = self._attempt(many, ([args for _, args, _ in batch],))
        if not ok:
            return [(f, False, value) for _, _, f in batch]
        return [
            (f, not isinstance(v, BaseException), v)
            for (_, _, f), v in zip(batch, value, strict=True)
        ]

    def _attempt(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[bool, Any]:
        delay = 0.05
        failures = 0
        while True:
            try:
                value = fn(*args)
            except Exception as exc:
                failures += 1
                if failures == 1:
                    log.error(
                        "result store %r failed (%s: %s); retrying, the deliveries wait unacked",
                        self.store,
                        type(exc).__name__,
                        exc,
                    )
                with self._cv:
                    gave_up = self._closing and time.monotonic() >= self._close_deadline
                if gave_up:
                    return False, exc
                time.sleep(delay)
                delay = min(delay * 2, self.max_retry_delay)
                continue
            if failures:
                log.warning(
                    "result store %r answers again after %d failure(s)", self.store, failures
                )
            return True, value
