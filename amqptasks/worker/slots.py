"""Concurrency slots: at most ``size`` tasks run at once, whichever path runs them.

The fast path takes a slot synchronously (:meth:`Slots.try_take`); the full pipeline waits
for one (:meth:`Slots.take`). When none is free the thread pool's fast path queues a
:class:`SyncWaiter` (:meth:`Slots.enqueue`) beside the pipeline's waiters, in the same
arrival order, and starts its call when the slot is granted. So the thread pool never queues
calls behind busy threads — a queued call would start late without the worker seeing it wait
(an ``expires`` deadline would pass unnoticed; the fast path takes no message with one
anyway) — and prefetched deliveries wait in one visible place (:attr:`Slots.waiting`: the
backlog the autoscaler grows on). Why the fast path queues instead of handing the delivery
to the pipeline: under load every slot is busy, so every delivery took the pipeline (an
asyncio task, ``run_in_executor``, hooks) and a saturated threads pool ran no-ops at a third
of its fast-path rate.

The size can change while tasks run (``control pool-grow|pool-shrink``, ``--autoscale``):
growing hands the new slots to waiters at once; shrinking never interrupts a running task,
it takes slots back as they are released (``busy`` may exceed ``size`` until then).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["Slots", "SyncWaiter"]


class SyncWaiter:
    """A place in the slot queue for a caller that does not await (the fast path):
    ``grant`` is called on the loop, with the slot held, when its turn comes."""

    __slots__ = ("_done", "_grant")

    def __init__(self, grant: Callable[[], None]) -> None:
        self._grant = grant
        self._done = False

    def done(self) -> bool:
        return self._done

    def cancel(self) -> bool:
        """Leave the queue (False: granted already, the slot is the caller's)."""
        if self._done:
            return False
        self._done = True
        return True

    def set_result(self, _value: object) -> None:
        self._done = True
        self._grant()


class Slots:
    """A resizable counting semaphore with a synchronous fast acquire; loop thread only."""

    __slots__ = ("_waiters", "busy", "on_wait", "size")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a pool needs at least one slot, got {size}")
        self.size = size
        #: Slots held right now (by running tasks, or granted and about to run).
        self.busy = 0
        self._waiters: deque[asyncio.Future[Any] | SyncWaiter] = deque()
        #: Called when a delivery starts waiting for a slot (the autoscaler's wake-up).
        self.on_wait: Callable[[], None] | None = None

    @property
    def waiting(self) -> int:
        """Deliveries waiting for a slot now (the backlog)."""
        return sum(1 for w in self._waiters if not w.done())

    def try_take(self) -> bool:
        """Take a slot if one is free right now (never when others wait: arrival order)."""
        waiters = self._waiters
        while waiters and waiters[0].done():  # fast-path waiters that left the queue
            waiters.popleft()
        if self.busy < self.size and not waiters:
            self.busy += 1
            return True
        return False

    def enqueue(self, waiter: SyncWaiter) -> None:
        """Queue ``waiter`` for the next free slot (after everyone already waiting)."""
        self._waiters.append(waiter)
        if self.on_wait is not None:
            self.on_wait()
        self._grant()  # a slot may be free behind waiters that left

    async def take(self, stopping: asyncio.Event) -> bool:
        """Wait for a slot; False if ``stopping`` is set first (then no slot is held)."""
        if self.try_take():
            return True
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if self.on_wait is not None:
            self.on_wait()
        stop: asyncio.Future[Any] = asyncio.ensure_future(stopping.wait())
        granted = False
        try:
            await asyncio.wait({waiter, stop}, return_when=asyncio.FIRST_COMPLETED)
            granted = waiter.done() and not waiter.cancelled()
        finally:
            stop.cancel()
            if not granted:
                if waiter.done() and not waiter.cancelled():
                    self.release()  # granted just as we were cancelled: pass it on
                else:
                    waiter.cancel()
                    self._waiters.remove(waiter)
        if not granted:
            return False
        if stopping.is_set():
            self.release()  # granted just as the shutdown began: pass it on
            return False
        return True

    def release(self) -> None:
        """Give a slot back: to the first waiter while the size allows, else to the pool."""
        self.busy -= 1
        self._grant()

    def resize(self, size: int) -> None:
        """Change how many tasks may run at once. Growing serves waiters now; shrinking
        lets running tasks finish and keeps their slots when they are released."""
        if size < 1:
            raise ValueError(f"a pool needs at least one slot, got {size}")
        self.size = size
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self.busy < self.size:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.busy += 1
                waiter.set_result(None)
