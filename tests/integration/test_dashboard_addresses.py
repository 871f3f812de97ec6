"""The dashboard with several broker addresses (a cluster): the management API client takes
the first host that answers and skips one that does not, an error names every host tried and
no password; the events queue feeding the history takes the config's queue type."""

from __future__ import annotations

import asyncio

import pytest

from amqptasks.dashboard.broker_api import BrokerApi, BrokerApiError
from amqptasks.transport.event_listener import EventListener

# 127.0.0.2 is loopback on Linux, but the local broker's management API listens on
# 127.0.0.1 only: a connection there is refused at once.
DOWN = "amqp://guest:secret-word@127.0.0.2:5672/{vhost}"


def test_a_host_that_does_not_answer_is_skipped_for_the_next(broker):
    broker.channel().queue_declare("seen_through_the_second_host", durable=True)
    api = BrokerApi([DOWN.format(vhost=broker.vhost), broker.url])

    async def read() -> list[str]:
        try:
            first = [q["name"] for q in await api.queues()]
            again = [q["name"] for q in await api.queues()]  # stays on the host that answered
            assert first == again
            return first
        finally:
            await api.close()

    assert "seen_through_the_second_host" in asyncio.run(read())
    assert api.base.startswith("http://localhost:15672")


def test_when_no_host_answers_the_error_names_each_and_no_password(broker):
    api = BrokerApi([DOWN.format(vhost=broker.vhost), "amqp://guest:secret-word@127.0.0.3/"])

    async def read() -> None:
        try:
            await api.queues()
        finally:
            await api.close()

    with pytest.raises(BrokerApiError) as err:
        asyncio.run(read())
    text = str(err.value)
    assert "127.0.0.2:15672" in text and "127.0.0.3:15672" in text
    assert "secret-word" not in text


def test_a_quorum_config_gives_the_durable_events_queue_the_quorum_type(broker):
    """On a cluster the dashboard's history is fed by a queue that survives its node."""
    quorum = EventListener(
        [DOWN.format(vhost=broker.vhost), broker.url],
        queue="history_feed",
        queue_type="quorum",
        timeout=5,
    )
    classic = EventListener(broker.url, queue="tail_feed", timeout=5)
    try:
        quorum.open()
        classic.open()
    finally:
        quorum.close()
        classic.close()
    assert broker.queue_info("history_feed")["type"] == "quorum"
    assert broker.queue_info("tail_feed")["type"] == "classic"
