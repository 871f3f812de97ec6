"""One bad publish argument must not poison the publisher.

Every bad option is refused by ``App.prepare`` with an error naming the option (and the
header key) before anything reaches the wire; the next publish in the same process must be
confirmed at once, never time out. The publishers themselves are then given values that slip
past that validation, to show their confirm bookkeeping survives any failure while a frame
is built.
"""

from __future__ import annotations

import asyncio
import math
import time
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from broker_fixtures import Broker, write_config

from amqptasks import App, PublishError, load_config
from amqptasks.protocol import Properties
from amqptasks.transport.aio import AsyncPublisher, declare_topology
from amqptasks.transport.pika_async import AsyncPikaPublisher
from amqptasks.transport.pika_publisher import SyncPublisher

#: A good publish after a bad one must be confirmed well inside this; the publish timeout is
#: 10 s, so a drifted confirm sequence shows up as a failure here, not as a slow pass.
QUICK = 3.0

BAD_OPTIONS: list[tuple[str, dict[str, Any], type[Exception], tuple[str, ...]]] = [
    ("priority-300", {"priority": 300}, ValueError, ("priority", "300")),
    ("priority-negative", {"priority": -1}, ValueError, ("priority", "-1")),
    ("priority-bool", {"priority": True}, TypeError, ("priority", "True")),
    ("priority-str", {"priority": "5"}, TypeError, ("priority", "'5'")),
    ("priority-float", {"priority": 5.0}, TypeError, ("priority", "5.0")),
    ("header-object", {"headers": {"k": object()}}, TypeError, ("headers['k']", "object")),
    ("header-set", {"headers": {"k": {1, 2}}}, TypeError, ("headers['k']", "set")),
    ("header-int-70-bits", {"headers": {"k": 2**70}}, ValueError, ("headers['k']", "64")),
    ("header-float", {"headers": {"k": 1.5}}, TypeError, ("headers['k']", "float")),
    ("header-key-int", {"headers": {1: "x"}}, TypeError, ("headers", "key 1")),
    ("header-key-long", {"headers": {"k" * 129: 1}}, ValueError, ("headers", "128")),
    ("header-nested-list", {"headers": {"k": [1, object()]}}, TypeError, ("headers['k'][1]",)),
    (
        "header-nested-table",
        {"headers": {"k": {"ok": 1, "bad": {1}}}},
        TypeError,
        ("headers['k']['bad']",),
    ),
    ("header-decimal-nan", {"headers": {"k": Decimal("NaN")}}, ValueError, ("headers['k']",)),
    (
        "header-decimal-huge",
        {"headers": {"k": Decimal("1E+20")}},
        ValueError,
        ("headers['k']", "decimal"),
    ),
    (
        "header-datetime-before-1970",
        {"headers": {"k": datetime(1960, 1, 1, tzinfo=timezone.utc)}},
        ValueError,
        ("headers['k']", "1970"),
    ),
    ("headers-not-a-mapping", {"headers": [("k", "v")]}, TypeError, ("headers", "list")),
    ("routing-key-long", {"routing_key": "k" * 256}, ValueError, ("routing_key", "255")),
    ("routing-key-int", {"routing_key": 5}, TypeError, ("routing_key", "int")),
    ("exchange-long-utf8", {"exchange": "é" * 128}, ValueError, ("exchange", "256 bytes")),
    ("queue-long", {"queue": "q" * 300}, ValueError, ("queue", "300 bytes")),
    ("task-id-long", {"task_id": "i" * 256}, ValueError, ("task_id", "255")),
    ("task-id-empty", {"task_id": ""}, ValueError, ("task_id", "empty")),
    ("task-id-int", {"task_id": 5}, TypeError, ("task_id", "int")),
    ("countdown-nan", {"countdown": math.nan}, ValueError, ("countdown", "nan")),
    ("countdown-inf", {"countdown": math.inf}, ValueError, ("countdown", "inf")),
    ("countdown-huge", {"countdown": 1e300}, ValueError, ("countdown", "range")),
    ("countdown-str", {"countdown": "5"}, TypeError, ("countdown", "str")),
    ("countdown-bool", {"countdown": True}, TypeError, ("countdown", "bool")),
    ("eta-nan", {"eta": math.nan}, ValueError, ("eta", "nan")),
    ("expires-inf", {"expires": -math.inf}, ValueError, ("expires", "inf")),
    ("timeout-negative", {"timeout": -1}, ValueError, ("timeout", "-1")),
    ("timeout-nan", {"timeout": math.nan}, ValueError, ("timeout", "nan")),
    ("timeout-str", {"timeout": "1"}, TypeError, ("timeout", "str")),
    ("ignore-result-str", {"ignore_result": "yes"}, TypeError, ("ignore_result", "str")),
]


def _app(tmp_path: Path, broker: Broker) -> App:
    settings = load_config(write_config(tmp_path, broker), env={})
    asyncio.run(declare_topology(settings.broker.url, settings.topology))
    return App(settings)


def _check_refused(exc: BaseException, kind: type[Exception], words: tuple[str, ...]) -> None:
    assert type(exc) is kind, f"{type(exc).__name__}: {exc}"
    for word in words:
        assert word in str(exc), f"{word!r} not in {str(exc)!r}"


@pytest.mark.parametrize(
    ("options", "kind", "words"),
    [pytest.param(o, k, w, id=name) for name, o, k, w in BAD_OPTIONS],
)
def test_a_bad_option_is_refused_by_name_and_the_next_publish_is_confirmed_at_once(
    tmp_path: Path, broker: Broker, options: dict[str, Any], kind: type[Exception], words: Any
) -> None:
    app = _app(tmp_path, broker)
    try:
        app.send_task("examples.tasks.add", (0, 0), ignore_result=True)  # link open
        with pytest.raises(Exception) as err:
            app.send_task("examples.tasks.add", (1, 1), **options)
        _check_refused(err.value, kind, words)
        # send_many (the bulk path) shares the checks.
        with pytest.raises(Exception) as err:
            app.send_many([("examples.tasks.add", (1, 1), None)], **options)
        _check_refused(err.value, kind, words)
        start = time.monotonic()
        app.send_task("examples.tasks.add", (2, 2), ignore_result=True)
        assert time.monotonic() - start < QUICK
    finally:
        app.close()
    assert broker.depth("default") == 2  # nothing of the refused publishes got out


@pytest.mark.parametrize(
    ("options", "kind", "words"),
    [pytest.param(o, k, w, id=name) for name, o, k, w in BAD_OPTIONS[::3]],
)
def test_the_async_path_shares_the_checks(
    tmp_path: Path, broker: Broker, options: dict[str, Any], kind: type[Exception], words: Any
) -> None:
    app = _app(tmp_path, broker)

    async def main() -> None:
        try:
            with pytest.raises(Exception) as err:
                await app.send_task_async("examples.tasks.add", (1, 1), **options)
            _check_refused(err.value, kind, words)
            start = time.monotonic()
            await app.send_task_async("examples.tasks.add", (2, 2), ignore_result=True)
            assert time.monotonic() - start < QUICK
        finally:
            await app.aclose()

    asyncio.run(main())
    assert broker.depth("default") == 1


def test_good_header_values_of_every_supported_type_arrive(tmp_path: Path, broker: Broker) -> None:
    headers = {
        "s": "text",
        "b": b"\x00\xff",
        "t": True,
        "i": -(2**63),
        "d": Decimal("12.75"),
        "when": datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
        "none": None,
        "nested": {"list": [1, "a", {"deep": False}]},
    }
    app = _app(tmp_path, broker)
    try:
        app.send_task("examples.tasks.add", (1, 1), headers=headers, ignore_result=True)

        async def main() -> None:
            try:
                await app.send_task_async(
                    "examples.tasks.add", (1, 1), headers=headers, ignore_result=True
                )
            finally:
                await app.aclose()

        asyncio.run(main())
    finally:
        app.close()
    got = broker.get_all("default")
    assert len(got) == 2
    for props, _body in got:
        h = props.headers
        assert h["s"] == "text" and h["b"] == b"\x00\xff" and h["t"] is True
        assert h["i"] == -(2**63) and h["d"] == Decimal("12.75") and h["none"] is None
        assert h["when"] == datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
        assert h["nested"] == {"list": [1, "a", {"deep": False}]}


# -- values that slip past App.prepare: the publishers' own bookkeeping ---------------------
#: Each fails while pika/pamqp marshal the frames (nothing reaches the socket).
UNENCODABLE = [
    pytest.param("", "q", Properties(priority=300), id="priority-300"),
    pytest.param("", "q", Properties(headers={"k": object()}), id="header-object"),
    pytest.param("", "q", Properties(headers={"k": 2**70}), id="header-70-bits"),
    pytest.param("", "q", Properties(message_id="m" * 300), id="message-id-long"),
    pytest.param("", "q" * 300, Properties(), id="routing-key-long"),
]


def _queue(broker: Broker) -> None:
    broker.channel().queue_declare("q", durable=True)


@pytest.mark.parametrize(("exchange", "key", "props"), UNENCODABLE)
def test_sync_publisher_stays_healthy_after_a_frame_fails_to_build(
    broker: Broker, exchange: str, key: str, props: Properties
) -> None:
    _queue(broker)
    pub = SyncPublisher(broker.url, timeout=10)
    try:
        pub.publish("", "q", b"first", Properties())
        with pytest.raises(PublishError, match="nothing was published"):
            pub.publish(exchange, key, b"bad", props)
        start = time.monotonic()
        pub.publish("", "q", b"after", Properties())
        assert time.monotonic() - start < QUICK
        # Pipelined: bad and good interleaved in one batch; every good one is confirmed.
        futures = []
        for i in range(20):
            futures.append(pub.publish_nowait("", "q", b"good %d" % i, Properties()))
            futures.append(pub.publish_nowait(exchange, key, b"bad", props))
        for i, f in enumerate(futures):
            if i % 2:
                assert isinstance(f.exception(QUICK), PublishError)
            else:
                assert f.result(QUICK) is None
    finally:
        pub.close()
    assert broker.depth("q") == 22


@pytest.mark.parametrize("publisher", [AsyncPublisher, AsyncPikaPublisher])
@pytest.mark.parametrize(("exchange", "key", "props"), UNENCODABLE)
def test_async_publisher_stays_healthy_and_raises_a_publish_error(
    broker: Broker, exchange: str, key: str, props: Properties, publisher: Any
) -> None:
    """The app's asyncio publisher (aio-pika) and the worker's (pika on the loop) alike."""
    _queue(broker)

    async def main() -> None:
        pub = publisher(broker.url, timeout=10)
        try:
            await pub.publish("", "q", b"first", Properties())
            with pytest.raises(PublishError, match="nothing was published"):
                await pub.publish(exchange, key, b"bad", props)
            start = time.monotonic()
            await pub.publish("", "q", b"after", Properties())
            results = await asyncio.gather(
                *(
                    pub.publish(exchange, key, b"bad", props)
                    if i % 2
                    else pub.publish("", "q", b"good", Properties())
                    for i in range(20)
                ),
                return_exceptions=True,
            )
            assert time.monotonic() - start < QUICK
            assert all(isinstance(r, PublishError) for r in results[1::2])
            assert all(r is None for r in results[::2])
        finally:
            await pub.close()

    asyncio.run(main())
    assert broker.depth("q") == 12
