"""transport.refusal against the exceptions the real broker makes pika and aiormq raise."""

from __future__ import annotations

import asyncio
import time
import urllib.parse
import uuid
from collections.abc import Iterator

import aio_pika
import pika
import pika.exceptions
import pytest
from broker_fixtures import AMQP_PORT, Broker, mgmt

from amqptasks import BrokerError, BrokerRefused
from amqptasks.protocol import Properties
from amqptasks.topology import Queue, Topology
from amqptasks.transport.aio import AsyncPublisher, DeadLetterSession, declare_topology
from amqptasks.transport.pika_async import AsyncPikaPublisher
from amqptasks.transport.pika_publisher import SyncPublisher
from amqptasks.transport.refusal import refusal, refused

LOGIN = "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN"


def _pika_error(url: str) -> BaseException:
    params = pika.URLParameters(url)
    params.connection_attempts = 1
    with pytest.raises(pika.exceptions.AMQPError) as err:
        pika.BlockingConnection(params)
    return err.value


def _aio_error(url: str) -> BaseException:
    async def connect() -> None:
        await aio_pika.connect(url, timeout=5)

    with pytest.raises(Exception) as err:
        asyncio.run(connect())
    return err.value


@pytest.fixture
def user(broker: Broker) -> Iterator[str]:
    """A user who may log in, with read-only permission on the test's vhost."""
    name = f"test-ro-{uuid.uuid4().hex[:8]}"
    vh = urllib.parse.quote(broker.vhost, safe="")
    mgmt("PUT", f"/users/{name}", {"password": "pw", "tags": ""})
    mgmt("PUT", f"/permissions/{vh}/{name}", {"configure": "^$", "write": "^$", "read": ".*"})
    try:
        yield name
    finally:
        mgmt("DELETE", f"/users/{name}", ok=(200, 204, 404))


def _url(broker: Broker, creds: str = "guest:guest", vhost: str | None = None) -> str:
    vh = urllib.parse.quote(broker.vhost if vhost is None else vhost, safe="")
    return f"amqp://{creds}@localhost:{AMQP_PORT}/{vh}"


def test_wrong_password_from_both_clients(broker: Broker) -> None:
    url = _url(broker, "guest:wrong")
    for exc in (_pika_error(url), _aio_error(url)):
        reason = refusal(exc)
        assert reason is not None and reason.startswith(LOGIN), (exc, reason)


def test_missing_vhost_reason_is_recovered_for_aiormq(broker: Broker) -> None:
    missing = f"test.missing.{uuid.uuid4().hex[:8]}"
    url = _url(broker, vhost=missing)
    expected = f"NOT_ALLOWED - vhost {missing} not found"
    assert refusal(_pika_error(url)) == expected
    aio = _aio_error(url)
    assert "Connection.Close" in str(aio)  # aiormq's reason-less InvalidFrameError
    assert refusal(aio, url=url) == expected  # one pika handshake recovers the text
    generic = refusal(aio)  # without the url: still a refusal, said plainly
    assert generic is not None and "virtual host" in generic


def test_no_permission_on_the_vhost(broker: Broker) -> None:
    name = f"test-noperm-{uuid.uuid4().hex[:8]}"
    mgmt("PUT", f"/users/{name}", {"password": "pw", "tags": ""})
    try:
        url = _url(broker, f"{name}:pw")
        expected = f"NOT_ALLOWED - access to vhost '{broker.vhost}' refused for user '{name}'"
        assert refusal(_pika_error(url)) == expected
        assert refusal(_aio_error(url), url=url) == expected
    finally:
        mgmt("DELETE", f"/users/{name}", ok=(200, 204, 404))


def test_a_channel_permission_refusal_is_one_too(broker: Broker, user: str) -> None:
    url = _url(broker, f"{user}:pw")
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
            conn.channel().queue_declare("not-allowed")
    finally:
        conn.close()
    assert refusal(err.value) == (
        f"ACCESS_REFUSED - access to queue 'not-allowed' in vhost '{broker.vhost}' "
        f"refused for user '{user}'"
    )
    # declare_topology stops at the first refused declaration (it used to collect each as
    # a "mismatch" and call it a TopologyError).
    with pytest.raises(BrokerRefused, match="refused the declaration of queue 'not-allowed'"):
        asyncio.run(declare_topology(url, Topology(queues=(Queue("not-allowed"),))))
    broker.channel().queue_declare("readable", durable=True)

    async def dlq() -> None:
        session = DeadLetterSession(url, "readable")
        try:
            assert await session.open() == 0
        finally:
            await session.close()

    asyncio.run(dlq())  # and read: only what it may not do is refused


def test_not_a_refusal() -> None:
    down = "amqp://guest:guest@127.0.0.1:1/%2F"
    assert refusal(_pika_error(down)) is None
    assert refusal(_aio_error(down), url=down) is None
    assert refusal(TimeoutError()) is None
    assert refusal(pika.exceptions.ChannelClosedByBroker(404, "NOT_FOUND - no queue 'x'")) is None


def test_found_through_the_cause_chain_and_redacted(broker: Broker) -> None:
    url = _url(broker, "guest:wrong")
    try:
        try:
            raise _pika_error(url)
        except pika.exceptions.AMQPError as exc:
            raise BrokerError("wrapped") from exc
    except BrokerError as wrapped:
        reason = refusal(wrapped)
    assert reason is not None and reason.startswith(LOGIN)
    err = refused(url, reason)
    assert isinstance(err, BrokerRefused) and isinstance(err, BrokerError)
    assert str(err).startswith(f"broker amqp://guest:***@localhost:{AMQP_PORT}/")
    assert "wrong" not in str(err) and err.reason == reason
    assert refusal(err) == reason


def test_a_publish_without_write_permission_is_refused_by_every_publisher(
    broker: Broker, user: str
) -> None:
    url = _url(broker, f"{user}:pw")
    pub = SyncPublisher(url, timeout=10)
    try:
        for _ in range(2):  # the link is replaced; the answer stays the same, at once
            start = time.monotonic()
            with pytest.raises(BrokerRefused, match="refused the publish: ACCESS_REFUSED"):
                pub.publish("amq.topic", "k", b"x", Properties())
            assert time.monotonic() - start < 2
    finally:
        pub.close()

    async def main() -> None:
        apub = AsyncPublisher(url, timeout=10)
        try:
            with pytest.raises(BrokerRefused, match="ACCESS_REFUSED - access to exchange"):
                await apub.publish("amq.topic", "k", b"x", Properties())
        finally:
            await apub.close()

    asyncio.run(main())

    async def worker_side() -> None:
        wpub = AsyncPikaPublisher(url, timeout=10)
        try:
            for _ in range(2):  # as the sync publisher: the same answer again, at once
                start = time.monotonic()
                with pytest.raises(BrokerRefused, match="refused the publish: ACCESS_REFUSED"):
                    await wpub.publish("amq.topic", "k", b"x", Properties())
                assert time.monotonic() - start < 2
        finally:
            await wpub.close()

    asyncio.run(worker_side())
