"""Revocations in a worker: which ids must not start, where they come from, what they stop.

* :class:`RevokedSet` — the revoked ids with their expiry, bounded (``revoke.max_ids``: beyond
  it the soonest to expire go first, counted and logged: a revocation is never dropped
  silently) and expiring (an expired id is forgotten on the next look).
* :class:`RevokeMiddleware` — the ``should_run`` hook: a revoked id is settled without running
  (``ctx.extra["skip"] = "revoked"``, an outcome marked ``revoked``), so it is acked after its
  REVOKED state is stored (with a result store), the caller's reply says so, the workflow is
  failed and ``task-revoked`` is emitted. Its :meth:`~RevokeMiddleware.wants` is one dict
  lookup, so the fast path still skips the hooks for every other id, and never runs a revoked
  one.
* :class:`Revocations` — follows the broker's revocations stream
  (:data:`~amqptasks.topology.REVOCATIONS_QUEUE`): at each connect, *before* any work queue is
  consumed, it writes a marker record and reads from the first offset (after a reconnect:
  from the next one it has not seen) until it sees its marker, so everything revoked before
  the worker connected is known before it takes a single task; then it keeps following, so a
  revocation made while the worker runs arrives even if the ``revoke`` command did not (a
  reconnect in between). The ``revoke`` command (worker/control.py) adds the ids too and, with
  ``terminate``, stops what runs (:meth:`Revocations.terminate`).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ..config import RevokeSettings
from ..errors import BrokerError, TaskRevoked
from ..protocol import CONTENT_TYPE_JSON, Envelope, Properties
from ..revocation import Marker, Revocation, decode_record, encode_marker
from ..topology import REVOCATIONS_ARGUMENTS, REVOCATIONS_QUEUE
from ..transport.pika_consumer import PikaConsumer, SideChannel, SideDelivery
from .middleware import Context, Middleware, Outcome, Publish

if TYPE_CHECKING:
    from .fastpath import FastPath
    from .pipeline import Pipeline

__all__ = ["SYNC_TIMEOUT", "Revocations", "RevokeMiddleware", "RevokedSet"]

log = logging.getLogger("amqptasks.worker")

#: Revocation records read ahead of the acks (the stream's flow control).
STREAM_PREFETCH = 1000
#: How long a connecting worker waits to read up to its own marker before it gives up on
#: that connection (and reconnects): it never consumes work without knowing the revocations.
SYNC_TIMEOUT = 60.0
_WARN_INTERVAL = 60.0


class RevokedSet:
    """Revoked task ids and when each revocation ends (POSIX seconds)."""

    def __init__(self, max_ids: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self.max_ids = max_ids
        self.clock = clock
        self.ids: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        #: Revocations dropped before their expiry because more than max_ids were held.
        self.evicted = 0
        self._last_warning = 0.0

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, task_id: object) -> bool:
        expires = self.ids.get(task_id)  # type: ignore[call-overload]
        if expires is None:
            return False
        if expires <= self.clock():
            del self.ids[task_id]  # type: ignore[arg-type]
            return False
        return True

    def add(self, ids: Iterable[str], expires: float) -> list[str]:
        """Revoke ``ids`` until ``expires`` (a later expiry of an id already held wins);
        returns the ids that were not held before."""
        now = self.clock()
        if expires <= now:
            return []
        new = []
        for task_id in ids:
            held = self.ids.get(task_id)
            if held is None or held <= now:
                new.append(task_id)
            if held is None or expires > held:
                self.ids[task_id] = expires
                heapq.heappush(self._heap, (expires, task_id))
        self._trim(now)
        return new

    def _trim(self, now: float) -> None:
        heap = self._heap
        while heap and (self.ids.get(heap[0][1]) != heap[0][0] or heap[0][0] <= now):
            _expires, task_id = heapq.heappop(heap)
            if self.ids.get(task_id) == _expires:
                del self.ids[task_id]  # expired
        dropped = 0
        while len(self.ids) > self.max_ids and heap:
            expires, task_id = heapq.heappop(heap)
            if self.ids.get(task_id) == expires:
                del self.ids[task_id]
                dropped += 1
        if len(heap) > 2 * len(self.ids) + 1024:  # stale entries from extended expiries
            self._heap = [(e, i) for i, e in self.ids.items()]
            heapq.heapify(self._heap)
        if dropped:
            self.evicted += dropped
            if now - self._last_warning >= _WARN_INTERVAL:
                self._last_warning = now
                log.warning(
                    "%d revocation(s) dropped before their expiry: more than revoke.max_ids "
                    "(%d) held; those ids may run (%d dropped so far)",
                    dropped,
                    self.max_ids,
                    self.evicted,
                )


class RevokeMiddleware(Middleware):
    """Settles a revoked id without running it (see the module docstring)."""

    def __init__(self, revoked: RevokedSet) -> None:
        self.revoked = revoked
        self.skipped = 0

    def wants(self, envelope: Envelope) -> bool:
        return envelope.id in self.revoked.ids  # a dict lookup: the fast path stays fast

    async def should_run(self, ctx: Context) -> bool:
        env = ctx.envelope
        if env.id not in self.revoked:
            return True
        self.skipped += 1
        log.warning(
            "task %s[%s] is revoked: settled without running",
            env.task,
            env.id,
            extra={"task_id": env.id, "task_name": env.task},
        )
        ctx.extra["skip"] = "revoked"
        ctx.preset = Outcome(
            False,
            exc=TaskRevoked(f"task {env.task}[{env.id}] was revoked"),
            traceback="",
            preset=True,
            revoked=True,
        )
        return False


class Revocations:
    """The worker's revocations: the set, the hook, the stream it follows, terminate."""

    def __init__(self, settings: RevokeSettings, hostname: str, publish: Publish) -> None:
        self.settings = settings
        self.hostname = hostname
        self.publish = publish
        self.revoked = RevokedSet(settings.max_ids)
        self.middleware = RevokeMiddleware(self.revoked)
        self.pipeline: Pipeline | None = None
        self.fast: FastPath | None = None
        #: Called with newly revoked ids (the throttle lets their waiters go).
        self.on_revoked: list[Callable[[set[str]], None]] = []
        #: The next stream offset not read yet (None: read from the first).
        self.next_offset: int | None = None
        self.records = 0
        self.undecodable = 0
        self._side: SideChannel | None = None
        self._marker: str | None = None
        self._synced: asyncio.Future[None] | None = None
        self._ack_tag = 0
        self._ack_scheduled = False

    def bind(self, pipeline: Pipeline, fast: FastPath) -> None:
        self.pipeline, self.fast = pipeline, fast

    # -- revoking -----------------------------------------------------------------------------
    def revoke(self, ids: Iterable[str], expires: float) -> list[str]:
        """Revoke ``ids`` until ``expires`` (POSIX seconds); calls that wait for a child
        process are told not to start. Returns the ids new to this worker."""
        wanted = list(ids)
        new = self.revoked.add(wanted, expires)
        if wanted and expires > time.time():
            chosen = set(wanted)
            if self.pipeline is not None:
                self.pipeline.terminate(chosen, running=False)
            for callback in self.on_revoked:
                callback(chosen)
        return new

    def terminate(self, ids: Iterable[str]) -> list[str]:
        """Stop the running executions of ``ids`` where the pool can (docs/control.md)."""
        chosen = set(ids)
        stopped: list[str] = []
        if self.pipeline is not None:
            stopped += self.pipeline.terminate(chosen)
        if self.fast is not None:
            stopped += self.fast.terminate(chosen)
        return stopped

    # -- the stream ---------------------------------------------------------------------------
    async def attach(self, consumer: PikaConsumer) -> None:
        """At each connect, before consuming work: read the stream up to our own marker."""
        side = await consumer.side_channel()
        self._side = side
        self._ack_tag = 0
        await side.declare(REVOCATIONS_QUEUE, dict(REVOCATIONS_ARGUMENTS))
        await side.qos(STREAM_PREFETCH)
        loop = asyncio.get_running_loop()
        self._synced = loop.create_future()
        self._marker = f"{self.hostname}.{os.getpid()}.{os.urandom(6).hex()}"
        props = Properties(content_type=CONTENT_TYPE_JSON, delivery_mode=2)
        await self.publish("", REVOCATIONS_QUEUE, encode_marker(self._marker), props)
        offset: int | str = "first" if self.next_offset is None else self.next_offset
        started = time.monotonic()
        side.consume(REVOCATIONS_QUEUE, self._on_record, arguments={"x-stream-offset": offset})
        synced: asyncio.Future[Any] = self._synced
        closed: asyncio.Future[Any] = side.closed
        done, _ = await asyncio.wait(
            {synced, closed}, timeout=SYNC_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        if synced not in done:
            side.close()
            raise BrokerError(
                f"the revocations stream {REVOCATIONS_QUEUE!r} was not read up to this "
                f"worker's marker within {SYNC_TIMEOUT:g}s; not consuming until it is"
            )
        log.info(
            "revocations: %d id(s) revoked (stream read from offset %s in %.3fs)",
            len(self.revoked),
            offset,
            time.monotonic() - started,
        )

    def _on_record(self, delivery: SideDelivery) -> None:
        offset = delivery.headers.get("x-stream-offset")
        if isinstance(offset, int):
            self.next_offset = offset + 1
        self._ack(delivery.tag)
        try:
            record = decode_record(delivery.body)
        except Exception as exc:  # a foreign or broken record: say so, keep reading
            self.undecodable += 1
            log.warning("revocations stream: record at offset %s skipped: %s", offset, exc)
            return
        if isinstance(record, Revocation):
            self.records += 1
            if not record.expired():
                self.revoke(record.ids, record.expires)
        elif (
            isinstance(record, Marker)
            and record.id == self._marker
            and self._synced is not None
            and not self._synced.done()
        ):
            self._synced.set_result(None)

    def _ack(self, tag: int) -> None:
        """Acks are the stream's credit: one ``multiple`` ack per loop turn."""
        self._ack_tag = tag
        if not self._ack_scheduled:
            self._ack_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_ack)

    def _flush_ack(self) -> None:
        self._ack_scheduled = False
        if self._side is not None and self._ack_tag:
            self._side.ack(self._ack_tag, multiple=True)

    def describe(self) -> dict[str, object]:
        """``inspect stats``: what this worker holds and how far it read."""
        return {
            "ids": len(self.revoked),
            "evicted": self.revoked.evicted,
            "skipped": self.middleware.skipped,
            "records": self.records,
            "next_offset": self.next_offset,
        }
