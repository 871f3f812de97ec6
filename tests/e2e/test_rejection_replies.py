"""A caller waiting for a task that is dead-lettered before it runs hears why at once.

Without a reply the caller would wait its whole timeout for a task that will never run (an
unknown name, an expired message, a refused content type, a body too large or undecodable).
"""

from __future__ import annotations

import json
import time

import pika
import pytest
from broker_fixtures import wait_for, write_config

from amqptasks import App, TaskError, load_config


def _app(cfg):
    return App(load_config(cfg, env={}))


def test_unknown_task_get_raises_at_once_and_the_message_is_in_the_dlq(
    tmp_path, broker, worker_factory
):
    cfg = write_config(tmp_path, broker)
    worker_factory(cfg, "-Q", "default")
    app = _app(cfg)
    try:
        result = app.send_task("no.such.task", (1,))
        start = time.monotonic()
        with pytest.raises(TaskError) as info:
            result.get(timeout=20)
        assert time.monotonic() - start < 5
    finally:
        app.close()
    err = info.value
    assert type(err).__name__ == "TaskNotRegistered"
    assert "no.such.task" in str(err) and "default.dlq" in str(err)
    wait_for(lambda: broker.depth("default.dlq") == 1, message="the dead letter")
    [(props, _)] = broker.get_all("default.dlq")
    assert props.headers["x-amqptasks-reason"] == "unknown-task"


def test_expired_before_start_get_raises_task_expired(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    w = worker_factory(cfg, "-Q", "default")
    w.stop()  # declared; nobody consumes now
    app = _app(cfg)
    try:
        result = app.send_task("testtasks.record", ("old",), expires=0.5)
        time.sleep(1)  # let it expire while nobody consumes
        worker_factory(cfg, "-Q", "default")
        with pytest.raises(TaskError) as info:
            result.get(timeout=20)
    finally:
        app.close()
    assert type(info.value).__name__ == "TaskExpired"


@pytest.mark.parametrize(
    ("body", "content_type", "reason", "error_type"),
    [
        (b"{not json", None, "decode-error", "DecodeError"),
        (
            b"\x80\x03}q\x00.",
            "application/x-python-serialize",
            "content-type-refused",
            "ContentTypeRefused",
        ),
        (
            b'{"task": "testtasks.record", "args": ["' + b"x" * 2048 + b'"]}',
            None,
            "too-large",
            "MessageTooLarge",
        ),
    ],
)
def test_foreign_client_gets_a_failure_reply_for_what_cannot_run(
    tmp_path, broker, worker_factory, body, content_type, reason, error_type
):
    cfg = write_config(tmp_path, broker, serialization={"max_body_size": 1024})
    worker_factory(cfg, "-Q", "default")
    conn = broker.connect()
    ch = conn.channel()
    replies = []
    ch.basic_consume(
        "amq.rabbitmq.reply-to",
        lambda c, m, p, b: replies.append((p, json.loads(b))),
        auto_ack=True,
    )
    ch.basic_publish(
        "tasks",
        "task.bad",
        body,
        pika.BasicProperties(
            reply_to="amq.rabbitmq.reply-to",
            correlation_id="corr-bad",
            message_id="m-bad",
            content_type=content_type,
        ),
    )
    deadline = time.monotonic() + 10
    while not replies and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.2)
    [(props, reply)] = replies
    assert props.correlation_id == "corr-bad"
    assert reply["status"] == "FAILURE" and reply["id"] == "m-bad"
    assert reply["error"]["reason"] == reason
    assert reply["error"]["type"] == error_type
    wait_for(lambda: broker.depth("default.dlq") == 1, message="the dead letter")
