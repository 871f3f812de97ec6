"""The shipped JSON Schemas agree with the code that reads and writes the wire format.

``message-v1.json`` must accept what ``protocol.encode`` writes and what ``protocol.decode``
accepts, and refuse what ``decode`` refuses; ``reply-v1.json`` must accept what
``protocol.encode_reply`` writes. The schemas are loaded from the installed package, the way a
user of the wheel would find them.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from importlib import resources
from typing import Any

import jsonschema
import pytest

from amqptasks import protocol
from amqptasks.errors import ProtocolError
from amqptasks.protocol import (
    FAILURE,
    SUCCESS,
    Envelope,
    Properties,
    Reply,
    decode,
    dumps,
    encode,
    encode_reply,
    loads,
)

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def load_schema(name: str) -> dict[str, Any]:
    text = (resources.files("amqptasks") / "schema" / name).read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


MESSAGE_SCHEMA = load_schema("message-v1.json")
REPLY_SCHEMA = load_schema("reply-v1.json")
MESSAGE = jsonschema.Draft202012Validator(MESSAGE_SCHEMA)
REPLY = jsonschema.Draft202012Validator(REPLY_SCHEMA)


def schema_errors(validator: jsonschema.Draft202012Validator, obj: object) -> list[str]:
    return [e.message for e in validator.iter_errors(obj)]


@pytest.mark.parametrize("schema", [MESSAGE_SCHEMA, REPLY_SCHEMA], ids=["message", "reply"])
def test_schema_is_valid_draft_2020_12_with_id_title_and_descriptions(
    schema: dict[str, Any],
) -> None:
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"]
    assert schema["title"]
    assert schema["additionalProperties"] is False
    for name, prop in schema["properties"].items():
        assert prop.get("description"), f"property {name!r} has no description"


def test_message_schema_lists_exactly_the_fields_decode_knows() -> None:
    assert set(MESSAGE_SCHEMA["properties"]) == set(protocol._KNOWN_FIELDS)
    assert MESSAGE_SCHEMA["required"] == ["task"]


# -- messages: what is valid for one is valid for the other --------------------------------------
ENCODED_SHAPES = [
    Envelope(task="examples.tasks.add", args=(2, 3)),
    Envelope(task="examples.tasks.add", id="fixed-id"),
    Envelope(task="examples.tasks.reduce", args=([1, 2, 3],), kwargs={"op": "mul"}),
    Envelope(task="t", retries=4, root_id="root", parent_id="parent"),
    Envelope(task="t", eta=NOW, expires=NOW + timedelta(hours=1)),
    Envelope(task="t", eta=datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=timezone.utc)),
    Envelope(task="t", expires=datetime(2030, 1, 2, 3, 4, 5)),  # naive: written without offset
    Envelope(task="t", expires=NOW.astimezone(timezone(timedelta(hours=-5, minutes=-30)))),
    # An offset with seconds (e.g. Amsterdam before 1937) has no RFC 3339 form: sent in UTC.
    Envelope(task="t", eta=NOW.astimezone(timezone(timedelta(minutes=19, seconds=32)))),
    Envelope(task="t", links={"callbacks": [{"task": "a"}], "errbacks": [], "chain": []}),
    Envelope(task="t", links={"chord": {"id": "c", "index": 0, "size": 2, "body": {"task": "b"}}}),
    Envelope(
        task="t",
        links={
            "chain": [
                {"task": "a", "args": [1], "options": {"task_id": "i-a", "queue": "q"}},
                {"group": [{"task": "b"}, {"chain": [{"task": "c"}]}], "id": "g"},
                {"header": [{"task": "d", "immutable": True}], "body": {"task": "e"}, "id": "c"},
            ],
            "group_id": "g-1",
            "errbacks": [{"task": "eb", "options": {"link": [{"task": "x"}]}}],
        },
    ),
    Envelope(task="t", correlation_id="c", reply_to="r", priority=9, headers={"x": "y"}),
]


@pytest.mark.parametrize("envelope", ENCODED_SHAPES)
def test_schema_accepts_what_encode_writes(envelope: Envelope) -> None:
    raw, props = encode(envelope)
    assert schema_errors(MESSAGE, loads(raw)) == []
    decode(raw, props, now=NOW)


GOOD_BODIES: list[dict[str, Any]] = [
    {"task": "examples.tasks.add", "args": [2, 3]},  # the minimal message
    {"task": "t"},
    {"task": "t", "v": 1},
    {"task": "t", "id": None, "root_id": None, "parent_id": None},
    {"task": "t", "args": [], "kwargs": {}, "retries": 0},
    {"task": "t", "retries": 1.0},  # a JSON Schema integer: a number with a zero fraction
    {"task": "t", "retries": 0.0},
    {"task": "t", "eta": "2030-01-02T03:04:05Z"},
    {"task": "t", "eta": "2030-01-02T03:04:05.1Z"},
    {"task": "t", "eta": "2030-01-02T03:04:05.12345+05:30"},  # Python 3.10 refused 5 digits
    {"task": "t", "eta": "2030-01-02T03:04:05.123456789+01:00"},
    {"task": "t", "eta": "2030-01-02T03:04:05.1234567890123Z"},
    {"task": "t", "eta": "2030-01-02T03:04:05-00:00"},
    {"task": "t", "eta": "2030-01-02 03:04:05"},
    {"task": "t", "eta": "2030-01-02t03:04:05-08:00"},
    {"task": "t", "eta": 0},
    {"task": "t", "eta": -1.5},
    {"task": "t", "eta": "2030-01-02T03:04:05Z", "countdown": None},
    {"task": "t", "eta": None, "countdown": 30},
    {"task": "t", "countdown": 0.5},
    {"task": "t", "expires": "2030-01-02T03:04:05+00:00"},
    {"task": "t", "expires": 60},
    {"task": "t", "expires": None, "eta": None, "countdown": None},
    {"task": "t", "callbacks": None, "errbacks": None, "chain": None, "chord": None},
    {"task": "t", "callbacks": [{"task": "a"}], "errbacks": [], "chain": [{"chain": []}]},
    {"task": "t", "chord": {"id": "c", "index": 1, "size": 2, "body": {"group": []}}},
    {"task": "t", "group_id": "g"},
]


@pytest.mark.parametrize("obj", GOOD_BODIES)
def test_good_bodies_pass_schema_and_decode(obj: dict[str, Any]) -> None:
    assert schema_errors(MESSAGE, obj) == []
    decode(dumps(obj), Properties(), now=NOW)


BAD_BODIES: list[Any] = [
    [],
    ["examples.tasks.add", [2, 3]],
    "examples.tasks.add",
    42,
    None,
    {},
    {"args": [2, 3]},
    {"task": ""},
    {"task": None},
    {"task": 5},
    {"task": ["t"]},
    {"task": "t", "colour": "red"},
    {"task": "t", "Task": "t"},
    {"task": "t", "v": 2},
    {"task": "t", "v": "1"},
    {"task": "t", "v": None},
    {"task": "t", "id": 5},
    {"task": "t", "id": ["x"]},
    {"task": "t", "args": None},
    {"task": "t", "args": "2, 3"},
    {"task": "t", "args": {"x": 1}},
    {"task": "t", "kwargs": None},
    {"task": "t", "kwargs": [1]},
    {"task": "t", "kwargs": "x=1"},
    {"task": "t", "retries": -1},
    {"task": "t", "retries": 1.5},
    {"task": "t", "retries": "1"},
    {"task": "t", "retries": True},
    {"task": "t", "retries": None},
    {"task": "t", "eta": "2030-01-02T03:04:05Z", "countdown": 5},
    {"task": "t", "eta": 10, "countdown": 5},
    {"task": "t", "eta": "tomorrow"},
    {"task": "t", "eta": "2030-13-01T00:00:00Z"},
    {"task": "t", "eta": "2030-01-02T24:00:00Z"},
    {"task": "t", "eta": "2030-01-02T03:04:60Z"},
    {"task": "t", "eta": "2030-01-02T03:04:05z"},
    {"task": "t", "eta": "2030-01-02T03:04:05+25:00"},
    {"task": "t", "eta": True},
    {"task": "t", "eta": [2030, 1, 2]},
    {"task": "t", "eta": {"seconds": 5}},
    {"task": "t", "countdown": "10"},
    {"task": "t", "countdown": True},
    {"task": "t", "countdown": [10]},
    {"task": "t", "expires": "soon"},
    {"task": "t", "expires": False},
    {"task": "t", "expires": {}},
    {"task": "t", "root_id": 1},
    {"task": "t", "parent_id": {}},
    {"task": "t", "callbacks": {"task": "a"}},
    {"task": "t", "errbacks": "a"},
    {"task": "t", "chain": 1},
    {"task": "t", "chord": []},
    {"task": "t", "chord": "c"},
    {"task": "t", "callbacks": [1]},
    {"task": "t", "errbacks": ["x"]},
    {"task": "t", "chain": [{}]},
    {"task": "t", "chain": [{"task": "a", "options": {"qeue": "q"}}]},
    {"task": "t", "chain": [{"task": "a", "extra": 1}]},
    {"task": "t", "chain": [{"header": [{"task": "a"}]}]},
    {"task": "t", "chord": {"a": 1}},
    {"task": "t", "chord": {"id": "c", "index": 0, "size": 1}},
    {"task": "t", "group_id": 5},
    {"task": "t", "v": True},  # True == 1 in Python, not in JSON
    {"task": "t", "retries": -1.0},
    # ISO 8601 forms that Python 3.11's datetime.fromisoformat accepts but RFC 3339 does not:
    {"task": "t", "eta": "2030-01-02"},
    {"task": "t", "expires": "2030-01-02"},
    {"task": "t", "eta": "2030-01-02T03:04"},
    {"task": "t", "eta": "2030-01-02T03:04:05+0100"},
    {"task": "t", "eta": "2030-01-02T03:04:05+01"},
    {"task": "t", "eta": "2030-01-02T03:04:05+01:00:30"},
    {"task": "t", "eta": "2030-01-02T03:04:05.Z"},
    {"task": "t", "eta": "20300102T030405Z"},
    {"task": "t", "eta": "2030-W01-2T03:04:05Z"},
    {"task": "t", "eta": "2030-01-02T03:04:05,5Z"},
    {"task": "t", "eta": " 2030-01-02T03:04:05Z"},
    {"task": "t", "eta": "\u0662\u0660\u0663\u0660-01-02T03:04:05Z"},  # non-ASCII digits
]


@pytest.mark.parametrize("obj", BAD_BODIES)
def test_bad_bodies_fail_both_schema_and_decode(obj: Any) -> None:
    assert schema_errors(MESSAGE, obj), "the schema accepted it"
    with pytest.raises(ProtocolError):
        decode(dumps(obj), Properties(), now=NOW)


# -- replies ------------------------------------------------------------------------------------
REPLIES = [
    Reply("id-1", SUCCESS, "examples.tasks.add", result=5),
    Reply("id-1", SUCCESS, "examples.tasks.add", result=None),
    Reply("id-1", SUCCESS, "t", result={"nested": [1, "two", None, 3.5]}),
    Reply("id-1", SUCCESS, "", result="no task name"),
    Reply(
        "id-1",
        FAILURE,
        "t",
        error_type="ZeroDivisionError",
        error_message="division by zero",
        traceback="Traceback (most recent call last): ...",
    ),
    Reply("id-1", FAILURE, "t", error_type="KeyError", error_message="'k'", traceback=None),
    Reply("id-1", SUCCESS, "t", result=object()),  # becomes a FAILURE EncodeError reply
    Reply("id-1", FAILURE, "t"),  # no error type or message: sent as TaskError, ""
]


@pytest.mark.parametrize("reply", REPLIES)
def test_reply_schema_accepts_what_encode_reply_writes(reply: Reply) -> None:
    assert schema_errors(REPLY, loads(encode_reply(reply))) == []


@pytest.mark.parametrize(
    "obj",
    [
        {"id": "i", "task": "t", "status": "SUCCESS"},
        {"id": "i", "task": "t", "status": "FAILURE"},
        {"id": "i", "task": "t", "status": "PENDING", "result": 1},
        {"id": "i", "task": "t", "status": "SUCCESS", "result": 1, "error": None},
        {
            "id": "i",
            "task": "t",
            "status": "FAILURE",
            "result": 1,
            "error": {"type": "E", "message": "m", "traceback": None},
        },
        {"id": "i", "task": "t", "status": "FAILURE", "error": {"type": "E"}},
        {"id": "i", "status": "SUCCESS", "result": 1},
        {"id": "i", "task": "t", "status": "SUCCESS", "result": 1, "extra": True},
    ],
)
def test_reply_schema_refuses_malformed_replies(obj: dict[str, Any]) -> None:
    assert schema_errors(REPLY, obj)
