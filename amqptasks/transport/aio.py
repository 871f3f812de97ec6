"""The asyncio transport: the only module that imports aio-pika.

* :class:`AsyncPublisher` — awaitable confirmed, mandatory publishes (and a direct reply-to
  consumer on the same channel when results are wanted).
* :class:`DeadLetterSession` — browse and move dead letters (``amqptasks dlq``).
* :func:`purge_queues` — ``amqptasks worker --purge``: count, then purge, work queues.

The worker's consuming connection lives in :mod:`.pika_consumer` (profiles showed aio-pika's
per-delivery tasks were the cost on the hot path).

Publishing and consuming use separate connections: a broker resource alarm blocks publishing
connections only, and a consumer must keep acking while publishers are blocked.
Client exceptions are translated here (``raise ... from exc``) into the amqptasks tree.
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq.exceptions

from ..config import redact_url
from ..errors import (
    BrokerError,
    BrokerRefused,
    PublishError,
    PublishNacked,
    PublishTimeout,
    TopologyError,
    UnroutableError,
)
from ..protocol import Properties
from ..topology import (
    DELAY_PREFIX,
    DLQ_SUFFIX,
    Binding,
    Exchange,
    ExchangeBinding,
    Queue,
    Topology,
)
from .failover import Addresses
from .pika_publisher import REPLY_TO, ReplyHandler, mandatory_for
from .refusal import refusal, refused

__all__ = [
    "AsyncPublisher",
    "DeadLetterSession",
    "Delivery",
    "declare_topology",
    "purge_queues",
]

log = logging.getLogger("amqptasks.transport")


def _table(value: Any) -> Any:
    """Header values as pamqp encodes them: ``bytes`` becomes ``bytearray`` (pamqp's type for
    the AMQP byte array, which pika reads back as ``bytes``); everything else unchanged."""
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, dict):
        return {k: _table(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_table(v) for v in value]
    return value


def _message(body: bytes, props: Properties) -> aio_pika.Message:
    return aio_pika.Message(
        body,
        content_type=props.content_type,
        content_encoding=props.content_encoding,
        message_id=props.message_id,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        priority=props.priority,
        headers=_table(props.headers) if props.headers else props.headers,
        delivery_mode=aio_pika.DeliveryMode(props.delivery_mode or 1),
        timestamp=props.timestamp,
    )


#: What pamqp/aiormq raise for a value they cannot put in a frame. aiormq marshals a publish
#: before queueing it and gives its confirm number back when that fails, so nothing was sent
#: and the channel stays in step (checked by tests/integration/test_publish_options.py).
_UNENCODABLE = (TypeError, ValueError, AttributeError, OverflowError, struct.error)


def with_heartbeat(url: str, heartbeat: int | None) -> str:
    """``url`` with ``?heartbeat=N`` unless it already sets one (aiormq reads it there)."""
    if not heartbeat or "heartbeat=" in url:
        return url
    return f"{url}{'&' if '?' in url else '?'}heartbeat={heartbeat}"


async def _connect(
    url: str, name: str, timeout: float, heartbeat: int | None = None
) -> aio_pika.abc.AbstractConnection:
    """A connection; :class:`BrokerRefused` (the broker's reason, see :mod:`.refusal`) for a
    refused login/vhost/permission, :class:`BrokerError` for anything else."""
    try:
        return await aio_pika.connect(
            with_heartbeat(url, heartbeat),
            timeout=timeout,
            client_properties={"connection_name": name},
        )
    except (OSError, asyncio.TimeoutError, aiormq.exceptions.AMQPError) as exc:
        # The pika handshake that recovers a reason aiormq dropped blocks: off the loop.
        reason = await asyncio.to_thread(refusal, exc, url=url, timeout=timeout)
        if reason is not None:
            raise refused(url, reason) from exc
        raise BrokerError(f"cannot connect to broker {redact_url(url)}: {exc!r}") from exc


async def _connect_any(
    addresses: Addresses, name: str, timeout: float, heartbeat: int | None = None
) -> tuple[str, aio_pika.abc.AbstractConnection]:
    """A connection to the first address that answers, tried in failover order (one round):
    ``(address, connection)``. A refusal is raised at once (the nodes of one cluster share
    users and vhosts); when none answers, the last error names every address."""
    errors: list[str] = []
    for url in addresses.round():
        try:
            conn = await _connect(url, name, timeout, heartbeat)
        except BrokerRefused:
            raise
        except BrokerError as exc:
            addresses.failed(url)
            if len(addresses) == 1:
                raise
            errors.append(str(exc))
            continue
        addresses.answered(url)
        return url, conn
    raise BrokerError(f"no broker answered at {addresses}: " + "; ".join(errors))


def _refused_channel(url: str, exc: BaseException, what: str) -> None:
    """Raise :class:`BrokerRefused` if ``exc`` is a permission refusal (403) on a channel."""
    reason = refusal(exc)
    if reason is not None:
        raise refused(url, reason, what) from exc


class AsyncPublisher:
    """Confirmed, mandatory publishing for asyncio callers and the worker."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        timeout: float = 10.0,
        name: str = "amqptasks publisher",
        on_reply: ReplyHandler | None = None,
        heartbeat: int | None = None,
        on_replies_lost: Callable[[], object] | None = None,
    ) -> None:
        self.addresses = Addresses(url)
        #: The address of the current (or last) connection.
        self.url = self.addresses.urls[0]
        self.timeout = timeout
        self.name = name
        self.on_reply = on_reply
        #: Called when a channel that consumed replies closed: what was still due on it
        #: will never arrive (direct reply-to lives and dies with its channel).
        self.on_replies_lost = on_replies_lost
        self.heartbeat = heartbeat
        self.last_error: BaseException | None = None
        self._conn: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}
        self._lock = asyncio.Lock()
        #: The channel was retired after a nack: open a new one on the same connection.
        self._retired = False
        self._closing: set[asyncio.Future[None]] = set()

    @property
    def reply_to(self) -> str | None:
        return REPLY_TO if self.on_reply is not None else None

    async def _ready(self) -> aio_pika.abc.AbstractChannel:
        channel = self._channel
        if channel is not None and not channel.is_closed:
            return channel
        async with self._lock:
            if self._channel is None or self._channel.is_closed:
                if not (self._retired and self._conn is not None and not self._conn.is_closed):
                    if self._conn is not None:
                        await self._conn.close()
                        self.addresses.failed(self.url)  # lost: the next address first
                    self._conn = await self._connect_retrying()
                self._retired = False
                self._channel = await self._conn.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                self._exchanges = {"": self._channel.default_exchange}
                if self.on_reply is not None:
                    await self._consume_replies(self._channel)
            return self._channel

    async def _connect_retrying(self) -> aio_pika.abc.AbstractConnection:
        """Connect, retrying with backoff; the caller's deadline (``wait_for``) bounds it. A
        refusal (:class:`BrokerRefused`) is raised at once: retrying gets the same answer.

        Several addresses are tried in failover order, each attempt with its share of the
        timeout (so a node that does not answer at all leaves time for the others); the
        backoff sleep comes after a whole round failed."""
        delay = 0.1
        many = len(self.addresses) > 1
        attempt_timeout = max(self.timeout / len(self.addresses), 1.0) if many else self.timeout
        while True:
            try:
                url, conn = await _connect_any(
                    self.addresses, self.name, attempt_timeout, self.heartbeat
                )
            except BrokerRefused:
                raise
            except BrokerError as exc:
                self.last_error = exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if url != self.url:
                log.warning("publishing through broker %s", redact_url(url))
            self.url = url
            return conn

    async def _consume_replies(self, channel: aio_pika.abc.AbstractChannel) -> None:
        handler = self.on_reply
        assert handler is not None
        queue = await channel.get_queue(REPLY_TO, ensure=False)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            handler(message.correlation_id, message.body)

        await queue.consume(on_message, no_ack=True)
        lost = self.on_replies_lost
        if lost is not None:
            channel.close_callbacks.add(lambda *_: lost())

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        props: Properties,
        *,
        timeout: float | None = None,
        mandatory: bool = True,
    ) -> None:
        """Publish and wait for the broker's confirm; raises a :class:`PublishError` if not.

        ``mandatory=False`` is for messages nobody has to receive (events: no listener bound
        is normal), which the broker then confirms instead of returning."""
        limit = self.timeout if timeout is None else timeout
        try:
            channel = await asyncio.wait_for(self._ready(), limit)
        except asyncio.TimeoutError as exc:
            raise BrokerError(
                f"broker {self.addresses} unreachable for {limit}s; nothing was published "
                f"(last error: {self.last_error})"
            ) from exc
        try:
            ex = self._exchanges.get(exchange)
            if ex is None:
                ex = self._exchanges[exchange] = await channel.get_exchange(exchange, ensure=False)
            await ex.publish(
                _message(body, props),
                routing_key,
                mandatory=mandatory_for(routing_key, mandatory),
                timeout=limit,
            )
        except _UNENCODABLE as exc:
            problem = f"{type(exc).__name__}: {exc}"[:300]
            raise PublishError(
                f"publish to exchange {exchange!r} routing key {routing_key!r} failed "
                f"({problem}); nothing was published"
            ) from exc
        except aio_pika.exceptions.PublishError as exc:
            text = getattr(getattr(exc, "frame", None), "reply_text", "NO_ROUTE")
            raise UnroutableError(exchange, routing_key, str(text)) from exc
        except aio_pika.exceptions.DeliveryError as exc:
            self._retire(channel)
            raise PublishNacked(
                f"broker nacked the publish to exchange {exchange!r} routing key {routing_key!r}"
            ) from exc
        except asyncio.TimeoutError as exc:
            raise PublishTimeout(
                f"no confirm for the publish to exchange {exchange!r} routing key "
                f"{routing_key!r} within {limit}s; it may or may not have been delivered"
            ) from exc
        except (aiormq.exceptions.AMQPError, ConnectionError) as exc:
            _refused_channel(self.url, exc, f"the publish to exchange {exchange!r}")
            raise PublishError(f"publish to exchange {exchange!r} failed: {exc!r}") from exc

    def _retire(self, channel: aio_pika.abc.AbstractChannel) -> None:
        """After a nack the next publish opens a new channel on the same connection: RabbitMQ
        3.10 keeps nacking publishes to a quorum queue on a channel that first used it while
        its leader was dying (see :mod:`.pika_publisher`). The old channel is closed once its
        in-flight publishes had a second to be confirmed."""
        if self._channel is not channel or self._conn is None:
            return
        log.warning(
            "broker %s nacked a publish; the next publishes use a new channel",
            redact_url(self.url),
        )
        self._channel = None
        self._retired = True  # a new channel on the same connection, not a reconnect

        async def close_later() -> None:
            await asyncio.sleep(1.0)
            if not channel.is_closed:
                await channel.close()

        task = asyncio.ensure_future(close_later())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for task in list(self._closing):
            task.cancel()
        if self._conn is not None:
            await self._conn.close()
        self._conn = self._channel = None


class Delivery:
    """A message taken from a dead-letter queue (the worker's deliveries are
    :class:`.pika_consumer.PikaDelivery`)."""

    __slots__ = (
        "_message",
        "body",
        "exchange",
        "properties",
        "queue",
        "redelivered",
        "routing_key",
    )

    def __init__(self, message: aio_pika.abc.AbstractIncomingMessage, queue: str) -> None:
        self._message = message
        self.body: bytes = message.body
        self.queue = queue
        self.exchange: str = message.exchange or ""
        self.routing_key: str = message.routing_key or ""
        self.redelivered = bool(message.redelivered)
        self.properties = Properties(
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            priority=message.priority,
            headers=dict(message.headers) if message.headers else None,
            delivery_mode=int(message.delivery_mode) if message.delivery_mode else None,
            timestamp=message.timestamp,
        )

    async def ack(self) -> None:
        await self._message.ack()


_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for (?P<kind>queue|exchange) '(?P<name>[^']+)'"
    r"[^:]*: received (?P<ours>.+?) but current is (?P<theirs>.+)$"
)


def describe_mismatch(kind: str, name: str, text: str) -> str:
    """Turn RabbitMQ's PRECONDITION_FAILED text into 'which object, which argument, values'."""
    m = _INEQUIVALENT.search(text)
    if m is None:
        return f"{kind} {name!r}: the broker refused the declaration: {text}"
    if m["arg"] == "x-queue-type":
        return _type_mismatch(m["name"], _queue_type(m["theirs"]), _queue_type(m["ours"]))
    return (
        f"{m['kind']} {m['name']!r}: argument {m['arg']!r} differs — broker has "
        f"{m['theirs'].strip()}, config wants {m['ours'].strip()} "
        "(delete the object or change the config)"
    )


def _queue_type(value: str) -> str:
    """RabbitMQ's rendering of an ``x-queue-type`` value ("none", "the value 'quorum' of type
    'longstr'") as the type it means: no argument is a classic queue."""
    found = re.search(r"'([^']+)'", value)
    return found.group(1) if found and value.strip() != "none" else "classic"


def _type_mismatch(name: str, broker_type: str, config_type: str) -> str:
    if name.startswith("amqptasks."):
        setting = "topology.default_queue_type"
    elif name.endswith(DLQ_SUFFIX):
        setting = f"queues.{name[: -len(DLQ_SUFFIX)]}.type (a DLQ takes its queue's type)"
    else:
        setting = f"queues.{name}.type"
    return (
        f"queue {name!r} is a {broker_type} queue on the broker, the config declares a "
        f"{config_type} queue (a queue's type cannot change in place: set {setting} to "
        f"{broker_type}, or migrate: stop publishing to it, let it drain, delete it, run "
        f"'amqptasks topology apply' — docs/cluster.md, 'Moving to quorum queues')"
    )


def _summarise(problems: list[tuple[str, str]]) -> list[str]:
    """One line for the delay levels when their type differs (22 identical lines otherwise)."""
    typed = [
        (n, t)
        for n, t in problems
        if n.startswith(DELAY_PREFIX + ".") and "queue on the broker, the config declares" in t
    ]
    if len(typed) < 2:
        return [t for _, t in problems]
    first = typed[0][1]
    found = re.search(
        r"is an? (\w+) queue on the broker, the config declares an? (\w+) queue", first
    )
    assert found is not None
    merged = (
        f"{len(typed)} delay levels ({DELAY_PREFIX}.*) are {found[1]} queues on the broker, the "
        f"config declares {found[2]} queues" + first[found.end() :]
    )
    skip = {n for n, _ in typed}
    return [merged] + [t for n, t in problems if n not in skip]


#: Arguments only quorum (or stream) queues take: a classic queue lacks them, and RabbitMQ
#: compares them before ``x-queue-type``.
_TYPE_ONLY_ARGS = frozenset(
    {"x-overflow", "x-dead-letter-strategy", "x-delivery-limit", "x-quorum-initial-group-size"}
)


async def _type_problem(
    channel: aio_pika.abc.AbstractChannel, q: Queue, wanted: str, text: str
) -> str:
    """The type mismatch when the queue ``q`` on the broker is not a ``wanted`` queue, else
    ``text``. Declaring it again without the type's own arguments tells: that changes nothing
    when the type is the same, and fails on ``x-queue-type`` when not. ``channel`` may be
    closed afterwards."""
    probe = {k: v for k, v in (q.args or {}).items() if k not in _TYPE_ONLY_ARGS}
    try:
        await channel.declare_queue(q.name, durable=q.durable, arguments=probe)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        typed = describe_mismatch("queue", q.name, str(exc.args[0] if exc.args else exc))
        return typed if f"declares a {wanted} queue" in typed else text
    except aiormq.exceptions.AMQPError:
        pass
    return text


async def declare_topology(
    url: str | Sequence[str], topology: Topology, *, timeout: float = 10.0
) -> list[str]:
    """Declare every exchange, queue and binding idempotently; return what was declared.

    Objects that already exist with other arguments are collected and reported together as a
    :class:`TopologyError` naming each object, argument and both values, instead of stopping at
    the first PRECONDITION_FAILED (each failure closes its channel, so a new one is opened).
    With several addresses, the first that answers is used (they are one cluster).
    """
    url, conn = await _connect_any(Addresses(url), "amqptasks topology", timeout)
    done: list[str] = []
    problems: list[tuple[str, str]] = []
    try:
        channel = await conn.channel(publisher_confirms=False)

        async def attempt(
            kind: str, name: str, op: Callable[[Any], Awaitable[Any]], queue: Queue | None = None
        ) -> None:
            nonlocal channel
            try:
                await op(channel)
                done.append(f"{kind} {name}")
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                text = describe_mismatch(kind, name, str(exc.args[0] if exc.args else exc))
                channel = await conn.channel(publisher_confirms=False)
                wanted = str((queue.args or {}).get("x-queue-type", "")) if queue else ""
                if wanted not in ("", "classic") and "is a" not in text and queue is not None:
                    # The broker names the first argument that differs (x-overflow comes
                    # before x-queue-type); a wrong type is what the user must hear about.
                    text = await _type_problem(channel, queue, wanted, text)
                    channel = await conn.channel(publisher_confirms=False)
                problems.append((name, text))
            except aiormq.exceptions.AMQPError as exc:
                _refused_channel(url, exc, f"the declaration of {kind} {name!r}")
                problems.append((name, f"{kind} {name!r}: {exc!r}"))
                channel = await conn.channel(publisher_confirms=False)

        for e in topology.exchanges:
            await attempt("exchange", e.name, partial(_declare_exchange, e))
        for q in topology.queues:
            await attempt("queue", q.name, partial(_declare_queue, q), q)
        for b in topology.bindings:
            label = f"{b.exchange} -[{b.routing_key}]-> {b.queue}"
            await attempt("binding", label, partial(_bind, b))
        for x in topology.exchange_bindings:
            label = f"{x.source} -[{x.routing_key}]-> exchange {x.destination}"
            await attempt("binding", label, partial(_bind_exchange, x))
    finally:
        await conn.close()
    if problems:
        raise TopologyError(
            "topology differs from the broker:\n  " + "\n  ".join(_summarise(problems))
        )
    return done


async def _declare_exchange(e: Exchange, channel: aio_pika.abc.AbstractChannel) -> None:
    await channel.declare_exchange(
        e.name,
        aio_pika.ExchangeType(e.type),
        durable=e.durable,
        arguments=dict(e.arguments) or None,
    )


async def _declare_queue(q: Queue, channel: aio_pika.abc.AbstractChannel) -> None:
    await channel.declare_queue(q.name, durable=q.durable, arguments=q.args or None)


async def _bind_exchange(x: ExchangeBinding, channel: aio_pika.abc.AbstractChannel) -> None:
    destination = await channel.get_exchange(x.destination, ensure=False)
    await destination.bind(x.source, x.routing_key)


async def _bind(b: Binding, channel: aio_pika.abc.AbstractChannel) -> None:
    queue = await channel.get_queue(b.queue, ensure=False)
    await queue.bind(b.exchange, b.routing_key)


class DeadLetterSession:
    """Browse and move messages of one dead-letter queue (``amqptasks dlq``).

    Messages are taken with ``basic.get`` and left unacked, so whatever this session does not
    move goes back to the queue when it closes. A move publishes the copy (confirmed,
    mandatory: an unroutable original route raises and the dead letter stays) and only then
    acks the dead letter: never lost. An interruption between the two leaves the dead letter
    in place although its copy went out; the CLI's replay ledger recognises it on the next
    run and settles it without publishing again (only a kill between a confirm and its ledger
    line can publish that one message twice; both copies carry the same replay marker).

    (An AMQP transaction looked tempting — publish and ack commit together — but RabbitMQ
    sends a transaction's ``basic.return`` only at commit, after the ack is already
    committed: an unroutable replay would lose the message.)
    """

    def __init__(self, url: str | Sequence[str], queue: str, *, timeout: float = 10.0) -> None:
        self.addresses = Addresses(url)
        self.url = self.addresses.urls[0]
        self.queue_name = queue
        self.timeout = timeout
        self._conn: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._queue: aio_pika.abc.AbstractQueue | None = None

    async def open(self) -> int:
        """Connect; return how many messages the queue holds now."""
        self.url, self._conn = await _connect_any(self.addresses, "amqptasks dlq", self.timeout)
        self._channel = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
        try:
            self._queue = await self._channel.declare_queue(self.queue_name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise BrokerError(f"queue {self.queue_name!r} does not exist") from exc
        except aiormq.exceptions.AMQPError as exc:
            _refused_channel(self.url, exc, f"access to queue {self.queue_name!r}")
            raise
        count = self._queue.declaration_result.message_count
        return int(count or 0)

    async def fetch(self) -> Delivery | None:
        """The next message (unacked), or None when the queue has no more ready."""
        assert self._queue is not None, "open() first"
        message = await self._queue.get(no_ack=False, fail=False)
        return None if message is None else Delivery(message, self.queue_name)

    async def publish(
        self, exchange: str, routing_key: str, body: bytes, props: Properties
    ) -> None:
        """Publish a copy (confirmed, mandatory); raises :class:`UnroutableError`."""
        assert self._channel is not None, "open() first"
        target = (
            await self._channel.get_exchange(exchange, ensure=False)
            if exchange
            else self._channel.default_exchange
        )
        try:
            await target.publish(
                _message(body, props), routing_key, mandatory=True, timeout=self.timeout
            )
        except aio_pika.exceptions.PublishError as exc:
            raise UnroutableError(exchange, routing_key) from exc
        except aio_pika.exceptions.DeliveryError as exc:
            raise PublishNacked(f"broker nacked the copy to {exchange!r}/{routing_key!r}") from exc

    async def purge(self) -> int:
        assert self._queue is not None, "open() first"
        result = await self._queue.purge()
        return int(result.message_count or 0)

    async def close(self) -> None:
        if self._conn is not None and not self._conn.is_closed:
            await self._conn.close()  # whatever was fetched but not acked goes back
        self._conn = self._channel = self._queue = None


async def purge_queues(
    url: str | Sequence[str],
    names: list[str],
    *,
    count_only: bool = False,
    timeout: float = 10.0,
) -> dict[str, int]:
    """Ready messages of each queue in ``names``, removed unless ``count_only``:
    ``{queue: how many}`` (messages delivered to a consumer and not acked yet are not ready,
    so a purge leaves them). A missing queue raises :class:`BrokerError` naming it. With
    several addresses, the first that answers is used (they are one cluster)."""
    url, conn = await _connect_any(Addresses(url), "amqptasks purge", timeout)
    try:
        out: dict[str, int] = {}
        for name in names:
            channel = await conn.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity as exc:
                raise BrokerError(f"queue {name!r} does not exist") from exc
            except aiormq.exceptions.AMQPError as exc:
                _refused_channel(url, exc, f"access to queue {name!r}")
                raise BrokerError(f"queue {name!r}: {exc}") from exc
            if count_only:
                out[name] = int(queue.declaration_result.message_count or 0)
            else:
                out[name] = int((await queue.purge()).message_count or 0)
            await channel.close()
        return out
    finally:
        await conn.close()
