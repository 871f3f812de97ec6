"""ResultMeta, the stored record: its JSON round trip, and schema/result-v1.json agreeing with it.

What ``to_json`` writes must pass the schema and read back equal; what the schema refuses
``from_json`` must refuse too (and say which record and field), so another language reading
a store can rely on the schema alone.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from importlib import resources
from typing import Any

import jsonschema
import pytest

from amqptasks.errors import TaskError
from amqptasks.results import remote_error
from amqptasks.results.meta import (
    FAILURE,
    PENDING,
    READY_STATES,
    RETRY,
    REVOKED,
    STARTED,
    STATES,
    SUCCESS,
    ResultMeta,
)

SCHEMA: dict[str, Any] = json.loads(
    (resources.files("amqptasks") / "schema" / "result-v1.json").read_text(encoding="utf-8")
)
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
WHEN = datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=timezone.utc)


def schema_errors(obj: object) -> list[str]:
    return [e.message for e in VALIDATOR.iter_errors(obj)]


def test_schema_is_valid_draft_2020_12_with_descriptions() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$id"] == "urn:amqptasks:schema:result-v1"
    assert SCHEMA["additionalProperties"] is False
    for name, prop in SCHEMA["properties"].items():
        assert prop.get("description"), f"property {name!r} has no description"


def test_schema_lists_exactly_the_fields_of_the_record() -> None:
    from dataclasses import fields

    assert set(SCHEMA["properties"]) == {f.name for f in fields(ResultMeta)}
    assert set(SCHEMA["properties"]["status"]["enum"]) == STATES - {PENDING}


def test_states() -> None:
    assert {SUCCESS, FAILURE, REVOKED} == READY_STATES
    assert {PENDING, STARTED, RETRY, SUCCESS, FAILURE, REVOKED} == STATES


RECORDS = [
    ResultMeta(id="a", status=STARTED),
    ResultMeta(id="a", status=STARTED, task="examples.tasks.add", worker="host-1", retries=2),
    ResultMeta(id="a", status=RETRY, retries=1, error_type="TimeoutError", error_message="t"),
    ResultMeta(id="a", status=SUCCESS),  # returned None: "result": null is written
    ResultMeta(id="a", status=SUCCESS, result=5, date_done=WHEN),
    ResultMeta(id="a", status=SUCCESS, result={"nested": [1, "two", None, 3.5, True]}),
    ResultMeta(id="a", status=SUCCESS, result="x", parent_id="p", root_id="r", group_id="g"),
    ResultMeta(id="a", status=SUCCESS, result=[], children=("c1", "c2")),
    ResultMeta(
        id="a",
        status=FAILURE,
        task="t",
        error_type="ZeroDivisionError",
        error_message="division by zero",
        traceback="Traceback (most recent call last): ...",
        date_done=WHEN,
    ),
    ResultMeta(id="a", status=FAILURE, error_type="TaskNotRegistered", reason="unknown-task"),
    ResultMeta(id="a", status=REVOKED, reason="revoked", date_done=WHEN),
    ResultMeta(id="ünïcode-id", status=SUCCESS, result="ünïcode"),
]


@pytest.mark.parametrize("meta", RECORDS)
def test_records_round_trip_and_match_the_schema(meta: ResultMeta) -> None:
    raw = meta.to_json()
    obj = json.loads(raw)
    assert schema_errors(obj) == []
    assert ResultMeta.from_json(raw) == meta
    assert obj == meta.to_dict()


def test_only_what_is_set_is_written() -> None:
    assert ResultMeta(id="a", status=STARTED).to_dict() == {"id": "a", "status": "STARTED"}
    assert ResultMeta(id="a", status=SUCCESS).to_dict() == {
        "id": "a",
        "status": "SUCCESS",
        "result": None,
    }
    assert ResultMeta(id="a", status=REVOKED, date_done=WHEN).to_dict() == {
        "id": "a",
        "status": "REVOKED",
        "date_done": "2030-01-02T03:04:05.123456+00:00",
    }


def test_date_done_is_kept_in_utc() -> None:
    paris = WHEN.astimezone(timezone(timedelta(hours=1)))
    meta = ResultMeta(id="a", status=SUCCESS, date_done=paris)
    assert meta.date_done == WHEN and meta.date_done.tzinfo == timezone.utc
    assert meta.to_dict()["date_done"].endswith("+00:00")


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"id": "", "status": SUCCESS}, "'id' must be a non-empty string"),
        ({"id": "a", "status": PENDING}, "'status' must be one of"),
        ({"id": "a", "status": "DONE"}, "'status' must be one of"),
        ({"id": "a", "status": SUCCESS, "retries": -1}, "'retries' must be a non-negative"),
        ({"id": "a", "status": SUCCESS, "date_done": datetime(2030, 1, 1)}, "timezone-aware"),
    ],
)
def test_invalid_records_cannot_be_built(fields: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        ResultMeta(**fields)


def test_a_result_that_is_not_json_is_refused_naming_the_record() -> None:
    with pytest.raises(ValueError, match=r"record 'a': result of type set is not JSON"):
        ResultMeta(id="a", status=SUCCESS, result={1, 2}).to_json()


BAD_RECORDS: list[Any] = [
    [],
    "a",
    None,
    {},
    {"id": "a"},
    {"status": "SUCCESS", "result": 1},
    {"id": "", "status": "STARTED"},
    {"id": 5, "status": "STARTED"},
    {"id": "a", "status": "PENDING"},
    {"id": "a", "status": "success", "result": 1},
    {"id": "a", "status": "SUCCESS"},  # a SUCCESS must carry its result
    {"id": "a", "status": "STARTED", "colour": "red"},
    {"id": "a", "status": "STARTED", "task": None},
    {"id": "a", "status": "STARTED", "task": 5},
    {"id": "a", "status": "FAILURE", "error_type": ["E"]},
    {"id": "a", "status": "STARTED", "retries": -1},
    {"id": "a", "status": "STARTED", "retries": 1.5},
    {"id": "a", "status": "STARTED", "retries": "1"},
    {"id": "a", "status": "STARTED", "retries": True},
    {"id": "a", "status": "STARTED", "date_done": "2030-01-02T03:04:05"},  # no offset
    {"id": "a", "status": "STARTED", "date_done": "yesterday"},
    {"id": "a", "status": "STARTED", "date_done": 1700000000},
    {"id": "a", "status": "STARTED", "date_done": "2030-13-02T03:04:05Z"},
    {"id": "a", "status": "STARTED", "children": "c1"},
    {"id": "a", "status": "STARTED", "children": [1]},
    {"id": "a", "status": "STARTED", "worker": {"host": "h"}},
]


@pytest.mark.parametrize("obj", BAD_RECORDS)
def test_bad_records_fail_both_schema_and_decoder(obj: Any) -> None:
    assert schema_errors(obj), "the schema accepted it"
    with pytest.raises(ValueError):
        ResultMeta.from_json(json.dumps(obj))


def test_decoder_errors_name_the_record_and_field() -> None:
    with pytest.raises(ValueError, match=r"result record 'id-7': 'retries' must be an integer"):
        ResultMeta.from_json(b'{"id": "id-7", "status": "STARTED", "retries": "x"}')
    with pytest.raises(ValueError, match=r"result record 'id-7': unknown field\(s\) 'colour'"):
        ResultMeta.from_json(b'{"id": "id-7", "status": "STARTED", "colour": 1}')
    with pytest.raises(ValueError, match="not valid JSON"):
        ResultMeta.from_json(b"{nope")


def test_a_stored_failure_raises_the_same_error_as_a_replied_one() -> None:
    meta = ResultMeta(
        id="a", status=FAILURE, error_type="KeyError", error_message="'k'", traceback="tb"
    )
    err = remote_error(meta)
    assert isinstance(err, KeyError) and isinstance(err, TaskError)
    assert (err.exc_type, err.message, err.remote_traceback) == ("KeyError", "'k'", "tb")


def test_an_encoded_success_is_the_record_to_json_would_write():
    from amqptasks.results import ResultMeta, encode_success

    for extra in ({}, {"parent_id": "p", "root_id": "r", "group_id": "g", "retries": 2}):
        rec = encode_success("id1", {"a": [1, 2]}, task="t.add", worker="w@h", **extra)
        back = ResultMeta.from_json(rec.to_json())
        assert (rec.id, rec.status) == ("id1", "SUCCESS")
        built = ResultMeta(
            id="id1",
            status="SUCCESS",
            task="t.add",
            worker="w@h",
            result={"a": [1, 2]},
            date_done=back.date_done,
            **extra,
        )
        assert back == built and back.date_done is not None
        assert back.date_done.tzinfo is not None


def test_an_encoded_success_refuses_a_result_json_cannot_carry():
    from amqptasks.results import encode_success

    with pytest.raises(TypeError):
        encode_success("id1", object(), task="t", worker="w")
