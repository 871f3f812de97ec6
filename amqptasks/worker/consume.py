"""The consuming connection's life: connect (waiting for the broker), declare, consume,
reconnect after a loss — and the dispatch of each delivery to the fast path or the pipeline.

Workers are started by systemd or compose before, or together with, their broker. So a broker
that is not there yet is waited for with the same exponential backoff as a reconnection
(0.5 s doubling up to ``broker.reconnect_max_delay``), the first five attempts logged and then
one line a minute; a signal ends the wait at once, and
``--connect-timeout`` gives up. What waiting cannot fix ends the worker with the reason: the
broker refusing the login, the vhost or a permission, a queue that does not exist (with
``--no-declare``), or a topology that differs from the broker's.

After a loss the consumers are re-attached to every queue; a task that was running keeps
running and its ack (on the dead channel) is skipped — the broker already gave the delivery
back (at-least-once). With several broker addresses (a cluster's nodes) each attempt goes to
the next one in failover order (:mod:`..transport.failover`); the backoff grows only after a
whole round of them failed, so a worker whose node died is consuming from another at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..celery_compat import decode_any
from ..config import Settings, redact_url
from ..errors import BrokerError, BrokerRefused, TopologyError
from ..protocol import Envelope
from ..transport.aio import declare_topology
from ..transport.failover import Addresses
from ..transport.pika_consumer import PikaConsumer
from ..transport.pika_consumer import PikaDelivery as Delivery
from .fastpath import FastPath
from .pipeline import Pipeline
from .stats import Stats

__all__ = ["ConsumeLoop", "backoff_delays"]

log = logging.getLogger("amqptasks.worker")
T = TypeVar("T")
#: The first attempts are each logged; after them, one line at most this often (seconds).
LOUD_ATTEMPTS = 5
QUIET_LOG_INTERVAL = 60.0


def backoff_delays(cap: float, first: float = 0.5) -> Callable[[int], float]:
    """Delay before attempt ``n`` (0-based): ``first * 2**n``, at most ``cap``."""
    return lambda n: min(cap, first * 2 ** min(n, 32))


class _Stopped(Exception):
    """The worker was asked to stop while waiting for the broker."""


class ConsumeLoop:
    """Owns the consuming connection of one worker and feeds its deliveries on."""

    def __init__(
        self,
        settings: Settings,
        queues: tuple[str, ...],
        *,
        prefetch: int,
        hostname: str,
        pipeline: Pipeline,
        fast: FastPath,
        stats: Stats,
        stopping: asyncio.Event,
        done: asyncio.Event,
        declare: bool = True,
        connect_timeout: float | None = None,
    ) -> None:
        self.settings = settings
        self.queues = queues
        self.prefetch = prefetch
        self.hostname = hostname
        self.pipeline = pipeline
        self.fast = fast
        self.stats = stats
        self.stopping = stopping
        self.done = done
        self.declare = declare
        self.connect_timeout = connect_timeout
        self.consumer: PikaConsumer | None = None
        #: Called each time every consumer is attached (the CLI prints "ready: consuming").
        self.on_ready: Callable[[], None] | None = None
        #: Awaited after each connect, before any work queue is consumed (the revocations:
        #: a worker must know them before it takes a task).
        self.before_consume: list[Callable[[PikaConsumer], Awaitable[None]]] = []
        #: Awaited after each (re)attach with the new connection (the control server's queue).
        self.attach_hooks: list[Callable[[PikaConsumer], Awaitable[None]]] = []
        self._lost = asyncio.Event()
        self._last_error: BaseException | str = "connection lost"
        self._declared = False
        self._delay = backoff_delays(settings.broker.reconnect_max_delay)
        self.addresses = Addresses(settings.broker.urls)
        #: The address of the current (or last) consuming connection.
        self.url = self.addresses.preferred

    # -- the connection's life ------------------------------------------------------------------
    async def run(self) -> None:
        """Consume until ``done``; raises :class:`BrokerError` for what waiting cannot fix."""
        attempt = 0
        connected_once = False
        started = time.monotonic()
        last_log = 0.0
        in_round = 0  # addresses tried since the last backoff sleep
        while not self.stopping.is_set():
            self._lost.clear()
            url = self.url = self.addresses.preferred
            consumer = PikaConsumer(
                url,
                prefetch=self.prefetch,
                name=f"{self.hostname} consumer",
                heartbeat=self.settings.broker.heartbeat,
            )
            try:
                await self._unless_stopped(self._attach(consumer))
            except _Stopped:
                await consumer.close()
                return
            except (BrokerError, TopologyError) as exc:
                await consumer.close()
                self._last_error = exc
                self.addresses.failed(url)
                if isinstance(exc, (BrokerRefused, TopologyError)):
                    if not connected_once:
                        raise  # a configuration problem: say so and exit
                    log.error("reconnect refused, will retry: %s", exc)
                in_round += 1
                if in_round < len(self.addresses):
                    log.warning("broker %s: %s; trying the next address", redact_url(url), exc)
                    continue  # the rest of the round first, without a backoff sleep
            else:
                self.addresses.answered(url)
                if attempt or connected_once:
                    where = f" on {redact_url(url)}" if len(self.addresses) > 1 else ""
                    log.warning("consuming again%s: %s", where, ", ".join(self.queues))
                attempt = 0
                connected_once = True
                if self.on_ready is not None:
                    self.on_ready()
                await self._wait_any(self.done, self._lost)
                if self.done.is_set():
                    return
                self.stats.reconnects += 1
                self.addresses.failed(url)  # lost: the next address first
                if len(self.addresses) > 1:
                    in_round = 1
                    continue  # another node at once: the backoff is for a whole round
            in_round = 0
            delay = self._delay(attempt)
            attempt += 1
            waited = time.monotonic() - started
            if (
                not connected_once
                and self.connect_timeout is not None
                and waited + delay > self.connect_timeout
            ):
                raise BrokerError(
                    f"no broker at {self.addresses} after "
                    f"{waited:.1f}s (--connect-timeout {self.connect_timeout:g}): "
                    f"{self._last_error}"
                )
            now = time.monotonic()
            if attempt <= LOUD_ATTEMPTS or now - last_log >= QUIET_LOG_INTERVAL:
                last_log = now
                what = "broker not reachable" if not connected_once else "reconnecting"
                log.warning(
                    "%s (%s); next attempt in %.1fs (attempt %d)",
                    what,
                    self._last_error,
                    delay,
                    attempt,
                )
            try:
                await asyncio.wait_for(self.done.wait(), delay)
                return
            except asyncio.TimeoutError:
                pass

    async def _attach(self, consumer: PikaConsumer) -> None:
        """Connect, declare (once, on the first connection), consume every queue."""
        await consumer.connect()
        self.consumer = consumer
        if self.declare and not self._declared:
            await declare_topology(self.url, self.settings.topology.subset(self.queues))
            self._declared = True
        consumer.add_close_callback(self._on_connection_lost)
        for hook in self.before_consume:
            await hook(consumer)
        for q in self.queues:
            await consumer.consume(q, self.on_delivery)
        for hook in self.attach_hooks:
            await hook(consumer)

    async def _unless_stopped(self, work: Awaitable[T]) -> T:
        """Await ``work`` unless the worker is told to stop first (then raise _Stopped)."""
        job = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({job, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not job.done():
            job.cancel()
            await asyncio.gather(job, return_exceptions=True)
            raise _Stopped
        return job.result()

    @staticmethod
    async def _wait_any(*events: asyncio.Event) -> None:
        waiters = {asyncio.ensure_future(e.wait()) for e in events}
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()

    def _on_connection_lost(self, exc: BaseException | None) -> None:
        if self.stopping.is_set():
            return
        self._last_error = exc or "connection lost"
        log.error(
            "connection to the broker lost (%s); unacked messages return to their queues", exc
        )
        self.fast.cancel_stale()
        self._lost.set()

    async def add_queue(self, queue: str) -> None:
        """Consume one more queue from now on (and after every reconnect)."""
        if self.declare:
            await declare_topology(self.addresses.round(), self.settings.topology.subset([queue]))
        if self.consumer is not None and not self.consumer.is_closed:
            await self.consumer.consume(queue, self.on_delivery)
        self.queues = (*self.queues, queue)

    async def cancel_queue(self, queue: str) -> None:
        """Stop consuming ``queue``; what was delivered from it still runs and settles."""
        self.queues = tuple(q for q in self.queues if q != queue)
        if self.consumer is not None and not self.consumer.is_closed:
            await self.consumer.cancel_queue(queue)

    @property
    def held(self) -> int:
        """Deliveries received on the current connection and not settled yet."""
        consumer = self.consumer
        return 0 if consumer is None or consumer.is_closed else consumer.held

    async def set_prefetch(self, prefetch: int, *, running: int) -> None:
        """Use a new per-consumer prefetch from now on (and after every reconnect); see
        :meth:`PikaConsumer.set_prefetch` for how the live consumers follow."""
        self.prefetch = prefetch
        if self.consumer is not None and not self.consumer.is_closed:
            await self.consumer.set_prefetch(prefetch, running=running)

    async def cancel(self) -> None:
        if self.consumer is not None:
            await self.consumer.cancel()

    async def close(self) -> None:
        if self.consumer is not None:
            await self.consumer.close()  # anything not acked goes back to its queue

    # -- deliveries -----------------------------------------------------------------------------
    def on_delivery(self, delivery: Delivery) -> None:
        """Called by the consumer for each delivery, on the loop, without a task: decode once,
        then the fast path or a task running the full pipeline."""
        env: Envelope | None = None
        if not self.stopping.is_set() and len(delivery.body) <= self.settings.max_body_size:
            try:
                env = decode_any(
                    delivery.body,
                    delivery.properties,
                    self.settings.accept,
                    celery_ingest=self.settings.celery_ingest,
                    chords=self.settings.results.has_store,
                )
            except Exception:
                env = None  # the full pipeline decodes again and dead-letters with the reason
        if env is None or not self.fast.run(delivery, env):
            self.pipeline.spawn(self.pipeline.process(delivery, env), delivery)
