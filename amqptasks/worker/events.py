"""The worker's events emitter: an :class:`~.observer.Observer` that turns each step of each
delivery into an event (formats in :mod:`amqptasks.events`) and publishes them in batches.

Cost is the design constraint (docs/events.md has the measurement). An observer call only
builds a small dict and appends it to the list of its type; nothing waits for the broker.
One sender task takes all lists at most every :data:`FLUSH_INTERVAL` seconds, encodes each as
one message (:func:`~amqptasks.events.encode_groups`: type by type in task-life order, which
keeps each task's events in order) and publishes them on its own connection and channel, one
after the other, each confirmed. So under load a batch is whatever happened in the last 50 ms
(thousands of events in a handful of messages), and when idle a single event goes out at
once. When a task id that already has events in the pending batch is delivered again, the
pending lists are sealed first (a *segment*), so its two deliveries cannot interleave.

Nothing is dropped silently: while the events connection is down (or blocked by a broker
resource alarm) events wait in memory, up to :data:`MAX_BUFFER`; beyond that the oldest are
dropped, counted (``inspect stats``: ``events.dropped``) and logged. A message whose confirm
did not come is sent again after a reconnect (so an event may arrive twice;
``(hostname, pid, clock)`` identifies it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..errors import TaskExpired
from ..events import (
    EventSource,
    Groups,
    encode_groups,
    preview_text,
    with_exception,
    with_result,
)
from ..protocol import CONTENT_TYPE_JSON, Envelope, Properties
from ..topology import EVENTS_EXCHANGE
from ..transport.pika_async import AsyncPikaPublisher
from .middleware import Outcome, Rejection
from .observer import Observer
from .settle import failure_reason
from .stats import Stats

__all__ = ["FLUSH_INTERVAL", "MAX_BUFFER", "PERSISTENT", "EventEmitter", "worker_snapshot_fields"]

log = logging.getLogger("amqptasks.events")

#: Seconds between two batches at most once per this interval (an idle worker's first event
#: goes out at once).
FLUSH_INTERVAL = 0.05
#: Events held while they cannot be published; beyond this the oldest are dropped (counted).
MAX_BUFFER = 100_000
#: Events are published persistent (delivery mode 2): a durable listener queue then keeps
#: them across a broker restart. Batching makes that cheap (see docs/events.md).
PERSISTENT = True
#: At most one "events dropped" warning per this many seconds.
_WARN_INTERVAL = 60.0

Snapshot = Callable[[], dict[str, Any]]


class EventEmitter(Observer):
    """Emits task and worker events for one worker (see the module docstring)."""

    def __init__(
        self,
        publisher: AsyncPikaPublisher,
        source: EventSource,
        stats: Stats,
        snapshot: Snapshot,
        *,
        heartbeat_interval: float = 2.0,
        flush_interval: float = FLUSH_INTERVAL,
        max_buffer: int = MAX_BUFFER,
        persistent: bool = PERSISTENT,
    ) -> None:
        self.publisher = publisher
        self.source = source
        self.stats = stats
        self.snapshot = snapshot
        self.heartbeat_interval = heartbeat_interval
        self.flush_interval = flush_interval
        self.max_buffer = max_buffer
        self._props = Properties(
            content_type=CONTENT_TYPE_JSON, delivery_mode=2 if persistent else 1
        )
        #: The pending batch: sealed segments, then the segment being filled, and the ids of
        #: the task events in it; how many events all of them hold.
        self._sealed: list[Groups] = []
        self._groups: Groups = {}
        self._ids: set[str] = set()
        self._count = 0
        #: Encoded messages not confirmed yet: (routing key, body, number of events).
        self._unsent: deque[tuple[str, bytes, int]] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._sender: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._online = False
        self._last_send = 0.0
        self._last_warning = 0.0
        self._dropped_unlogged = 0

    # -- observer -------------------------------------------------------------------------------
    def _emit(self, event: dict[str, Any]) -> None:
        members = self._groups.get(event["type"])
        if members is None:
            self._groups[event["type"]] = [event]
        else:
            members.append(event)
        self._count += 1
        if self._count == 1:
            self._idle.clear()
            self._wake.set()
        elif self._count > self.max_buffer:
            self._trim()

    def _delivery(self, task_id: str) -> None:
        """A delivery's first event: seal the segment if this id already has events in it."""
        ids = self._ids
        if task_id in ids:
            self._sealed.append(self._groups)
            self._groups = {}
            ids.clear()
        ids.add(task_id)

    def received(self, env: Envelope, queue: str) -> None:
        self._delivery(env.id)
        src = self.source
        self._emit(src.with_call(src.task_event("task-received", env, queue), env))

    def started(self, env: Envelope, queue: str) -> None:
        self._emit(self.source.task_event("task-started", env, queue))

    def began(self, env: Envelope, queue: str) -> None:
        self._delivery(env.id)
        src = self.source
        received = src.with_call(src.task_event("task-received", env, queue), env)
        # One moment: the fast path only takes a delivery it can start at once.
        started = src.task_event("task-started", env, queue, received["time"])
        self._emit(received)
        self._emit(started)

    def succeeded(self, env: Envelope, queue: str, runtime: float, result: Any) -> None:
        e = self.source.task_event("task-succeeded", env, queue)
        self._emit(with_result(e, runtime, result))

    def failed(self, env: Envelope, queue: str, outcome: Outcome) -> None:
        exc = outcome.exc
        if outcome.retry_countdown is not None:
            e = self.source.task_event("task-retried", env, queue)
            e["countdown"] = outcome.retry_countdown
        elif isinstance(exc, TaskExpired):
            e = self.source.task_event("task-expired", env, queue)
            e["expires"] = env.expires.isoformat() if env.expires is not None else None
            e["detail"] = preview_text(str(exc))
            self._emit(e)
            return
        else:
            e = self.source.task_event("task-failed", env, queue)
            e["reason"] = failure_reason(exc)
        e["runtime"] = outcome.runtime
        e["retries"] = env.retries
        self._emit(with_exception(e, exc, outcome.traceback))

    def rejected(self, rejection: Rejection) -> None:
        env = rejection.envelope
        expired = rejection.reason == "expired"
        src = self.source
        if env is not None:
            self._delivery(env.id)
            e = src.task_event("task-expired" if expired else "task-rejected", env, rejection.queue)
        else:
            e = src.event("task-rejected")
            e["id"] = None if rejection.id == "<no id>" else rejection.id
            e["task"] = None
            e["queue"] = rejection.queue
        if expired:
            e["expires"] = env.expires.isoformat() if env and env.expires else None
        else:
            e["reason"] = rejection.reason
        e["detail"] = preview_text(rejection.detail)
        self._emit(e)

    def skipped(self, env: Envelope, queue: str, reason: str, terminated: bool = False) -> None:
        e = self.source.task_event("task-revoked", env, queue)
        e["reason"] = reason
        e["terminated"] = terminated
        self._emit(e)

    # -- worker events ---------------------------------------------------------------------------
    def _worker_event(self, kind: str) -> None:
        e = self.source.event(kind)
        e.update(self.snapshot())
        e["interval"] = self.heartbeat_interval
        self._emit(e)

    def online(self) -> None:
        """The worker consumes: ``worker-online`` (once), then a heartbeat every interval."""
        if self._online:
            return
        self._online = True
        self._worker_event("worker-online")
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            self._worker_event("worker-heartbeat")

    # -- sending -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the sender (on the worker's loop)."""
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send_forever())

    async def _send_forever(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            pause = self._last_send + self.flush_interval - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
            self._last_send = loop.time()
            self._encode_pending()
            while self._unsent:
                key, body, count = self._unsent[0]
                try:
                    await self.publisher.publish(
                        EVENTS_EXCHANGE, key, body, self._props, mandatory=False
                    )
                except Exception as exc:
                    failures += 1
                    self._warn(f"events not published yet ({exc}); retrying", force=failures == 1)
                    await asyncio.sleep(min(5.0, 0.1 * 2**failures))
                    self._trim()
                    break
                failures = 0
                self._unsent.popleft()
                self.stats.events_published += count
            if self._unsent or self._count:
                self._wake.set()
            else:
                self._idle.set()

    def _encode_pending(self) -> None:
        """Move the pending batch, encoded, to the end of the unsent messages."""
        if not self._count:
            return
        segments = [*self._sealed, self._groups]
        self._sealed, self._groups, self._count = [], {}, 0
        self._ids = set()
        for groups in segments:
            self._unsent.extend(encode_groups(groups))

    def _held(self) -> int:
        return self._count + sum(n for _k, _b, n in self._unsent)

    def _trim(self) -> None:
        """Drop the oldest events beyond :data:`MAX_BUFFER` (counted and logged)."""
        if self._held() <= self.max_buffer:
            return
        self._encode_pending()
        held = self._held()
        dropped = 0
        while held > self.max_buffer and self._unsent:
            _key, _body, n = self._unsent.popleft()
            held -= n
            dropped += n
        if dropped:
            self.stats.events_dropped += dropped
            self._dropped_unlogged += dropped
            self._warn(
                f"{self._dropped_unlogged} event(s) dropped: more than {self.max_buffer} "
                "could not be published"
            )

    def _warn(self, text: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_warning >= _WARN_INTERVAL:
            self._last_warning = now
            self._dropped_unlogged = 0
            log.warning("%s", text)

    async def close(self, timeout: float = 2.0) -> None:
        """``worker-offline``, then publish what is left (waiting at most ``timeout``)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._online:
            self._worker_event("worker-offline")
        if self._sender is not None:
            self._last_send = 0.0
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except asyncio.TimeoutError:
                left = self._held()
                self.stats.events_dropped += left
                log.warning("%d event(s) not published before shutdown", left)
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
        await self.publisher.close()


def worker_snapshot_fields(
    *,
    pool: str,
    concurrency: int,
    prefetch: int,
    queues: tuple[str, ...],
    active: int,
    reserved: int,
    processed: int,
    version: str,
) -> dict[str, Any]:
    """The fields of worker-online/heartbeat/offline (schema/event-v1.json)."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not available on this platform
        load = []
    return {
        "pool": pool,
        "concurrency": concurrency,
        "prefetch": prefetch,
        "queues": list(queues),
        "active": active,
        "reserved": reserved,
        "processed": processed,
        "loadavg": load,
        "sw": f"amqptasks {version}",
    }
