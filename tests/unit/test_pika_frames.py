"""The consuming connection's own reading of deliveries (amqptasks/transport/pika_frames.py).

The oracle is pika itself: the same bytes (frames marshalled by pika, as RabbitMQ sends them)
are fed to a connection whose channel takes the fast path and to plain pika, in chunks that
split frames anywhere, and the consumer must be handed the same fields, properties and body.
No socket: the connections are built on an event loop that never runs, so nothing connects.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from typing import Any

import pika
import pika.adapters.asyncio_connection
import pika.exceptions
import pika.frame
import pika.spec
import pytest

import amqptasks.transport.pika_consumer  # noqa: F401  (pika_fields' float fix, as the worker)
from amqptasks.transport.pika_frames import ConsumerConnection

TAG = "ctag-1"
#: Every basic property, named and ordered as pika's own decoder sets them.
PROPERTY_NAMES = tuple(vars(pika.spec.BasicProperties()))


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def connection(cls: type, loop: asyncio.AbstractEventLoop, fast: bool) -> tuple[Any, list, Any]:
    """A connection (never connected) with channel 1 consuming as ``TAG``; what its consumer
    received goes to the returned list."""
    conn = cls(pika.URLParameters("amqp://guest:guest@127.0.0.1:1/"), custom_ioloop=loop)
    channel = conn._create_channel(1, lambda _ch: None)
    conn._channels[1] = channel
    got: list[tuple[Any, ...]] = []

    def on_message(_ch: Any, method: Any, props: Any, body: bytes) -> None:
        got.append(
            (
                method.consumer_tag,
                method.delivery_tag,
                method.redelivered,
                method.exchange,
                method.routing_key,
                {name: getattr(props, name) for name in PROPERTY_NAMES},
                body,
            )
        )

    channel._consumers[TAG] = on_message
    if fast:
        conn.fast_channel(channel)
    return conn, got, channel


def delivery(
    tag: int,
    body: bytes,
    props: pika.spec.BasicProperties,
    *,
    channel: int = 1,
    frame_max: int = 131072,
    redelivered: bool = False,
    exchange: str = "",
    routing_key: str = "tasks",
) -> bytes:
    """The frames of one ``basic.deliver`` as the broker sends them (body split at
    ``frame_max``)."""
    method = pika.spec.Basic.Deliver(TAG, tag, redelivered, exchange, routing_key)
    frames = [
        pika.frame.Method(channel, method).marshal(),
        pika.frame.Header(channel, len(body), props).marshal(),
    ]
    step = frame_max - 8
    frames += [
        pika.frame.Body(channel, body[i : i + step]).marshal() for i in range(0, len(body), step)
    ]
    return b"".join(frames)


def feed(conn: Any, data: bytes, chunk: int) -> None:
    for i in range(0, len(data), chunk):
        conn._on_data_available(data[i : i + chunk])


def every_property() -> pika.spec.BasicProperties:
    return pika.spec.BasicProperties(
        content_type="application/json",
        content_encoding="utf-8",
        headers={"tenant": {"ids": [1, 2, 3]}, "name": b"raw", "n": -5, "flag": True},
        delivery_mode=2,
        priority=7,
        correlation_id="corr-é",
        reply_to="amq.rabbitmq.reply-to.g1h2",
        expiration="60000",
        message_id=b"\xff\xfe not utf-8",
        timestamp=1_764_800_000,
        type="task",
        user_id="guest",
        app_id="celery",
        cluster_id="c1",
    )


def stream() -> bytes:
    """Deliveries that cover every branch: all properties, none, an empty body, a body in
    three frames, redelivered, an exchange and routing key, a double in a header table."""
    double_header = pika.spec.BasicProperties(headers={"limit": [None, 1]})
    return b"".join(
        [
            delivery(1, b'{"task": "add", "args": [2, 2]}', every_property()),
            delivery(2, b"", pika.spec.BasicProperties()),
            delivery(3, bytes(range(256)) * 40, pika.spec.BasicProperties(), frame_max=4096),
            delivery(4, b"x", double_header, redelivered=True, exchange="web", routing_key="w.1"),
            delivery(5, "é".encode() * 3000, pika.spec.BasicProperties(content_type="text/plain")),
        ]
    )


@pytest.mark.parametrize("chunk", [1, 7, 100, 4096, 1 << 20])
def test_deliveries_read_as_pika_reads_them_however_the_bytes_arrive(loop, chunk):
    data = stream()
    plain, expected, _ = connection(
        pika.adapters.asyncio_connection.AsyncioConnection, loop, fast=False
    )
    feed(plain, data, 1 << 20)
    fast, got, _ = connection(ConsumerConnection, loop, fast=True)
    feed(fast, data, chunk)
    assert [d[1] for d in got] == [1, 2, 3, 4, 5]
    assert got == expected
    assert got[0][5]["message_id"] == b"\xff\xfe not utf-8"  # kept as bytes, as pika keeps it
    assert got[2][6] == bytes(range(256)) * 40  # a body in several frames, joined
    assert fast.bytes_received == plain.bytes_received == len(data)
    assert fast.frames_received == plain.frames_received
    assert fast._frame_buffer == b""


def test_a_double_in_a_header_decodes_as_a_float(loop):
    # pika cannot encode a float header; these are the bytes py-amqp (Celery) writes.
    table = b"\x05limit" + b"d" + struct.pack(">d", 0.5)
    payload = struct.pack(">HHQH", 60, 0, 2, 0x2000) + struct.pack(">I", len(table)) + table
    data = b"".join(
        [
            pika.frame.Method(1, pika.spec.Basic.Deliver(TAG, 1, False, "", "q")).marshal(),
            struct.pack(">BHL", 2, 1, len(payload)) + payload + b"\xce",
            pika.frame.Body(1, b"{}").marshal(),
        ]
    )
    fast, got, _ = connection(ConsumerConnection, loop, fast=True)
    feed(fast, data, 1 << 20)
    assert got[0][5]["headers"] == {"limit": 0.5}
    assert got[0][6] == b"{}"


def test_other_frames_and_channels_go_to_pika(loop):
    fast, got, _ = connection(ConsumerConnection, loop, fast=True)
    other = fast._create_channel(2, lambda _ch: None)
    fast._channels[2] = other
    on_other: list[int] = []
    other._consumers[TAG] = lambda _ch, method, _p, _b: on_other.append(method.delivery_tag)
    beats: list[int] = []

    class Checker:
        def received(self) -> None:
            beats.append(1)

    fast._heartbeat_checker = Checker()
    qos_ok: list[Any] = []
    fast.callbacks.add(1, pika.spec.Basic.QosOk, lambda frame: qos_ok.append(frame))
    data = b"".join(
        [
            pika.frame.Heartbeat().marshal(),
            delivery(1, b"a", pika.spec.BasicProperties()),
            pika.frame.Method(1, pika.spec.Basic.QosOk()).marshal(),
            delivery(9, b"b", pika.spec.BasicProperties(), channel=2),
            pika.frame.Heartbeat().marshal(),
            delivery(2, b"c", pika.spec.BasicProperties()),
        ]
    )
    feed(fast, data, 3)
    assert [d[1] for d in got] == [1, 2]
    assert on_other == [9]  # channel 2 is not a fast channel: pika's assembler read it
    assert len(beats) == 2
    assert len(qos_ok) == 1
    assert fast.bytes_received == len(data)


def test_a_delivery_for_a_consumer_cancelled_here_is_rejected_by_the_channel(loop):
    fast, got, channel = connection(ConsumerConnection, loop, fast=True)
    channel._set_state(channel.OPEN)
    channel._cancelled.add(TAG)
    rejected: list[int] = []
    channel.basic_reject = lambda tag, requeue=True: rejected.append(tag)
    feed(fast, delivery(4, b"late", pika.spec.BasicProperties()), 1 << 20)
    assert got == []
    assert rejected == [4]


def test_a_closed_channel_stops_the_fast_path(loop):
    fast, got, channel = connection(ConsumerConnection, loop, fast=True)
    fast._on_channel_cleanup(channel)
    feed(fast, delivery(1, b"a", pika.spec.BasicProperties()), 1 << 20)
    assert got == []  # pika reports a frame for an unregistered channel and drops it
    assert fast._fast == {}


def test_a_bad_frame_end_is_refused(loop):
    fast, _got, _ = connection(ConsumerConnection, loop, fast=True)
    data = bytearray(delivery(1, b"a", pika.spec.BasicProperties()))
    data[-1] = 0
    with pytest.raises(pika.exceptions.InvalidFrameError):
        feed(fast, bytes(data), 1 << 20)


def test_a_body_longer_than_its_header_said_is_refused(loop):
    fast, got, _ = connection(ConsumerConnection, loop, fast=True)
    data = b"".join(
        [
            pika.frame.Method(1, pika.spec.Basic.Deliver(TAG, 1, False, "", "q")).marshal(),
            pika.frame.Header(1, 3, pika.spec.BasicProperties()).marshal(),
            pika.frame.Body(1, b"ab").marshal(),
            pika.frame.Body(1, b"cd").marshal(),
        ]
    )
    with pytest.raises(pika.exceptions.BodyTooLongError):
        feed(fast, data, 1 << 20)
    assert got == []


def test_a_method_in_the_middle_of_a_content_is_refused(loop):
    fast, got, _ = connection(ConsumerConnection, loop, fast=True)
    data = b"".join(
        [
            pika.frame.Method(1, pika.spec.Basic.Deliver(TAG, 1, False, "", "q")).marshal(),
            pika.frame.Method(1, pika.spec.Basic.QosOk()).marshal(),
        ]
    )
    with pytest.raises(pika.exceptions.UnexpectedFrameError):
        feed(fast, data, 1 << 20)
    assert got == []
