"""Revocations: the stream's record format (against the schema), the bounded expiring set a
worker keeps, and the should_run hook. Pure: the clock is passed in."""

from __future__ import annotations

import asyncio
import json
import logging
from importlib import resources
from typing import Any

import jsonschema
import pytest

from amqptasks.errors import DecodeError
from amqptasks.protocol import Envelope
from amqptasks.revocation import (
    Marker,
    Revocation,
    decode_record,
    encode_marker,
    encode_revocation,
)
from amqptasks.tasks import Sender, Task
from amqptasks.worker.middleware import Context
from amqptasks.worker.revoke import RevokedSet, RevokeMiddleware

SCHEMA = json.loads(
    (resources.files("amqptasks") / "schema" / "control-v1.json").read_text(encoding="utf-8")
)


def errors(record: Any, which: str) -> list[str]:
    validator = jsonschema.Draft202012Validator(
        {"$ref": f"#/$defs/{which}", "$defs": SCHEMA["$defs"]}
    )
    return [e.message for e in validator.iter_errors(record)]


def test_records_round_trip_and_match_the_schema() -> None:
    body = encode_revocation(["a", "b"], 60, now=1_900_000_000.0)
    obj = json.loads(body)
    assert errors(obj, "revocation") == []
    assert (obj["expires"], obj["time"]) == ("2030-03-17T17:47:40.000Z", "2030-03-17T17:46:40.000Z")
    record = decode_record(body)
    assert isinstance(record, Revocation)
    assert record.ids == ("a", "b") and record.expires == 1_900_000_060.0
    assert record.expired(1_900_000_060.0) and not record.expired(1_900_000_059.9)
    marker = encode_marker("w1@host.42.abc")
    assert errors(json.loads(marker), "marker") == []
    assert decode_record(marker) == Marker("w1@host.42.abc")


def test_unknown_records_are_skipped_and_broken_ones_named() -> None:
    assert decode_record(b'{"v": 2, "type": "revoke"}') is None
    assert decode_record(b'{"v": 1, "type": "pardon", "ids": ["a"]}') is None
    for body, problem in [
        (b"[]", "JSON object"),
        (b'{"v": 1, "type": "revoke", "ids": [], "expires": 1}', "'ids'"),
        (b'{"v": 1, "type": "revoke", "ids": ["a"], "expires": "soon"}', "expires"),
        (b'{"v": 1, "type": "marker"}', "'id'"),
        (b"not json", "JSON"),
    ]:
        with pytest.raises(DecodeError, match=problem):
            decode_record(body)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_revoked_set_forgets_expired_ids_and_keeps_the_longest_expiry() -> None:
    clock = Clock()
    revoked = RevokedSet(max_ids=10, clock=clock)
    assert revoked.add(["a", "b"], 1010.0) == ["a", "b"]
    assert revoked.add(["a"], 1030.0) == []  # already held: the later expiry wins
    assert revoked.add(["b"], 1005.0) == []  # an earlier one changes nothing
    assert revoked.add(["c"], 999.0) == []  # already over
    clock.now = 1015.0
    assert "a" in revoked and "b" not in revoked and "c" not in revoked
    clock.now = 1030.0
    assert "a" not in revoked
    assert revoked.add(["d"], 1100.0) == ["d"] and len(revoked) == 1  # expired ones dropped


def test_the_revoked_set_is_bounded_dropping_the_soonest_to_expire_loudly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    revoked = RevokedSet(max_ids=3, clock=clock)
    revoked.add(["late"], 5000.0)
    revoked.add(["soon", "mid"], 2000.0)
    with caplog.at_level(logging.WARNING, "amqptasks.worker"):
        revoked.add(["new"], 3000.0)
    assert len(revoked) == 3 and revoked.evicted == 1
    assert "late" in revoked and "new" in revoked
    assert ("soon" in revoked) != ("mid" in revoked)  # one of the two soonest went
    assert "1 revocation(s) dropped before their expiry: more than revoke.max_ids (3)" in (
        caplog.text
    )


def test_the_hook_settles_a_revoked_id_without_running_and_wants_only_those() -> None:
    revoked = RevokedSet(clock=Clock())
    hook = RevokeMiddleware(revoked)
    task = Task(lambda: None, Sender(), name="t")
    env = Envelope(task="t", id="a")
    other = Envelope(task="t", id="b")
    assert not hook.wants(env)  # the fast path may take it
    revoked.add(["a"], 2000.0)
    assert hook.wants(env) and not hook.wants(other)
    ctx = Context(env, task, "q", "w@h")
    assert asyncio.run(hook.should_run(ctx)) is False
    assert ctx.extra["skip"] == "revoked"
    assert ctx.preset is not None and ctx.preset.revoked and not ctx.preset.terminated
    assert type(ctx.preset.exc).__name__ == "TaskRevoked"
    assert asyncio.run(hook.should_run(Context(other, task, "q", "w@h"))) is True
