"""Concurrency slots: at most ``concurrency`` tasks run at once, whichever path runs them.

The fast path takes a slot synchronously (:meth:`Slots.try_take`) or leaves the delivery to
the full pipeline, which waits for one (:meth:`Slots.take`) in arrival order. So the thread
pool never queues calls behind busy threads — a queued call would start late without the
pipeline seeing it wait (an ``expires`` deadline would pass unnoticed) — and prefetched
deliveries wait in one visible place.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

__all__ = ["Slots"]


class Slots:
    """A counting semaphore with a synchronous fast acquire; loop thread only."""

    __slots__ = ("_free", "_waiters", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = size
        self._waiters: deque[asyncio.Future[Any]] = deque()

    @property
    def busy(self) -> int:
        return self.size - self._free

    def try_take(self) -> bool:
        """Take a slot if one is free right now (never when others wait: arrival order)."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    async def take(self, stopping: asyncio.Event) -> bool:
        """Wait for a slot; False if ``stopping`` is set first (then no slot is held)."""
        if self.try_take():
            return True
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
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
        """Give a slot back: to the first waiter if there is one, else to the pool."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1
