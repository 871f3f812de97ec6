"""The events format: routing keys, previews, batches that keep each task's order, filters,
and the events a worker emits checked against the shipped schema (schema/event-v1.json).

The e2e tests (tests/e2e/test_events_cli.py) validate real events from a real worker too;
these pin down each type and edge without a broker.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from importlib import resources
from typing import Any

import jsonschema
import pytest

from amqptasks import events
from amqptasks.errors import DecodeError, TaskExpired, TimeLimitExceeded
from amqptasks.events import (
    MAX_EVENTS_PER_MESSAGE,
    PREVIEW_LIMIT,
    TYPES,
    EventFilter,
    EventSource,
    decode_batch,
    encode_batch,
    preview,
    rfc3339,
    routing_key,
)
from amqptasks.protocol import Envelope, Properties
from amqptasks.transport.aio import AsyncPublisher
from amqptasks.worker.events import EventEmitter, worker_snapshot_fields
from amqptasks.worker.middleware import Outcome, Rejection
from amqptasks.worker.stats import Stats

SCHEMA = json.loads(
    (resources.files("amqptasks") / "schema" / "event-v1.json").read_text(encoding="utf-8")
)
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def errors(event: dict[str, Any]) -> list[str]:
    return [f"{list(e.path)}: {e.message}" for e in VALIDATOR.iter_errors(event)]


# -- small pure parts ---------------------------------------------------------------------------
def test_routing_keys_are_the_type_with_a_dot() -> None:
    assert routing_key("task-succeeded") == "task.succeeded"
    assert routing_key("worker-heartbeat") == "worker.heartbeat"
    assert {routing_key(t) for t in TYPES} == {t.replace("-", ".", 1) for t in TYPES}
    assert set(SCHEMA["properties"]["type"]["enum"]) == set(TYPES)


def test_rfc3339_is_utc_with_milliseconds_and_matches_the_schema_pattern() -> None:
    ts = NOW.timestamp() + 0.1234
    assert rfc3339(ts) == "2030-01-02T03:04:05.123Z"
    assert rfc3339(ts + 0.0004) == "2030-01-02T03:04:05.123Z"  # the cached millisecond
    assert rfc3339(ts + 0.001) == "2030-01-02T03:04:05.124Z"
    assert rfc3339(ts + 1) == "2030-01-02T03:04:06.123Z"  # the cached second moves on
    assert rfc3339(ts + 86400) == "2030-01-03T03:04:05.123Z"
    pattern = SCHEMA["$defs"]["datetime"]["pattern"]
    assert re.match(pattern, rfc3339(ts))


def test_preview_is_json_text_cut_with_an_ellipsis_and_repr_for_the_rest() -> None:
    assert preview((2, 3)) == ("[2,3]", False)
    assert preview({"a": "é"}) == ('{"a":"é"}', False)
    long, cut = preview(["x" * 2000])
    assert cut and len(long) == PREVIEW_LIMIT + 1 and long.endswith("…")
    obj = object()
    assert preview(obj) == (repr(obj), False)


# -- batches ------------------------------------------------------------------------------------
def _ev(src: EventSource, kind: str, task_id: str) -> dict[str, Any]:
    e = src.event(kind)
    e["id"] = task_id
    return e


def test_a_batch_is_one_message_per_type_in_task_life_order() -> None:
    src = EventSource("w1@host", pid=1)
    batch = [
        _ev(src, "task-succeeded", "a"),  # a's earlier events went in an earlier batch
        _ev(src, "task-received", "b"),
        _ev(src, "task-started", "b"),
        _ev(src, "task-received", "c"),
        _ev(src, "task-failed", "b"),
        _ev(src, "task-started", "c"),
    ]
    messages = encode_batch(batch)
    assert [(k, n) for k, _b, n in messages] == [
        ("task.received", 2),
        ("task.started", 2),
        ("task.succeeded", 1),
        ("task.failed", 1),
    ]
    flat = [e for _k, body, _n in messages for e in decode_batch(body)]
    for task_id in "abc":
        mine = [e["clock"] for e in flat if e["id"] == task_id]
        assert mine == sorted(mine), f"task {task_id}: events out of order"
    assert sorted(e["clock"] for e in flat) == [e["clock"] for e in batch]


def test_a_second_delivery_of_one_id_cuts_the_batch() -> None:
    src = EventSource("w1@host", pid=1)
    batch = [
        _ev(src, "task-received", "a"),
        _ev(src, "task-started", "a"),
        _ev(src, "task-retried", "a"),
        _ev(src, "task-received", "a"),  # the retry copy, delivered again
        _ev(src, "task-started", "a"),
    ]
    flat = [e for _k, body, _n in encode_batch(batch) for e in decode_batch(body)]
    assert [e["type"] for e in flat] == [e["type"] for e in batch]


def test_big_groups_are_split_into_bounded_messages() -> None:
    src = EventSource("w1@host", pid=1)
    batch = [_ev(src, "task-started", str(i)) for i in range(MAX_EVENTS_PER_MESSAGE + 5)]
    assert [n for _k, _b, n in encode_batch(batch)] == [MAX_EVENTS_PER_MESSAGE, 5]


def test_decode_batch_takes_an_array_or_one_object_and_refuses_the_rest() -> None:
    assert decode_batch(b'[{"type": "task-started"}]') == [{"type": "task-started"}]
    assert decode_batch(b'{"type": "task-started"}') == [{"type": "task-started"}]
    for bad in (b"3", b'[{"no": "type"}]', b"[1]", b"not json"):
        with pytest.raises(DecodeError):
            decode_batch(bad)


# -- filters ------------------------------------------------------------------------------------
def test_filter_bindings_let_the_broker_drop_what_is_not_wanted() -> None:
    assert EventFilter().routing_keys() == ("#",)
    assert EventFilter.parse(states=["failed,succeeded"]).routing_keys() == (
        "task.succeeded",
        "task.failed",
    )
    assert EventFilter.parse(states=["heartbeat"]).routing_keys() == ("worker.heartbeat",)
    assert EventFilter.parse(tasks=["a.*"]).routing_keys() == ("task.#",)
    assert EventFilter.parse(tasks=["a.*"], states=["online", "failed"]).routing_keys() == (
        "task.failed",
    )
    with pytest.raises(ValueError, match=r"unknown state.*succeded"):
        EventFilter.parse(states=["succeded"])


def test_filter_matches_task_glob_state_worker_and_queue() -> None:
    e = {"type": "task-failed", "task": "examples.tasks.add", "hostname": "w1@a", "queue": "q"}
    worker = {"type": "worker-heartbeat", "hostname": "w1@a"}
    assert EventFilter().matches(e) and EventFilter().matches(worker)
    assert EventFilter.parse(tasks=["examples.*"]).matches(e)
    assert not EventFilter.parse(tasks=["examples.web.*"]).matches(e)
    assert not EventFilter.parse(tasks=["*"]).matches(worker)  # task filters: task events
    assert EventFilter.parse(states=["failed"]).matches(e)
    assert not EventFilter.parse(states=["succeeded"]).matches(e)
    assert EventFilter.parse(workers=["w1@*"]).matches(worker)
    assert not EventFilter.parse(workers=["w2@*"]).matches(e)
    assert EventFilter.parse(queues=["q"]).matches(e)
    assert not EventFilter.parse(queues=["other"]).matches(e)
    assert not EventFilter.parse(queues=["q"]).matches(worker)


# -- what the worker emits, against the schema -----------------------------------------------------
@pytest.fixture
def emitter() -> EventEmitter:
    # Never started: its events stay in the buffer, where the test reads them.
    return EventEmitter(
        AsyncPublisher("amqp://guest:guest@localhost:1/%2F"),
        EventSource("w1@host"),
        Stats(),
        lambda: worker_snapshot_fields(
            pool="threads",
            concurrency=8,
            prefetch=32,
            queues=("default",),
            active=1,
            reserved=0,
            processed=5,
            version="0.1.0",
        ),
        heartbeat_interval=2.0,
    )


def emitted(emitter: EventEmitter) -> list[dict[str, Any]]:
    """The pending events, in emission (clock) order."""
    segments = [*emitter._sealed, emitter._groups]
    found = [e for groups in segments for members in groups.values() for e in members]
    return sorted(found, key=lambda e: e["clock"])  # type: ignore[no-any-return]


def test_every_event_type_a_worker_emits_validates_and_says_what_happened(
    emitter: EventEmitter,
) -> None:
    env = Envelope(
        task="examples.tasks.add",
        id="id-1",
        args=(2, 3),
        kwargs={"k": "x" * 2000},
        retries=1,
        eta=NOW,
        expires=NOW + timedelta(hours=1),
        root_id="root",
        parent_id="parent",
        links={
            "chord": {"id": "chord-1", "index": 0, "size": 1, "body": {"task": "b"}},
            "group_id": "group-1",
        },
    )
    try:
        raise ValueError("bad value")
    except ValueError as exc:
        failure = exc
    emitter._worker_event("worker-online")
    emitter.received(env, "default")
    emitter.started(env, "default")
    emitter.succeeded(env, "default", 0.25, {"sum": 5})
    emitter.failed(
        env,
        "default",
        Outcome(False, exc=failure, traceback="Traceback...", runtime=0.1, retry_countdown=4.0),
    )
    emitter.failed(env, "default", Outcome(False, exc=failure, traceback=None, runtime=0.1))
    emitter.failed(env, "default", Outcome(False, exc=TimeLimitExceeded("over"), runtime=9.0))
    emitter.failed(env, "default", Outcome(False, exc=TaskExpired("too late"), runtime=0.0))
    emitter.rejected(
        Rejection(
            "id-1",
            "unknown-task",
            "task 'x' is not registered",
            "default",
            "w1@host",
            Properties(),
            env,
        )
    )
    emitter.rejected(
        Rejection(
            "id-1",
            "expired",
            "expired at ... while it waited",
            "default",
            "w1@host",
            Properties(),
            env,
        )
    )
    emitter.rejected(
        Rejection("<no id>", "decode-error", "body is not JSON", "default", "w1@host", Properties())
    )
    emitter.skipped(env, "default", "duplicate")
    emitter._worker_event("worker-heartbeat")
    emitter._worker_event("worker-offline")

    out = emitted(emitter)
    for e in out:
        assert errors(e) == [], e
    assert [e["type"] for e in out] == [
        "worker-online",
        "task-received",
        "task-started",
        "task-succeeded",
        "task-retried",
        "task-failed",
        "task-failed",
        "task-expired",
        "task-rejected",
        "task-expired",
        "task-rejected",
        "task-revoked",
        "worker-heartbeat",
        "worker-offline",
    ]
    assert [e["clock"] for e in out] == list(range(len(out)))
    received = out[1]
    assert received["args"] == "[2,3]" and received["truncated"] == ["kwargs"]
    assert received["kwargs"].endswith("…") and len(received["kwargs"]) == PREVIEW_LIMIT + 1
    assert (received["root_id"], received["parent_id"]) == ("root", "parent")
    assert (received["chord_id"], received["group_id"]) == ("chord-1", "group-1")
    assert received["eta"] == NOW.isoformat() and received["retries"] == 1
    assert out[3]["result"] == '{"sum":5}' and out[3]["runtime"] == 0.25
    assert out[4]["countdown"] == 4.0
    assert out[4]["exception"] == {"type": "ValueError", "message": "bad value"}
    assert [out[5]["reason"], out[6]["reason"]] == ["task-failed", "time-limit"]
    assert out[8]["reason"] == "unknown-task"
    assert out[10]["id"] is None and out[10]["task"] is None
    assert out[11]["reason"] == "duplicate" and out[11]["terminated"] is False
    assert out[12]["queues"] == ["default"] and out[12]["interval"] == 2.0


def test_sent_events_of_the_app_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    from amqptasks import App
    from amqptasks.config import Settings

    settings = Settings.from_mapping(
        {
            "exchanges": {"tasks": {"type": "topic"}},
            "queues": {"default": {"bindings": [{"exchange": "tasks", "routing_key": "#"}]}},
            "default_route": {"exchange": "tasks", "routing_key": "task.x"},
        }
    )
    app = App(settings, send_events=True)
    p = app.prepare("examples.tasks.add", (1, 2), reply_to=None, countdown=30)
    e = app._sent_event(p)
    assert errors(e) == []
    assert (e["type"], e["exchange"], e["routing_key"]) == ("task-sent", "tasks", "task.x")
    assert e["eta"] is not None and "queue" not in e


def test_the_schema_lists_exactly_the_fields_events_carry() -> None:
    # Every field the code writes is described, and nothing described is never written:
    # the names below are all the keys the emitter, EventSource and the app use.
    written = {
        "v", "type", "time", "hostname", "pid", "clock",  # EventSource.event
        "id", "task", "queue", "root_id", "parent_id", "group_id", "chord_id",  # task_event
        "args", "kwargs", "truncated", "retries", "eta", "expires",  # with_call
        "runtime", "result",  # with_result
        "exception", "traceback",  # with_exception
        "reason", "detail", "countdown", "terminated",  # worker/events.py
        "exchange", "routing_key",  # task-sent
        "interval", *worker_snapshot_fields(
            pool="threads", concurrency=1, prefetch=1, queues=(), active=0, reserved=0,
            processed=0, version="x",
        ),
    }  # fmt: skip
    assert set(SCHEMA["properties"]) == written
    for name, prop in SCHEMA["properties"].items():
        assert prop.get("description"), f"property {name!r} has no description"
    assert SCHEMA["properties"]["v"]["const"] == events.EVENT_VERSION
