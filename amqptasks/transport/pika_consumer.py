"""The worker's consuming connection: pika's asyncio adapter on the worker's event loop.

Why not aio-pika here: profiles showed the client was the cost. aio-pika/aiormq pass every
frame through an asyncio queue and create two tasks per delivery; pika's ``AsyncioConnection``
parses frames in ``data_received`` and calls a plain function per delivery. The worker then
runs the common case (a sync task, no reply wanted) without creating a task at all.

Acks after the outcome, batched safely (:class:`AckWindow`): a ``basic.ack multiple=True`` up
to tag T is sent only when every delivery with a tag ≤ T is settled — so a delivery still
running (or waiting for its dead-letter copy to be confirmed) is never acked by a neighbour.
The window is flushed once per event-loop turn, after all frames read in that turn.

A new prefetch (:meth:`PikaConsumer.set_prefetch`: the pool grew or shrank) needs new
consumers: RabbitMQ applies a per-consumer ``basic.qos`` (``global=false``) only to consumers
created after it, and a channel-wide (``global=true``) limit is refused by quorum queues. So
each queue's consumer is cancelled and started again under the new limit — at once when the
limit grows; when it shrinks, once the old consumer's deliveries still waiting for a slot are
gone, so a shrunk worker never holds more than its new prefetch waiting.

Features that read from the broker beside the work queues (the revocations stream, fleet-wide
rate-limit tokens and their lock) get a :class:`SideChannel` of this connection: their own
channel and QoS, never a publish (a resource alarm blocks a connection that publishes, and
this one must keep acking).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from typing import Any

import pika
import pika.exceptions

from ..config import redact_url
from ..errors import BrokerError, BrokerRefused, TopologyError
from ..protocol import Properties
from . import pika_fields  # noqa: F401  (float header values decoded as floats, not ints)
from .pika_frames import ConsumerConnection
from .refusal import refusal, refused

__all__ = ["AckWindow", "Feed", "PikaConsumer", "PikaDelivery", "SideChannel", "SideDelivery"]

log = logging.getLogger("amqptasks.transport")


def _cancel(channel: Any, tag: str, callback: Callable[[Any], None]) -> None:
    channel.basic_cancel(tag, callback=callback)


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


_OS_ERROR = re.compile(r"\b(\w+Error)\((\d+), '([^']*)'\)")


def connect_failure(exc: BaseException) -> str:
    """pika's connection-workflow error in a few words (its repr nests four levels deep):
    the socket error when there is one (``connection refused``), else a timeout or the repr."""
    text = repr(exc)
    match = _OS_ERROR.search(text)
    if match:
        return f"{match.group(3).lower()} ({match.group(1)})"
    if "Timeout" in text:
        return "timed out before the AMQP handshake completed"
    return text


class AckWindow:
    """Tracks unsettled delivery tags of one channel and acks settled prefixes at once."""

    __slots__ = ("done_max", "last_acked", "pending")

    def __init__(self) -> None:
        self.pending: set[int] = set()
        self.done_max = 0
        self.last_acked = 0

    def delivered(self, tag: int) -> None:
        self.pending.add(tag)

    def settle(self, tag: int, acked: bool) -> None:
        self.pending.discard(tag)
        if acked and tag > self.done_max:
            self.done_max = tag

    def ackable(self) -> int:
        """The highest tag that may be acked with ``multiple=True`` now (0: nothing)."""
        limit = min(self.pending) - 1 if self.pending else self.done_max
        target = min(limit, self.done_max)
        return target if target > self.last_acked else 0


class Feed:
    """One consumer of one queue, and how many of its deliveries are not settled yet."""

    __slots__ = ("held", "on_settled", "queue", "tag")

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.tag = ""
        self.held = 0
        #: Called after each settle while a replacement consumer waits for this one to drain.
        self.on_settled: Callable[[], None] | None = None

    def settled(self) -> None:
        self.held -= 1
        if self.on_settled is not None:
            self.on_settled()


class PikaDelivery:
    """A received message with its tag: the worker's client-independent view."""

    __slots__ = (
        "_consumer",
        "_feed",
        "body",
        "exchange",
        "properties",
        "queue",
        "redelivered",
        "routing_key",
        "tag",
    )

    def __init__(
        self, consumer: PikaConsumer, feed: Feed, method: Any, props: Any, body: bytes
    ) -> None:
        self._consumer = consumer
        self._feed = feed
        self.queue = feed.queue
        self.body = body
        self.tag: int = method.delivery_tag
        self.exchange: str = method.exchange or ""
        self.routing_key: str = method.routing_key or ""
        self.redelivered = bool(method.redelivered)
        ts = props.timestamp
        self.properties = Properties(
            content_type=props.content_type,
            content_encoding=props.content_encoding,
            message_id=props.message_id,
            correlation_id=props.correlation_id,
            reply_to=props.reply_to,
            priority=props.priority,
            headers=props.headers,
            delivery_mode=props.delivery_mode,
            timestamp=datetime.fromtimestamp(ts, timezone.utc) if ts else None,
        )

    @property
    def stale(self) -> bool:
        """The channel it came on is gone: it cannot be settled any more, and the broker has
        already given it back to the queue (running it now would run it twice)."""
        return self._consumer.is_closed

    def ack_now(self) -> None:
        """Settle as done: acked with the next flush (batched, in tag order)."""
        self._consumer.settle(self.tag, acked=True)
        self._feed.settled()

    async def ack(self) -> None:
        self.ack_now()

    async def reject(self) -> None:
        """Reject without requeue: the queue's dead-letter exchange takes it."""
        self._consumer.reject(self.tag, requeue=False)
        self._feed.settled()

    async def requeue(self) -> None:
        """Give the message back to the queue (prefetched work not started at shutdown)."""
        self._consumer.reject(self.tag, requeue=True)
        self._feed.settled()


DeliveryCallback = Callable[[PikaDelivery], None]


class SideDelivery:
    """A message on a :class:`SideChannel`: tag, body, headers, redelivered."""

    __slots__ = ("body", "headers", "redelivered", "tag")

    def __init__(self, method: Any, props: Any, body: bytes) -> None:
        self.tag: int = method.delivery_tag
        self.redelivered = bool(method.redelivered)
        self.headers: dict[str, Any] = props.headers or {}
        self.body = body


class SideChannel:
    """A channel of its own on the consuming connection (no publishing on it)."""

    def __init__(self, consumer: PikaConsumer, channel: Any, loop: asyncio.AbstractEventLoop):
        self._consumer = consumer
        self._channel = channel
        self._loop = loop
        #: Resolved with the reason when the broker (or we) closed this channel.
        self.closed: asyncio.Future[BaseException | None] = loop.create_future()
        channel.add_on_close_callback(self._on_close)

    def _on_close(self, _channel: Any, exc: BaseException) -> None:
        _resolve(self.closed, exc)
        if not isinstance(exc, pika.exceptions.ChannelClosedByClient):
            self._consumer._on_side_channel_closed(_channel, exc)

    @property
    def is_open(self) -> bool:
        return bool(self._channel.is_open)

    async def _rpc(self, start: Callable[[Callable[[Any], None]], None]) -> Any:
        done: asyncio.Future[Any] = self._loop.create_future()
        start(lambda frame: _resolve(done, frame))
        waiters: set[asyncio.Future[Any]] = {done, self.closed}
        if self._consumer._closed is not None:
            waiters.add(self._consumer._closed)
        await asyncio.wait(
            waiters, timeout=self._consumer.timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if not done.done():
            reason = self.closed.result() if self.closed.done() else None
            raise BrokerError(f"the broker closed the channel ({reason or 'or did not answer'})")
        return done.result()

    async def qos(self, prefetch: int) -> None:
        channel = self._channel
        await self._rpc(
            lambda cb: channel.basic_qos(prefetch_count=prefetch, global_qos=False, callback=cb)
        )

    async def declare(
        self, queue: str, arguments: dict[str, Any] | None = None, *, passive: bool = False
    ) -> int:
        """Declare a durable queue (or check one, ``passive``); its ready message count.

        A queue that exists with other arguments raises :class:`TopologyError` saying which
        (the channel is closed by the broker then).
        """
        channel = self._channel
        try:
            frame = await self._rpc(
                lambda cb: channel.queue_declare(
                    queue, passive=passive, durable=True, arguments=arguments, callback=cb
                )
            )
        except BrokerError as exc:
            if "PRECONDITION_FAILED" in str(exc):
                raise TopologyError(
                    f"queue {queue!r} differs from what we declare: {exc}"
                ) from None
            raise
        return int(frame.method.message_count)

    def consume(
        self,
        queue: str,
        handler: Callable[[SideDelivery], None],
        *,
        arguments: dict[str, Any] | None = None,
    ) -> str:
        """Consume ``queue`` with manual acks; ``handler`` runs on the loop per message."""

        def on_message(_ch: Any, method: Any, props: Any, body: bytes) -> None:
            handler(SideDelivery(method, props, body))

        tag: str = self._channel.basic_consume(
            queue, on_message, auto_ack=False, arguments=arguments
        )
        return tag

    async def cancel(self, tag: str) -> None:
        if self._channel.is_open:
            await self._rpc(partial(_cancel, self._channel, tag))

    def ack(self, tag: int, multiple: bool = False) -> None:
        if self._channel.is_open:
            self._channel.basic_ack(tag, multiple=multiple)

    def requeue(self, tag: int) -> None:
        if self._channel.is_open:
            self._channel.basic_nack(tag, multiple=False, requeue=True)

    def close(self) -> None:
        if self._channel.is_open:
            self._channel.close()


class PikaConsumer:
    """One consuming connection and channel: per-consumer QoS, manual acks."""

    def __init__(
        self,
        url: str,
        *,
        prefetch: int,
        name: str = "amqptasks worker",
        timeout: float = 10.0,
        heartbeat: int | None = None,
    ) -> None:
        self.url = url
        self.prefetch = prefetch
        self.name = name
        self.timeout = timeout
        self.heartbeat = heartbeat
        self._conn: Any = None
        self._channel: Any = None
        #: The consumer of each consumed work queue (absent while a replacement waits).
        self._feeds: dict[str, Feed] = {}
        #: What each consumed work queue's deliveries are handed to.
        self._handlers: dict[str, DeliveryCallback] = {}
        #: Cancelled consumers whose deliveries are not all settled yet, per queue.
        self._draining: dict[str, list[Feed]] = {}
        self._window = AckWindow()
        self._flush_scheduled = False
        self._close_callbacks: list[Callable[[BaseException | None], None]] = []
        self._closed: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- connection --------------------------------------------------------------------------
    async def connect(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = loop.create_future()
        self._closed = loop.create_future()
        params = pika.URLParameters(self.url)
        params.client_properties = {"connection_name": self.name}
        params.connection_attempts = 1
        params.socket_timeout = self.timeout
        params.stack_timeout = self.timeout
        if self.heartbeat:
            params.heartbeat = self.heartbeat

        def fail(exc: BaseException) -> None:
            # pika calls this (not on_close_callback) for a connection that never opened,
            # also when close() aborts an opening one: nothing more to wait for in close().
            if self._closed is not None and not self._closed.done():
                self._closed.set_result(None)
            if opened.done():
                return
            reason = refusal(exc)
            if reason is not None:
                opened.set_exception(refused(self.url, reason))
            else:
                opened.set_exception(
                    BrokerError(
                        f"cannot connect to broker {redact_url(self.url)}: {connect_failure(exc)}"
                    )
                )

        def on_channel(channel: Any) -> None:
            self._channel = channel
            self._conn.fast_channel(channel)
            channel.add_on_close_callback(self._on_channel_closed)
            # global_qos=False: the limit applies to each consumer (per-consumer QoS).
            channel.basic_qos(
                prefetch_count=self.prefetch,
                global_qos=False,
                callback=lambda _f: _resolve(opened, None),
            )

        self._conn = ConsumerConnection(
            params,
            on_open_callback=lambda conn: conn.channel(on_open_callback=on_channel),
            on_open_error_callback=lambda _c, exc: fail(exc),
            on_close_callback=self._on_connection_closed,
            custom_ioloop=loop,
        )
        try:
            await asyncio.wait_for(opened, self.timeout)
        except asyncio.TimeoutError:
            await self.close()
            raise BrokerError(
                f"cannot connect to broker {redact_url(self.url)}: timed out after {self.timeout}s"
            ) from None

    def _on_connection_closed(self, _conn: Any, exc: BaseException) -> None:
        self._notify(exc)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def _on_channel_closed(self, _channel: Any, exc: BaseException) -> None:
        self._notify(exc)
        if self._conn is not None and self._conn.is_open:
            self._conn.close()

    def _on_side_channel_closed(self, _channel: Any, exc: BaseException) -> None:
        if self._conn is not None and self._conn.is_open:
            log.error("a side channel of the consuming connection closed: %s", exc)

    def _notify(self, exc: BaseException | None) -> None:
        callbacks, self._close_callbacks = self._close_callbacks, []
        for cb in callbacks:
            try:
                cb(exc)
            except Exception:
                log.exception("close callback failed")

    def add_close_callback(self, callback: Callable[[BaseException | None], None]) -> None:
        """Call ``callback(exc)`` once when the connection or channel closes."""
        self._close_callbacks.append(callback)

    async def _rpc(self, start: Callable[[Callable[[Any], None]], None]) -> Any:
        assert self._loop is not None
        done: asyncio.Future[Any] = self._loop.create_future()
        closed = self._closed
        start(lambda frame: _resolve(done, frame))
        waiters: set[asyncio.Future[Any]] = {done}
        if closed is not None:
            waiters.add(closed)
        await asyncio.wait(waiters, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
        if not done.done():
            raise BrokerError("the broker closed the channel (or did not answer)")
        return done.result()

    async def consume(self, queue: str, handler: DeliveryCallback) -> None:
        """Start consuming ``queue``; ``handler`` is called on the loop for each delivery."""
        assert self._channel is not None, "connect() first"
        reason: list[BaseException] = []
        self.add_close_callback(lambda exc: reason.append(exc) if exc else None)
        try:
            await self._rpc(
                lambda cb: self._channel.queue_declare(queue, passive=True, callback=cb)
            )
        except BrokerError:
            text = str(reason[0]) if reason else ""
            if "NOT_FOUND" in text or "404" in text:
                raise TopologyError(
                    f"queue {queue!r} does not exist on the broker: run 'amqptasks topology apply'"
                ) from None
            denied = refusal(reason[0]) if reason else None
            if denied is not None:
                raise BrokerRefused(
                    f"the broker refused to let us consume {queue!r}: {denied}", denied
                ) from None
            raise
        self._handlers[queue] = handler
        self._start(queue)

    def _start(self, queue: str) -> None:
        """A consumer of ``queue`` under the channel's current per-consumer prefetch."""
        window = self._window
        handler = self._handlers[queue]
        feed = Feed(queue)

        def on_message(_ch: Any, method: Any, props: Any, body: bytes) -> None:
            window.delivered(method.delivery_tag)
            feed.held += 1
            handler(PikaDelivery(self, feed, method, props, body))

        feed.tag = self._channel.basic_consume(queue, on_message, auto_ack=False)
        self._feeds[queue] = feed

    async def cancel_queue(self, queue: str) -> bool:
        """Stop consuming ``queue`` (deliveries already here stay ours to settle); False when
        it was not consumed."""
        self._handlers.pop(queue, None)
        feed = self._feeds.pop(queue, None)
        channel = self._channel
        if feed is None or channel is None or not channel.is_open:
            return False
        await self._rpc(partial(_cancel, channel, feed.tag))
        return True

    async def set_prefetch(self, prefetch: int, *, running: int) -> None:
        """Apply a new per-consumer prefetch to every consumed queue (see the module
        docstring). ``running``: how many deliveries may run at once now; a shrink starts a
        queue's new consumer once its old ones hold no more than that."""
        if prefetch == self.prefetch:
            return
        growing = prefetch > self.prefetch
        self.prefetch = prefetch
        channel = self._channel
        if channel is None or not channel.is_open:
            return  # the next connection starts with the new prefetch
        await self._rpc(
            lambda cb: channel.basic_qos(prefetch_count=prefetch, global_qos=False, callback=cb)
        )
        for queue in list(self._handlers):
            feed = self._feeds.pop(queue, None)
            if feed is not None:
                self._draining.setdefault(queue, []).append(feed)
                await self._rpc(partial(_cancel, channel, feed.tag))
            self._restart_when_drained(queue, None if growing else running)

    def _restart_when_drained(self, queue: str, running: int | None) -> None:
        """Start ``queue``'s consumer again now (``running`` None: the limit grew), or after
        the settle that leaves its old consumers holding at most ``running`` deliveries."""
        old = self._draining.get(queue, [])

        def check() -> None:
            live = [f for f in old if f.held > 0]
            old[:] = live
            if queue not in self._handlers or queue in self._feeds or self.is_closed:
                pass  # no longer consumed, already restarted, or the connection is gone
            elif running is not None and sum(f.held for f in live) > running:
                return
            elif self._channel is not None and self._channel.is_open:
                self._start(queue)
            for f in old:
                f.on_settled = None
            if not old:
                self._draining.pop(queue, None)

        for f in old:
            f.on_settled = check
        check()

    @property
    def held(self) -> int:
        """Deliveries received and not settled yet (every queue): prefetch in use."""
        return len(self._window.pending)

    async def side_channel(self) -> SideChannel:
        """A new channel on this connection for a feature's own consumers."""
        assert self._conn is not None and self._loop is not None, "connect() first"
        opened: asyncio.Future[Any] = self._loop.create_future()
        self._conn.channel(on_open_callback=lambda ch: _resolve(opened, ch))
        channel = await asyncio.wait_for(opened, self.timeout)
        return SideChannel(self, channel, self._loop)

    async def declare_exchange(self, name: str, kind: str) -> None:
        """Declare a durable exchange (idempotent): the worker's own event and control
        exchanges, which must exist even when it does not declare the topology."""
        assert self._channel is not None, "connect() first"
        channel = self._channel
        await self._rpc(lambda cb: channel.exchange_declare(name, kind, durable=True, callback=cb))

    async def consume_broadcast(
        self, exchange: str, queue: str, handler: Callable[[Properties, bytes], None]
    ) -> None:
        """Consume ``queue`` — declared exclusive and auto-delete, bound to the fanout
        ``exchange`` — without acks, on a channel of its own: broadcast commands that belong
        to this connection's life (RabbitMQ 4.x refuses transient non-exclusive queues).

        ``handler(properties, body)`` is called on the loop for each message.
        """
        assert self._conn is not None and self._loop is not None, "connect() first"
        opened: asyncio.Future[Any] = self._loop.create_future()
        self._conn.channel(on_open_callback=lambda ch: _resolve(opened, ch))
        channel = await asyncio.wait_for(opened, self.timeout)
        channel.add_on_close_callback(self._on_side_channel_closed)
        await self._rpc(
            lambda cb: channel.queue_declare(
                queue, exclusive=True, auto_delete=True, durable=False, callback=cb
            )
        )
        await self._rpc(lambda cb: channel.queue_bind(queue, exchange, "", callback=cb))

        def on_message(_ch: Any, _method: Any, props: Any, body: bytes) -> None:
            handler(
                Properties(
                    content_type=props.content_type,
                    message_id=props.message_id,
                    correlation_id=props.correlation_id,
                    reply_to=props.reply_to,
                    headers=props.headers,
                ),
                body,
            )

        channel.basic_consume(queue, on_message, auto_ack=True, exclusive=True)

    # -- settling ------------------------------------------------------------------------------
    def settle(self, tag: int, acked: bool) -> None:
        self._window.settle(tag, acked)
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        target = self._window.ackable()
        if not target:
            return
        channel = self._channel
        if channel is None or not channel.is_open:
            log.error(
                "acks up to tag %d not sent: the channel is closed; the broker "
                "redelivers those messages",
                target,
            )
            return
        channel.basic_ack(target, multiple=True)
        self._window.last_acked = target

    def reject(self, tag: int, requeue: bool) -> None:
        """Reject one delivery now (not batched); it no longer holds back the ack window."""
        self._window.settle(tag, acked=False)
        channel = self._channel
        if channel is not None and channel.is_open:
            if requeue:
                channel.basic_nack(tag, multiple=False, requeue=True)
            else:
                channel.basic_reject(tag, requeue=False)
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    # -- stopping ------------------------------------------------------------------------------
    async def cancel(self) -> None:
        """Stop new deliveries; already delivered ones stay ours to settle."""
        tags = [f.tag for f in self._feeds.values()]
        self._feeds, self._handlers = {}, {}
        channel = self._channel
        for tag in tags:
            if channel is None or not channel.is_open:
                return
            try:
                await self._rpc(partial(_cancel, channel, tag))
            except BrokerError as exc:
                log.debug("cancel of %s failed: %s", tag, exc)

    async def close(self) -> None:
        self._flush()
        conn = self._conn
        if conn is not None and not conn.is_closed and not conn.is_closing:
            conn.close()
        if self._closed is not None and not self._closed.done():
            await asyncio.wait({self._closed}, timeout=self.timeout)
        self._conn = self._channel = None

    @property
    def is_closed(self) -> bool:
        return self._conn is None or self._conn.is_closed
