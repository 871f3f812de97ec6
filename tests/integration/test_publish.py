"""Publishing against a real broker: confirms, mandatory returns, nacks, threads, asyncio."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from broker_fixtures import Broker, write_config

from amqptasks import App, BrokerError, PublishNacked, UnroutableError, load_config
from amqptasks.errors import TopologyError
from amqptasks.transport.aio import declare_topology


def _app(tmp_path: Path, broker: Broker, **overrides: object) -> App:
    settings = load_config(write_config(tmp_path, broker, **overrides), env={})
    asyncio.run(declare_topology(settings.broker.url, settings.topology))
    return App(settings)


def test_routed_publish_is_confirmed_and_lands_in_the_bound_queue(tmp_path, broker):
    app = _app(tmp_path, broker)
    try:
        app.send_task("examples.tasks.add", (2, 3), ignore_result=True)
        app.send_task("examples.web.sendmail", ("a@example.com",), ignore_result=True)
        app.send_task("anything.else", ignore_result=True)  # default_route -> task.default
    finally:
        app.close()
    assert broker.depth("default") == 2
    assert broker.depth("web_tasks") == 1
    [(props, body)] = broker.get_all("web_tasks")
    assert props.delivery_mode == 2 and props.content_type == "application/json"
    assert b'"task":"examples.web.sendmail"' in body


def test_unroutable_publish_raises_naming_exchange_and_key(tmp_path, broker):
    app = _app(tmp_path, broker)
    try:
        with pytest.raises(UnroutableError) as err:
            app.send_task("examples.tasks.add", (1, 1), exchange="tasks", routing_key="nowhere.x")
        assert "'tasks'" in str(err.value) and "'nowhere.x'" in str(err.value)
        # The publisher stays usable after a return.
        app.send_task("examples.tasks.add", (1, 1), ignore_result=True)
    finally:
        app.close()
    assert broker.depth("default") == 1


def test_async_unroutable_publish_raises(tmp_path, broker):
    app = _app(tmp_path, broker)

    async def main() -> None:
        try:
            with pytest.raises(UnroutableError, match="nowhere"):
                await app.send_task_async("x", exchange="tasks", routing_key="nowhere")
            await app.send_task_async("examples.tasks.add", (1, 2), ignore_result=True)
        finally:
            await app.aclose()

    asyncio.run(main())
    assert broker.depth("default") == 1


def test_nack_from_a_full_reject_publish_queue_raises(tmp_path, broker):
    ch = broker.channel()
    ch.queue_declare(
        "tiny", durable=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
    )
    app = _app(tmp_path, broker)
    try:
        app.send_task("t", queue="tiny", ignore_result=True)
        with pytest.raises(PublishNacked):
            app.send_task("t", queue="tiny", ignore_result=True)
    finally:
        app.close()
    assert broker.depth("tiny") == 1


def test_sync_publisher_is_safe_from_many_threads(tmp_path, broker):
    app = _app(tmp_path, broker)
    errors: list[BaseException] = []
    ids: list[str] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        try:
            for i in range(150):
                r = app.send_task("examples.tasks.add", (n, i), ignore_result=True)
                with lock:
                    ids.append(r.id)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    app.close()
    assert errors == []
    assert len(set(ids)) == 1200
    assert broker.depth("default") == 1200


def test_publish_to_unreachable_broker_raises_within_the_bound(tmp_path, broker):
    settings = load_config(
        write_config(
            tmp_path,
            broker,
            broker={"url": "amqp://guest:secret@127.0.0.1:1/%2F", "publish_timeout": 2},
        ),
        env={},
    )
    app = App(settings)
    start = time.monotonic()
    with pytest.raises(BrokerError) as err:
        app.send_task("examples.tasks.add", (1, 2))
    assert time.monotonic() - start < 5
    assert "secret" not in str(err.value)
    # Why, not only that it timed out: the last attempt's refusal (it once read "could not
    # open a channel ... within the publish timeout" when the deadline cut an attempt short).
    assert "nothing was published" in str(err.value), err.value
    assert "connection refused" in str(err.value), err.value
    app.close()


def test_topology_apply_is_idempotent_and_names_mismatches(tmp_path, broker):
    settings = load_config(write_config(tmp_path, broker), env={})
    first = asyncio.run(declare_topology(settings.broker.url, settings.topology))
    second = asyncio.run(declare_topology(settings.broker.url, settings.topology))
    assert first == second and "queue web_tasks.dlq" in first

    ch = broker.channel()
    ch.queue_delete("web_tasks")
    ch.queue_declare("web_tasks", durable=True, arguments={"x-max-priority": 5})
    with pytest.raises(TopologyError) as err:
        asyncio.run(declare_topology(settings.broker.url, settings.topology))
    text = str(err.value)
    assert "queue 'web_tasks'" in text
    # Every mismatching argument of that queue is reported with both values, not a traceback.
    assert "x-dead-letter-exchange" in text or "x-max-priority" in text
    assert "broker has" in text and "config wants" in text


def test_a_classic_queue_under_a_quorum_config_is_named_with_the_way_out(tmp_path, broker):
    """A config switched to quorum queues meets the classic queues of the previous one."""
    classic = load_config(write_config(tmp_path, broker), env={})
    asyncio.run(declare_topology(classic.broker.url, classic.topology))
    quorum = load_config(
        write_config(tmp_path, broker, topology={"default_queue_type": "quorum"}), env={}
    )
    with pytest.raises(TopologyError) as err:
        asyncio.run(declare_topology(quorum.broker.url, quorum.topology))
    lines = str(err.value).splitlines()
    assert (
        "  queue 'web_tasks' is a classic queue on the broker, the config declares a quorum "
        "queue (a queue's type cannot change in place: set queues.web_tasks.type to classic, "
        "or migrate: stop publishing to it, let it drain, delete it, run 'amqptasks topology "
        "apply' — docs/cluster.md, 'Moving to quorum queues')"
    ) in lines
    assert any(
        line.startswith("  22 delay levels (amqptasks.delay.*) are classic") for line in lines
    )
    assert not any("amqptasks.delay.3'" in line for line in lines)  # one line, not 22
    assert "queues.web_tasks.type (a DLQ takes its queue's type)" in str(err.value)


def test_send_many_pipelines_confirms_and_reports_the_failing_call(tmp_path, broker):
    app = _app(tmp_path, broker)
    ch = broker.channel()
    ch.queue_declare(
        "tiny", durable=True, arguments={"x-max-length": 2, "x-overflow": "reject-publish"}
    )
    try:
        results = app.send_many(
            (("examples.tasks.add", (i, i), None) for i in range(2000)),
            window=300,
            ignore_result=True,
        )
        assert len({r.id for r in results}) == 2000
        assert broker.depth("default") == 2000

        @app.task(name="examples.tasks.add")
        def add(x: int, y: int) -> int:
            return x + y

        mapped = add.delay_many([(1, 2), (3, 4)], ignore_result=True)
        assert len(mapped) == 2 and broker.depth("default") == 2002

        with pytest.raises(PublishNacked) as err:
            app.send_many([("t", (), None)] * 5, queue="tiny", ignore_result=True, window=1)
        assert err.value.index == 2  # the first two were confirmed; the third was refused
    finally:
        app.close()
    assert broker.depth("tiny") == 2
