"""Failover between several broker addresses, on the shared broker: two loopback proxies in
front of it stand for two cluster nodes, and taking one "down" is a node that died.

(The cluster itself — quorum queues, a node killed mid-stream — is tests/cluster.)
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest
from broker_fixtures import write_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from tcpproxy import TcpProxy

from amqptasks import App, BrokerError, PublishNacked, load_config
from amqptasks.transport.aio import AsyncPublisher, declare_topology


@pytest.fixture
def two_nodes():
    a, b = TcpProxy(5672), TcpProxy(5672)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _app(tmp_path, broker, a, b) -> App:
    vhost = broker.url.rsplit("/", 1)[1]
    cfg = write_config(
        tmp_path, broker, broker={"url": [a.url(vhost), b.url(vhost)], "publish_timeout": 5}
    )
    app = App(load_config(cfg, env={}))
    asyncio.run(declare_topology(broker.url, app.settings.topology))
    return app


def test_sync_publisher_connects_to_the_first_that_answers(tmp_path, broker, two_nodes):
    a, b = two_nodes
    a.down()  # the first node is dead from the start
    app = _app(tmp_path, broker, a, b)
    try:
        app.send_task("examples.tasks.add", (1, 2), ignore_result=True)
    finally:
        app.close()
    assert (a.accepted, b.accepted) == (0, 1)
    assert broker.depth("default") == 1


def test_sync_publisher_fails_over_when_its_node_dies(tmp_path, broker, two_nodes):
    a, b = two_nodes
    app = _app(tmp_path, broker, a, b)
    try:
        app.send_task("examples.tasks.add", (1, 2), ignore_result=True)
        assert (a.accepted, b.accepted) == (1, 0)
        a.down()  # drops the publisher's connection: the node died
        t0 = time.monotonic()
        sent = 0
        raised = 0
        while sent < 5 and time.monotonic() - t0 < 10:
            try:
                app.send_task("examples.tasks.add", (1, 2), ignore_result=True)
                sent += 1
            except BrokerError:
                raised += 1  # at most the publish that raced the loss
        failover_s = time.monotonic() - t0
    finally:
        app.close()
    assert sent == 5 and b.accepted == 1
    assert raised <= 1
    assert failover_s < 5  # within publish_timeout, not after it
    assert broker.depth("default") == 6


def test_async_publisher_fails_over_when_its_node_dies(tmp_path, broker, two_nodes):
    a, b = two_nodes
    app = _app(tmp_path, broker, a, b)
    p = app.prepare("examples.tasks.add", (1, 2), reply_to=None, ignore_result=True)
    ((ex, rk),) = p.destinations

    async def run() -> int:
        pub = AsyncPublisher(app.settings.broker.urls, timeout=5)
        try:
            await pub.publish(ex, rk, p.body, p.props)
            a.down()
            raised = 0
            for _ in range(3):
                try:
                    await pub.publish(ex, rk, p.body, p.props)
                except BrokerError:
                    raised += 1
            while True:  # the lost connection may be noticed only by the next publish
                try:
                    await pub.publish(ex, rk, p.body, p.props)
                    return raised
                except BrokerError:
                    raised += 1
                    assert raised < 5
        finally:
            await pub.close()

    raised = asyncio.run(run())
    app.close()
    assert b.accepted == 1 and raised <= 2
    assert broker.depth("default") >= 2


def test_every_address_is_named_when_none_answers(tmp_path, broker, two_nodes):
    a, b = two_nodes
    a.down()
    b.down()
    app = _app(tmp_path, broker, a, b)
    try:
        with pytest.raises(BrokerError) as info:
            app.send_task("examples.tasks.add", (1, 2), ignore_result=True, timeout=2)
    finally:
        app.close()
    text = str(info.value)
    assert f":{a.port}/" in text and f":{b.port}/" in text
    assert "guest:***@" in text and "guest:guest" not in text


def test_a_nacked_publish_retires_its_channel(tmp_path, broker, two_nodes):
    """After a nack the next publish opens a new channel: RabbitMQ 3.10 keeps nacking a
    channel that first used a quorum queue while its leader was dying (tests/cluster shows
    it). Here the nack is a full queue's (max_length 1, reject-publish)."""
    a, b = two_nodes
    vhost = broker.url.rsplit("/", 1)[1]
    cfg = write_config(
        tmp_path,
        broker,
        broker={"url": [a.url(vhost), b.url(vhost)], "publish_timeout": 5},
        queues={"tiny": {"max_length": 1, "overflow": "reject-publish"}},
        routes={"examples.tasks.add": {"queue": "tiny"}},
        default_route=None,
    )
    app = App(load_config(cfg, env={}))
    asyncio.run(declare_topology(broker.url, app.settings.topology))
    try:
        app.send_task("examples.tasks.add", (1, 2), ignore_result=True)
        with pytest.raises(PublishNacked):
            app.send_task("examples.tasks.add", (1, 2), ignore_result=True)
        broker.get_all("tiny")  # room again
        app.send_task("examples.tasks.add", (1, 2), ignore_result=True)
    finally:
        app.close()
    assert (a.accepted, b.accepted) == (2, 0)  # a new connection, to the same address
    assert broker.depth("tiny") == 1
