"""No broker password in the repr/str of anything that holds the URL.

Error trackers capture local variables by their repr and debug prints use it; the objects keep
the real URL (they connect with it), only what they show of themselves is checked here.
"""

from __future__ import annotations

import asyncio

import pytest

from amqptasks import App
from amqptasks.config import Settings
from amqptasks.scheduler import Scheduler
from amqptasks.transport.aio import AsyncPublisher, DeadLetterSession
from amqptasks.transport.beat_lock import BeatLink
from amqptasks.transport.pika_consumer import PikaConsumer
from amqptasks.transport.pika_publisher import SyncPublisher
from amqptasks.worker import Worker, WorkerOptions

PASSWORD = "s3cr3t-Pw"
URL = f"amqp://app:{PASSWORD}@rabbit:5672/prod"


@pytest.fixture
def settings() -> Settings:
    return Settings.from_mapping(
        {
            "broker": {"url": URL},
            "exchanges": {"tasks": {"type": "topic"}},
            "queues": {"default": {"bindings": [{"exchange": "tasks", "routing_key": "#"}]}},
        }
    )


def shown(obj: object) -> str:
    return repr(obj) + "\n" + str(obj)


def test_settings_and_broker_settings(settings: Settings) -> None:
    assert settings.broker.url == URL  # the real URL is kept for connecting
    for obj in (settings, settings.broker):
        assert PASSWORD not in shown(obj)
        assert "amqp://app:***@rabbit:5672/prod" in shown(obj)


def test_app_and_publishers(settings: Settings) -> None:
    app = App(settings)
    objects: list[object] = [app, SyncPublisher(URL), AsyncPublisher(URL)]
    for obj in objects:
        assert PASSWORD not in shown(obj), type(obj).__name__


def test_worker_consumer_scheduler_and_sessions(settings: Settings) -> None:
    async def build() -> list[object]:  # asyncio primitives want a running loop on 3.10
        return [
            Worker(settings, {}, WorkerOptions(queues=("default",))),
            PikaConsumer(URL, prefetch=1),
            Scheduler(settings, []),
            BeatLink(URL, lock_queue="l", state_queue="s", name="n"),
            DeadLetterSession(URL, "default.dlq"),
        ]

    for obj in asyncio.run(build()):
        assert PASSWORD not in shown(obj), type(obj).__name__
