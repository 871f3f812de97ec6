"""Live updates for open pages: server-sent events fed by the ingest thread's commits.

Why SSE and not websockets: the flow is one way (server to page), the browser's
``EventSource`` reconnects by itself and sends the session cookie like any request, and it
passes through proxies as plain HTTP. Pages send their actions as ordinary POSTs (with the
CSRF token).

A busy fleet commits thousands of task changes a second; a page does not need each one.
The hub collects what changed and sends at most one ``tick`` every :data:`TICK` seconds:
the changed task ids (up to :data:`MAX_IDS`; ``overflow`` when there were more), how many
changed, the workers that spoke, and the ingest figures. A page re-reads what it shows when
a tick concerns it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from ..protocol import dumps
from .history import Applied

__all__ = ["LiveHub"]

TICK = 0.5
MAX_IDS = 1000
KEEPALIVE = 15.0


class LiveHub:
    """Collects committed changes (on the loop thread) and fans ticks out to subscribers."""

    def __init__(self) -> None:
        self._ids: dict[str, str] = {}
        self._changed = 0
        self._workers: set[str] = set()
        self._overflow = False
        self._subscribers: set[asyncio.Queue[bytes | None]] = set()
        self._task: asyncio.Task[None] | None = None
        self.extra: dict[str, Any] = {}

    def batch(self, applied: Applied) -> None:
        """One committed batch (call on the loop: ``loop.call_soon_threadsafe``)."""
        self._changed += len(applied.tasks)
        for tid, _name, state in applied.tasks:
            if len(self._ids) < MAX_IDS:
                self._ids[tid] = state
            else:
                self._overflow = True
        self._workers.update(applied.workers)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._ticker())

    async def stop(self) -> None:
        """End the ticker and every stream (twice is harmless)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for q in list(self._subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(None)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            if not (self._changed or self._workers):
                continue
            tick = {
                "changed": self._changed,
                "tasks": self._ids,
                "overflow": self._overflow,
                "workers": sorted(self._workers),
                **self.extra,
            }
            self._ids, self._changed, self._workers, self._overflow = {}, 0, set(), False
            self.publish("tick", tick)

    def publish(self, kind: str, data: Any) -> None:
        frame = f"event: {kind}\ndata: ".encode() + dumps(data) + b"\n\n"
        for q in list(self._subscribers):
            if q.full():  # a slow page misses ticks, never blocks the others
                continue
            q.put_nowait(frame)

    def subscribe(self) -> asyncio.Queue[bytes | None]:
        q: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=20)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[bytes | None]) -> None:
        self._subscribers.discard(q)
