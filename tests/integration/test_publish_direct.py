"""The direct publish path: the thread that publishes tasks without wanting a reply drives its
own connection (no I/O thread hop), and everything else stays on the threaded link — checked
by what a user sees: every message lands once, errors still name their cause, a connection
the broker closed is replaced before the next publish."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.parse
from pathlib import Path

import pytest
from broker_fixtures import Broker, mgmt, wait_for, write_config
from tcpproxy import TcpProxy

from amqptasks import App, UnroutableError, load_config
from amqptasks.transport import pika_publisher
from amqptasks.transport.aio import declare_topology


def _app(tmp_path: Path, broker: Broker) -> App:
    settings = load_config(write_config(tmp_path, broker), env={})
    asyncio.run(declare_topology(settings.broker.url, settings.topology))
    return App(settings)


def _io_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "amqptasks-publisher"]


def _connections(broker: Broker) -> list[dict[str, object]]:
    vh = urllib.parse.quote(broker.vhost, safe="")
    return mgmt("GET", f"/vhosts/{vh}/connections") or []


def _ids(broker: Broker, queue: str) -> list[str]:
    return [json.loads(body)["id"] for _props, body in broker.get_all(queue, limit=5000)]


def test_one_thread_publishing_tasks_runs_no_io_thread(tmp_path, broker):
    before = len(_io_threads())
    app = _app(tmp_path, broker)
    try:
        sent = [
            app.send_task("examples.tasks.add", (i, i), ignore_result=True).id for i in range(50)
        ]
        assert len(_io_threads()) == before  # the caller drove its own connection
        with pytest.raises(UnroutableError, match="nowhere"):
            app.send_task("x", exchange="tasks", routing_key="nowhere", ignore_result=True)
        sent.append(app.send_task("examples.tasks.add", (0, 0), ignore_result=True).id)
    finally:
        app.close()
    assert sorted(_ids(broker, "default")) == sorted(sent)


def test_other_threads_publish_beside_the_owner_and_every_message_lands_once(tmp_path, broker):
    app = _app(tmp_path, broker)
    sent: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def publish(n: int) -> None:
        try:
            for i in range(n):
                r = app.send_task("examples.tasks.add", (i, 1), ignore_result=True)
                with lock:
                    sent.append(r.id)
        except BaseException as exc:  # reported below: a thread's error must fail the test
            errors.append(exc)

    try:
        threads = [threading.Thread(target=publish, args=(150,)) for _ in range(4)]
        for t in threads:
            t.start()
        publish(150)  # this thread owns the direct link meanwhile
        for t in threads:
            t.join(60)
    finally:
        app.close()
    assert not errors, errors
    ids = _ids(broker, "default")
    assert len(ids) == 750 and sorted(ids) == sorted(sent)


def test_a_thread_that_ended_hands_the_direct_link_to_the_next(tmp_path, broker):
    app = _app(tmp_path, broker)
    before = len(_io_threads())
    try:
        t = threading.Thread(
            target=lambda: app.send_task("examples.tasks.add", (1, 1), ignore_result=True)
        )
        t.start()
        t.join(30)
        app.send_task("examples.tasks.add", (2, 2), ignore_result=True)
        assert len(_io_threads()) == before  # the main thread took the direct path over
    finally:
        app.close()
    assert broker.depth("default") == 2


def test_a_connection_lost_while_idle_is_replaced_before_the_next_publish(
    tmp_path, broker, monkeypatch
):
    monkeypatch.setattr(pika_publisher, "DIRECT_RECHECK", 0.0)
    proxy = TcpProxy(5672)
    try:
        vhost = broker.url.rsplit("/", 1)[1]
        settings = load_config(write_config(tmp_path, broker, broker={"url": proxy.url(vhost)}))
        asyncio.run(declare_topology(broker.url, settings.topology))
        app = App(settings)
        try:
            app.send_task("examples.tasks.add", (1, 1), ignore_result=True)
            proxy.down()  # the network drops the connection while nobody drives it
            proxy.up()
            # No error: the publish reads the loss first, then opens a fresh connection.
            app.send_task("examples.tasks.add", (2, 2), ignore_result=True)
        finally:
            app.close()
    finally:
        proxy.close()
    assert broker.depth("default") == 2


def test_a_direct_link_idle_too_long_is_reopened(tmp_path, broker, monkeypatch):
    monkeypatch.setattr(pika_publisher, "DIRECT_IDLE", 0.0)
    app = _app(tmp_path, broker)
    try:
        app.send_task("examples.tasks.add", (0, 0), ignore_result=True)
        [first] = wait_for(lambda: _connections(broker), 10, message="the connection to show")
        for i in range(1, 3):
            app.send_task("examples.tasks.add", (i, i), ignore_result=True)
        # Each publish opened a fresh connection and closed the one before.
        wait_for(
            lambda: len(c := _connections(broker)) == 1 and c[0]["name"] != first["name"] and c,
            10,
            message="one new connection, the old ones closed",
        )
    finally:
        app.close()
    assert broker.depth("default") == 3
