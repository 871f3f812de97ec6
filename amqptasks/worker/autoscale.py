"""The worker's pool size at run time: ``control pool-grow|pool-shrink|autoscale`` and
``--autoscale MAX,MIN``.

:class:`Pool` moves the three things that make up concurrency together — the slots (how many
tasks run at once, :mod:`.slots`), the runner (threads or child processes with room for
them, :mod:`.pool` / :mod:`.process_pool`) and the prefetch (``size × prefetch_multiplier``
per consumer, :meth:`~amqptasks.transport.pika_consumer.PikaConsumer.set_prefetch`) — so a
grown pool gets the work to fill it and a shrunk one does not hoard work another worker could
run. A shrink never interrupts a running task: slots and children are taken back as their
tasks finish.

:class:`Autoscaler` grows the pool with the backlog — deliveries waiting for a slot, which
exist only while the prefetch is larger than the pool (``prefetch_multiplier`` of 2 or more)
— at once (the slots wake it when a delivery starts waiting), up to ``maximum``; and shrinks
it when it was idle: after ``idle`` seconds in which no delivery waited and some slots were
never used, to the most that were busy at once in that time (at least ``minimum``). The
same policy as Celery's autoscaler (grow on demand, shrink after a keep-alive), with the
backlog measured where deliveries wait instead of guessed from the prefetch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .consume import ConsumeLoop
from .pipeline import Pipeline
from .slots import Slots

__all__ = ["DEFAULT_IDLE", "Autoscaler", "Pool"]

log = logging.getLogger("amqptasks.worker")

#: Seconds a pool must have had unused slots (and no backlog) before the autoscaler shrinks it.
DEFAULT_IDLE = 30.0
#: How often the autoscaler samples the pool (growth does not wait for it: the slots wake it).
TICK = 1.0


class Pool:
    """Resizes one worker's concurrency (slots, runner, prefetch) as one thing."""

    def __init__(self, pipeline: Pipeline, consuming: ConsumeLoop, multiplier: int) -> None:
        self.pipeline = pipeline
        self.consuming = consuming
        self.multiplier = multiplier
        self._lock = asyncio.Lock()
        #: The autoscaler keeping this pool's size, if any (``--autoscale``, ``autoscale``).
        self.autoscaler: Autoscaler | None = None

    @property
    def size(self) -> int:
        return self.pipeline.slots.size

    @property
    def prefetch(self) -> int:
        return self.consuming.prefetch

    async def resize(self, size: int, *, why: str = "control") -> int:
        """Run at most ``size`` tasks at once from now on; returns the new size."""
        if size < 1:
            raise ValueError(f"a pool needs at least one slot, got {size}")
        async with self._lock:
            old = self.size
            if size == old:
                return size
            slots, runner = self.pipeline.slots, self.pipeline.runner
            if size > old:  # room first, then the slots, then more work
                if runner is not None:
                    runner.resize(size)
                slots.resize(size)
            else:  # fewer starts first; running tasks keep their slots until they finish
                slots.resize(size)
                if runner is not None:
                    runner.resize(size)
            await self.consuming.set_prefetch(size * self.multiplier, running=size)
            log.info(
                "pool %s from %d to %d (%s); prefetch %d per consumer",
                "grown" if size > old else "shrunk",
                old,
                size,
                why,
                self.prefetch,
            )
            if self.autoscaler is not None:
                self.autoscaler.reset()  # a new window: what was busy before says nothing
            return size

    async def grow(self, n: int) -> int:
        """``pool-grow N``: N more slots (an autoscaler's maximum rises to follow)."""
        if n < 1:
            raise ValueError(f"pool-grow needs N of at least 1, got {n}")
        size = self.size + n
        if self.autoscaler is not None and size > self.autoscaler.maximum:
            self.autoscaler.maximum = size
        return await self.resize(size)

    async def shrink(self, n: int) -> int:
        """``pool-shrink N``: N fewer slots, one at least stays (an autoscaler's minimum
        falls to follow)."""
        if n < 1:
            raise ValueError(f"pool-shrink needs N of at least 1, got {n}")
        if n >= self.size:
            raise ValueError(
                f"pool-shrink {n}: the pool has {self.size} slot(s) and keeps at least one, "
                f"so it can shrink by at most {self.size - 1}"
            )
        size = self.size - n
        if self.autoscaler is not None and size < self.autoscaler.minimum:
            self.autoscaler.minimum = size
        return await self.resize(size)

    async def autoscale(self, maximum: int, minimum: int, *, idle: float | None = None) -> None:
        """Keep the pool between ``minimum`` and ``maximum`` from now on (``--autoscale``,
        ``control autoscale``); the size moves into the bounds at once."""
        if self.multiplier < 2:
            raise ValueError(
                "autoscale needs a prefetch multiplier of at least 2: with "
                f"{self.multiplier} no delivery ever waits for a slot, so there is no backlog "
                "to grow on (--prefetch-multiplier, worker.prefetch_multiplier)"
            )
        if self.autoscaler is None:
            scaler = Autoscaler(
                self.pipeline.slots,
                self._autoscaled,
                maximum,
                minimum,
                idle=DEFAULT_IDLE if idle is None else idle,
            )
            self.autoscaler = scaler
            scaler.start()
        else:
            self.autoscaler.set_bounds(maximum, minimum)
            if idle is not None:
                self.autoscaler.idle = idle
        inside = min(max(self.size, minimum), maximum)
        if inside != self.size:
            await self.resize(inside, why="autoscale")

    async def _autoscaled(self, size: int) -> int:
        return await self.resize(size, why="autoscale")

    async def close(self) -> None:
        if self.autoscaler is not None:
            await self.autoscaler.stop()


class Autoscaler:
    """Keeps a pool between ``minimum`` and ``maximum`` slots, following the backlog of
    ``slots``; ``resize(size)`` changes the pool (:meth:`Pool.resize`)."""

    def __init__(
        self,
        slots: Slots,
        resize: Callable[[int], Awaitable[Any]],
        maximum: int,
        minimum: int,
        *,
        idle: float = DEFAULT_IDLE,
        tick: float = TICK,
    ) -> None:
        self.slots = slots
        self.resize = resize
        self.set_bounds(maximum, minimum)
        self.idle = idle
        self.tick = tick
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.reset()

    def set_bounds(self, maximum: int, minimum: int) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError(f"autoscale needs 1 <= MIN <= MAX, got MAX {maximum}, MIN {minimum}")
        self.maximum, self.minimum = maximum, minimum

    def reset(self, now: float | None = None) -> None:
        """Start a new observation window (after a resize or a backlog)."""
        self._since = time.monotonic() if now is None else now
        self._peak = self.slots.busy

    def start(self) -> None:
        self.slots.on_wait = self._wake.set
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self.slots.on_wait = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.tick)
            self._wake.clear()
            try:
                await self.step()
            except Exception:  # the pool keeps its size; the next tick tries again
                log.exception("autoscale step failed")

    def target(self, now: float) -> int | None:
        """The size the pool should have now, or None to leave it as it is."""
        slots = self.slots
        size = slots.size
        backlog = slots.waiting
        self._peak = max(self._peak, slots.busy)
        if size < self.minimum or size > self.maximum:
            return min(max(size, self.minimum), self.maximum)
        if backlog:
            self.reset(now)
            grown = min(self.maximum, size + backlog)
            return grown if grown > size else None
        if now - self._since >= self.idle:
            shrunk = max(self.minimum, self._peak)
            self.reset(now)
            return shrunk if shrunk < size else None
        return None

    async def step(self, now: float | None = None) -> None:
        size = self.target(time.monotonic() if now is None else now)
        if size is not None:
            await self.resize(size)
            self.reset(now)
