"""The worker's publisher (pika on the worker's asyncio loop), checked by what a worker needs
from it: every publish confirmed once and arriving with its properties, an unroutable one
named, a nack and a lost connection reported (never a silent success), the next publish
healthy after each, the loop never blocked while the broker is away."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pika
import pytest
from broker_fixtures import Broker
from tcpproxy import TcpProxy

from amqptasks import BrokerError, BrokerRefused, PublishNacked, UnroutableError
from amqptasks.errors import PublishError
from amqptasks.protocol import Properties
from amqptasks.transport.pika_async import AsyncPikaPublisher
from amqptasks.transport.pika_publisher import SyncPublisher


@asynccontextmanager
async def publisher(url: str | list[str], *, timeout: float) -> AsyncIterator[AsyncPikaPublisher]:
    """A publisher on the running loop, closed however the test ends."""
    pub = AsyncPikaPublisher(url, timeout=timeout)
    try:
        yield pub
    finally:
        await pub.close()


def _vhost(broker: Broker) -> str:
    return broker.url.rsplit("/", 1)[1]


def _dead_url(broker: Broker) -> str:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    return f"amqp://guest:guest@127.0.0.1:{port}/{_vhost(broker)}"


def test_many_publishes_in_flight_arrive_once_each_with_their_properties(broker: Broker) -> None:
    broker.channel().queue_declare("q", durable=True)

    async def main() -> None:
        async with publisher(broker.url, timeout=10) as pub:
            await asyncio.gather(
                *(
                    pub.publish(
                        "",
                        "q",
                        b"%d" % i,
                        Properties(
                            message_id=f"m{i}",
                            correlation_id=f"c{i}",
                            headers={"n": i, "s": "x"},
                            priority=i % 10,
                            delivery_mode=2,
                            content_type="application/json",
                        ),
                    )
                    for i in range(600)
                )
            )

    asyncio.run(main())
    got = broker.get_all("q", limit=1000)
    assert len(got) == 600
    for props, body in got:
        i = int(body)
        assert props.message_id == f"m{i}" and props.correlation_id == f"c{i}"
        assert props.headers == {"n": i, "s": "x"} and props.priority == i % 10
        assert props.delivery_mode == 2 and props.content_type == "application/json"


def test_unroutable_is_named_and_unmandatory_is_confirmed(broker: Broker) -> None:
    broker.channel().queue_declare("q", durable=True)

    async def main() -> None:
        async with publisher(broker.url, timeout=10) as pub:
            with pytest.raises(UnroutableError, match="nowhere"):
                await pub.publish("amq.direct", "nowhere", b"x", Properties(message_id="a"))
            # Events: nobody bound is normal, the broker confirms it.
            await pub.publish("amq.direct", "nowhere", b"x", Properties(), mandatory=False)
            # Interleaved in one turn: only the unroutable one fails.
            results = await asyncio.gather(
                *(
                    pub.publish("", "q" if i % 2 else "no", b"x", Properties(message_id=f"{i}"))
                    for i in range(40)
                ),
                return_exceptions=True,
            )
            assert all(r is None for r in results[1::2])
            assert all(isinstance(r, UnroutableError) for r in results[::2])

    asyncio.run(main())
    assert broker.depth("q") == 20


@pytest.mark.parametrize("kind", ["worker's asyncio publisher", "sync publisher"])
def test_a_reply_to_a_direct_reply_to_address_is_delivered(broker: Broker, kind: str) -> None:
    """RabbitMQ returns a *mandatory* publish to a reply-to address although it delivers it;
    every publisher sends replies unmandatory, so the reply arrives and no error is raised."""
    conn = broker.connect()
    ch = conn.channel()
    replies: list[bytes] = []
    ch.basic_consume("amq.rabbitmq.reply-to", lambda *a: replies.append(a[3]), auto_ack=True)
    # The reply-to name is learned from a message this channel sends to a queue.
    ch.queue_declare("probe", durable=True)
    ch.basic_publish("", "probe", b"", pika.BasicProperties(reply_to="amq.rabbitmq.reply-to"))
    method, props, _ = next(ch.consume("probe", auto_ack=True, inactivity_timeout=5))
    assert method is not None
    ch.cancel()

    async def main() -> None:
        async with publisher(broker.url, timeout=10) as pub:
            await pub.publish("", props.reply_to, b"the answer", Properties(message_id="r"))

    if kind == "sync publisher":
        sync = SyncPublisher(broker.url, timeout=10)
        try:
            sync.publish("", props.reply_to, b"the answer", Properties(message_id="r"))
        finally:
            sync.close()
    else:
        asyncio.run(main())
    deadline = time.monotonic() + 5
    while not replies and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.1)
    assert replies == [b"the answer"]


def test_a_nack_is_reported_and_the_next_publish_uses_a_fresh_channel(broker: Broker) -> None:
    broker.channel().queue_declare(
        "full", durable=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
    )
    broker.channel().queue_declare("q", durable=True)

    async def main() -> None:
        async with publisher(broker.url, timeout=10) as pub:
            await pub.publish("", "full", b"1", Properties())
            with pytest.raises(PublishNacked, match="'full'"):
                await pub.publish("", "full", b"2", Properties())
            first = pub._link
            await pub.publish("", "q", b"after", Properties())
            assert pub._link is not first  # the nacked channel was retired

    asyncio.run(main())
    assert broker.depth("full") == 1 and broker.depth("q") == 1


def test_a_missing_exchange_fails_that_publish_and_the_next_one_works(broker: Broker) -> None:
    broker.channel().queue_declare("q", durable=True)

    async def main() -> None:
        async with publisher(broker.url, timeout=10) as pub:
            with pytest.raises(BrokerError, match="no exchange 'absent'"):
                await pub.publish("absent", "k", b"x", Properties())
            start = time.monotonic()
            await pub.publish("", "q", b"after", Properties())
            assert time.monotonic() - start < 3

    asyncio.run(main())
    assert broker.depth("q") == 1


def test_a_broker_that_is_away_is_waited_for_within_the_bound_without_blocking_the_loop(
    broker: Broker,
) -> None:
    async def main() -> tuple[BaseException, float, int]:
        pub = AsyncPikaPublisher(_dead_url(broker), timeout=1.5)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        tick = asyncio.ensure_future(ticker())
        start = time.monotonic()
        try:
            with pytest.raises(BrokerError) as err:
                await pub.publish("", "q", b"x", Properties())
            return err.value, time.monotonic() - start, ticks
        finally:
            tick.cancel()
            await pub.close()

    err, took, ticks = asyncio.run(main())
    # Named for what it is: nothing sent, and why (the last attempt's error).
    assert "nothing was published" in str(err) and "connection refused" in str(err), err
    assert "guest:guest" not in str(err)
    assert 1.0 < took < 4.0
    assert ticks >= 10  # the loop kept running while the publisher retried


def test_a_wrong_password_is_refused_at_once(broker: Broker) -> None:
    url = broker.url.replace("guest:guest", "guest:n0t-th1s-0ne")

    async def main() -> None:
        async with publisher(url, timeout=10) as pub:
            start = time.monotonic()
            with pytest.raises(BrokerRefused, match="ACCESS_REFUSED") as err:
                await pub.publish("", "q", b"x", Properties())
            assert time.monotonic() - start < 3
            assert "n0t-th1s-0ne" not in str(err.value)

    asyncio.run(main())


def test_the_next_address_takes_over_when_the_first_is_down(broker: Broker) -> None:
    broker.channel().queue_declare("q", durable=True)

    async def main() -> str:
        async with publisher([_dead_url(broker), broker.url], timeout=10) as pub:
            await pub.publish("", "q", b"x", Properties())
            return pub.url

    assert asyncio.run(main()) == broker.url
    assert broker.depth("q") == 1


def test_a_lost_connection_fails_what_was_in_flight_and_the_next_publish_reconnects(
    broker: Broker,
) -> None:
    broker.channel().queue_declare("q", durable=True)
    proxy = TcpProxy(5672)

    async def main() -> list[Any]:
        async with publisher(proxy.url(_vhost(broker)), timeout=10) as pub:
            await pub.publish("", "q", b"first", Properties())
            proxy.freeze()  # nothing moves: the publishes below wait for their confirms
            flying = [
                asyncio.ensure_future(pub.publish("", "q", b"lost?", Properties()))
                for _ in range(5)
            ]
            await asyncio.sleep(0)  # let them reach the link
            proxy.down()  # and the connection drops
            outcomes = await asyncio.gather(*flying, return_exceptions=True)
            proxy.thaw()
            proxy.up()
            await pub.publish("", "q", b"after", Properties())
            return outcomes

    try:
        outcomes = asyncio.run(main())
    finally:
        proxy.close()
    assert all(isinstance(o, (BrokerError, PublishError)) for o in outcomes), outcomes
    assert all("may or may not" in str(o) for o in outcomes), outcomes
    bodies = [body for _props, body in broker.get_all("q")]
    assert bodies[0] == b"first" and bodies[-1] == b"after"
