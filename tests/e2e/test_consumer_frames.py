"""Deliveries read by the worker's own frame reader (transport/pika_frames.py), from a real
broker: a body larger than the broker's frame size arrives in several body frames and must be
run whole, and the properties and headers a foreign client sets must reach the task as sent.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

import pika
from broker_fixtures import wait_for, write_config


def test_multi_frame_bodies_and_foreign_properties_reach_the_task(
    tmp_path, broker, worker_factory
) -> None:
    cfg = write_config(tmp_path, broker)
    worker_factory(cfg, "-Q", "default")
    big = "é" * 200_000 + "x" * 150_000  # 550,000 bytes of JSON: five 128 KiB body frames
    sent = {
        "big": (
            {"task": "testtasks.collect", "args": [[big, len(big)]]},
            pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                priority=3,
                app_id="a-node-client",
                type="task",
                timestamp=1_764_800_000,
                expiration="600000",
            ),
        ),
        "headers": (
            {"task": "testtasks.headers"},
            pika.BasicProperties(
                content_type="application/json; charset=utf-8",
                content_encoding="utf-8",
                headers={"tenant": {"ids": [1, 2, 3], "name": "acme"}, "trace": "t-1"},
            ),
        ),
        "empty-args": ({"task": "testtasks.collect", "args": [[]]}, pika.BasicProperties()),
    }
    replies: dict[str, Any] = {}
    conn = broker.connect()
    try:
        ch = conn.channel()

        def on_reply(_ch: Any, _method: Any, props: Any, body: bytes) -> None:
            replies[props.correlation_id] = json.loads(body)

        ch.basic_consume("amq.rabbitmq.reply-to", on_reply, auto_ack=True)
        ch.confirm_delivery()
        ids = {}
        for name, (body, props) in sent.items():
            ids[name] = props.correlation_id = uuid.uuid4().hex
            props.reply_to = "amq.rabbitmq.reply-to"
            ch.basic_publish("", "default", json.dumps(body).encode(), props, mandatory=True)
        wait_for(
            lambda: conn.process_data_events(time_limit=0.2) or len(replies) == len(sent),
            timeout=30,
            message="a reply to every message",
        )
    finally:
        conn.close()
    big_reply = replies[ids["big"]]
    assert big_reply["status"] == "SUCCESS", big_reply
    text, length = big_reply["result"]
    assert length == len(big) and len(text) == len(big)
    assert hashlib.sha256(text.encode()).digest() == hashlib.sha256(big.encode()).digest()
    assert replies[ids["headers"]]["result"] == {
        "tenant": {"ids": [1, 2, 3], "name": "acme"},
        "trace": "t-1",
    }
    assert replies[ids["empty-args"]]["result"] == []
    assert broker.depth("default") == 0
