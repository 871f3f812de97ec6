"""The wire format: decode, encode, replies and dead-letter headers (docs/protocol.md)."""

from __future__ import annotations

import pickle
import re
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from amqptasks.errors import ContentTypeRefused, DecodeError, EncodeError, ProtocolError
from amqptasks.protocol import (
    CONTENT_TYPE_JSON,
    CONTENT_TYPE_PICKLE,
    DEAD_LETTER_REASONS,
    DL_PREFIX,
    FAILURE,
    SUCCESS,
    TRACEBACK_LIMIT,
    Envelope,
    Properties,
    Reply,
    dead_letter_properties,
    decode,
    decode_reply,
    dumps,
    encode,
    encode_reply,
    loads,
    message_id_of,
    parse_time,
)

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
MINIMAL = b'{"task": "examples.tasks.add", "args": [2, 3]}'
NO_PROPS = Properties()
WITH_PICKLE = frozenset({CONTENT_TYPE_JSON, CONTENT_TYPE_PICKLE})


def body(**fields: object) -> bytes:
    return dumps({"task": "t", **fields})


# -- decode: the minimal message and defaults ---------------------------------------------------
def test_minimal_message_without_properties_decodes_with_defaults() -> None:
    env = decode(MINIMAL, NO_PROPS, now=NOW)

    assert env.task == "examples.tasks.add"
    assert env.args == (2, 3)
    assert isinstance(env.args, tuple)
    assert env.kwargs == {}
    assert env.retries == 0
    assert (env.eta, env.expires, env.root_id, env.parent_id) == (None, None, None, None)
    assert env.links == {}
    assert (env.correlation_id, env.reply_to, env.priority) == (None, None, None)
    assert env.headers == {}
    assert uuid.UUID(env.id).version == 7


def test_generated_ids_are_unique() -> None:
    assert decode(MINIMAL, NO_PROPS).id != decode(MINIMAL, NO_PROPS).id


def test_task_alone_is_enough() -> None:
    env = decode(b'{"task": "t"}', NO_PROPS)
    assert (env.task, env.args, env.kwargs) == ("t", (), {})


@pytest.mark.parametrize(
    ("fields", "message_id", "expected"),
    [
        ({"id": "from-body"}, "from-props", "from-body"),
        ({}, "from-props", "from-props"),
        ({"id": None}, "from-props", "from-props"),
        ({"id": ""}, "from-props", "from-props"),
        ({"id": "from-body"}, None, "from-body"),
    ],
)
def test_id_precedence_body_then_message_id(
    fields: dict[str, object], message_id: str | None, expected: str
) -> None:
    assert decode(body(**fields), Properties(message_id=message_id)).id == expected


@pytest.mark.parametrize("message_id", [None, ""])
def test_id_is_generated_when_neither_body_nor_properties_give_one(message_id: str | None) -> None:
    env = decode(body(), Properties(message_id=message_id))
    assert uuid.UUID(env.id).version == 7


def test_amqp_properties_are_carried_on_the_envelope() -> None:
    headers = {"x-trace": "abc"}
    props = Properties(correlation_id="c-1", reply_to="replies", priority=7, headers=headers)
    env = decode(body(), props)

    assert (env.correlation_id, env.reply_to, env.priority) == ("c-1", "replies", 7)
    assert env.headers == headers
    assert env.headers is not headers


def test_optional_fields_are_read() -> None:
    env = decode(
        body(
            v=1,
            kwargs={"x": 1},
            retries=3,
            expires="2030-01-02T04:00:00Z",
            root_id="r",
            parent_id="p",
        ),
        NO_PROPS,
        now=NOW,
    )
    assert env.kwargs == {"x": 1}
    assert env.retries == 3
    assert env.expires == datetime(2030, 1, 2, 4, 0, tzinfo=timezone.utc)
    assert (env.root_id, env.parent_id) == ("r", "p")


@pytest.mark.parametrize(
    "key",
    [
        "id",
        "eta",
        "countdown",
        "expires",
        "root_id",
        "parent_id",
        "callbacks",
        "errbacks",
        "chain",
        "chord",
        "group_id",
    ],
)
def test_null_optional_field_counts_as_absent(key: str) -> None:
    props = Properties(message_id="m")
    assert decode(body(**{key: None}), props, now=NOW) == decode(body(), props, now=NOW)


def test_countdown_is_relative_to_the_injected_clock() -> None:
    env = decode(body(countdown=90), NO_PROPS, now=NOW)
    assert env.eta == NOW + timedelta(seconds=90)


def test_eta_and_null_countdown_together_are_fine() -> None:
    env = decode(body(eta="2030-01-02T03:05:00+00:00", countdown=None), NO_PROPS, now=NOW)
    assert env.eta == datetime(2030, 1, 2, 3, 5, tzinfo=timezone.utc)


def test_workflow_links_are_kept_for_the_worker() -> None:
    chord = {"id": "c", "index": 0, "size": 1, "body": {"task": "z"}}
    links = {"callbacks": [{"task": "a"}], "errbacks": [], "chain": [{"task": "b"}], "chord": chord}
    env = decode(body(**links), NO_PROPS)
    assert env.links == links


def test_expiry_compares_with_the_given_time() -> None:
    env = decode(body(expires="2030-01-02T03:04:05Z"), NO_PROPS, now=NOW)
    assert env.is_expired(NOW)
    assert not env.is_expired(NOW - timedelta(microseconds=1))
    assert not decode(body(), NO_PROPS).is_expired(NOW)


# -- parse_time ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2030-01-02T03:04:05Z", NOW),
        ("2030-01-02T03:04:05+00:00", NOW),
        ("2030-01-02T05:04:05+02:00", NOW),
        ("2030-01-02T03:04:05", NOW),  # naive means UTC
        ("2030-01-02T03:04:05.250Z", NOW + timedelta(milliseconds=250)),
        (0, NOW),
        (1.5, NOW + timedelta(seconds=1.5)),
        (-60, NOW - timedelta(minutes=1)),
    ],
)
def test_parse_time(value: object, expected: datetime) -> None:
    parsed = parse_time(value, "eta", NOW)
    assert parsed == expected
    assert parsed.tzinfo is not None


# parse_time has its own RFC 3339 parser: datetime.fromisoformat accepts only 3 or 6 fraction
# digits and no 'Z' on Python 3.10, and many non-RFC 3339 forms on 3.11+.
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2030-01-02T03:04:05.1Z", NOW + timedelta(microseconds=100_000)),
        ("2030-01-02T03:04:05.12345Z", NOW + timedelta(microseconds=123_450)),
        ("2030-01-02T03:04:05.1234569Z", NOW + timedelta(microseconds=123_456)),  # truncated
        ("2030-01-02T03:04:05.000000000001Z", NOW),
        ("2030-01-02 03:04:05Z", NOW),
        ("2030-01-02t03:04:05Z", NOW),
        ("2030-01-02 03:04:05", NOW),
        ("2030-01-02T08:34:05+05:30", NOW),
        ("2030-01-01T19:04:05-08:00", NOW),
        ("2030-01-02T03:04:05-00:00", NOW),
        ("2030-01-03T03:03:05.5+23:59", NOW + timedelta(milliseconds=500)),
    ],
)
def test_parse_time_reads_rfc_3339_the_same_on_every_python(value: str, expected: datetime) -> None:
    parsed = parse_time(value, "eta", NOW)
    assert parsed == expected
    assert parsed.tzinfo is not None


@pytest.mark.parametrize(
    "value",
    [
        "2030-01-02",  # a date alone: the schema requires a date-time
        "2030-01-02T03:04",
        "2030-01-02T03:04:05+0100",
        "2030-01-02T03:04:05+01",
        "2030-01-02T03:04:05+01:00:30",
        "2030-01-02T03:04:05+24:00",
        "2030-01-02T03:04:05.Z",
        "2030-01-02T03:04:05,5Z",
        "2030-01-02T03:04:05z",  # the schema allows only an upper-case Z
        "20300102T030405Z",
        "2030-W01-2T03:04:05Z",
        "2030-02-29T00:00:00Z",  # not a leap year
        "2030-01-02T03:04:60Z",
        "0000-01-02T03:04:05Z",
        "2030-01-02T03:04:05Z\n",
        " 2030-01-02T03:04:05Z",
        "\u0662\u0660\u0663\u0660-01-02T03:04:05Z",
        "",
    ],
)
def test_parse_time_refuses_what_is_not_an_rfc_3339_date_time(value: str) -> None:
    with pytest.raises(DecodeError, match=r"field 'eta' is not an ISO 8601 time"):
        parse_time(value, "eta", NOW)


@pytest.mark.parametrize(
    ("value", "name"),
    [([1], "array"), ({"s": 1}, "object"), (None, "null"), (True, "boolean"), (False, "boolean")],
)
def test_parse_time_errors_use_json_type_names(value: object, name: str) -> None:
    with pytest.raises(DecodeError) as info:
        parse_time(value, "expires", NOW)
    assert str(info.value) == (f"field 'expires' must be an ISO 8601 time or seconds, got {name}")


@pytest.mark.parametrize("value", [1e12, -1e12, 1e20, 10**30, float("inf"), float("nan")])
def test_parse_time_refuses_out_of_range_and_non_finite_seconds(value: float) -> None:
    with pytest.raises(DecodeError, match="field 'eta'"):
        parse_time(value, "eta", NOW)


# -- decode: every error names the field --------------------------------------------------------
BAD_BODIES = [
    # (body, text the error must contain)
    (b'{"args": [1]}', "'task'"),
    (b'{"task": ""}', "'task'"),
    (b'{"task": 5}', "'task'"),
    (b'{"task": null}', "'task'"),
    (body(args="1, 2"), "'args'"),
    (body(args={"x": 1}), "'args'"),
    (body(args=None), "'args'"),
    (body(kwargs=[1]), "'kwargs'"),
    (body(kwargs="x=1"), "'kwargs'"),
    (body(kwargs=None), "'kwargs'"),
    (body(retries=-1), "'retries'"),
    (body(retries="1"), "'retries'"),
    (body(retries=1.5), "'retries'"),
    (body(retries=True), "'retries'"),
    (body(retries=None), "'retries'"),
    (body(colour="red"), "'colour'"),
    (body(v=2), "'v'"),
    (body(v="1"), "'v'"),
    (body(id=5), "'id'"),
    (body(root_id=5), "'root_id'"),
    (body(parent_id=["p"]), "'parent_id'"),
    (body(eta="2030-01-01T00:00:00Z", countdown=5), "'eta' and 'countdown'"),
    (body(eta=1, countdown=5), "'eta' and 'countdown'"),
    (body(eta="tomorrow"), "'eta'"),
    (body(eta="2030-02-30T00:00:00Z"), "'eta'"),
    (body(eta="2030-01-01T25:00:00Z"), "'eta'"),
    (body(eta=True), "'eta'"),
    (body(eta=[2030, 1, 1]), "'eta'"),
    (body(countdown="10"), "'countdown'"),
    (body(countdown=True), "'countdown'"),
    (body(expires="soon"), "'expires'"),
    (body(expires={"seconds": 5}), "'expires'"),
    (body(callbacks={"task": "a"}), "'callbacks'"),
    (body(errbacks="a"), "'errbacks'"),
    (body(chain=1), "'chain'"),
    (body(chord=[]), "'chord'"),
    (body(chain=[{"task": "a"}, {"tsk": "b"}]), "'chain[1]'"),
    (
        body(callbacks=[{"task": "a", "options": {"link": [{"task": 3}]}}]),
        "'callbacks[0].options.link[0].task'",
    ),
    (body(chord={"id": "c", "index": 5, "size": 2, "body": {"task": "b"}}), "'chord.index'"),
    (body(group_id=""), "'group_id'"),
]


@pytest.mark.parametrize(("raw", "names"), BAD_BODIES)
def test_decode_error_names_the_field(raw: bytes, names: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(raw, NO_PROPS, now=NOW)
    assert names in str(info.value)
    assert info.value.reason == "decode-error"
    assert isinstance(info.value, ProtocolError)


def test_unknown_fields_are_all_named_sorted() -> None:
    with pytest.raises(DecodeError, match=r"unknown field\(s\) 'a', 'b'"):
        decode(body(b=1, a=2), NO_PROPS)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"[1, 2]", "JSON object, got array"),
        (b'"examples.tasks.add"', "JSON object, got string"),
        (b"42", "JSON object, got number"),
        (b"null", "JSON object, got null"),
        (b"true", "JSON object, got boolean"),
    ],
)
def test_body_must_be_an_object(raw: bytes, expected: str) -> None:
    with pytest.raises(DecodeError, match=expected):
        decode(raw, NO_PROPS)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"task": "caf\xe9"}',  # Latin-1, not UTF-8
        b'{"task": "t", "args": [1, 2}',
        b'{"task": "t",}',
        b"{'task': 't'}",
        b'{"task": "t", "args": [NaN]}',
        b"",
    ],
)
def test_invalid_utf8_or_json_is_a_decode_error(raw: bytes) -> None:
    with pytest.raises(DecodeError, match="not valid UTF-8 JSON"):
        decode(raw, NO_PROPS)


def test_wrong_version_says_which_version_the_worker_speaks() -> None:
    with pytest.raises(DecodeError, match="speaks version 1"):
        decode(body(v=2), NO_PROPS)


def test_boolean_version_is_refused() -> None:
    with pytest.raises(DecodeError, match="'v'"):
        decode(body(v=True), NO_PROPS)


@pytest.mark.parametrize("fields", [{"eta": 1e12}, {"countdown": 1e20}, {"expires": 1e12}])
def test_out_of_range_relative_time_is_a_decode_error(fields: dict[str, object]) -> None:
    with pytest.raises(DecodeError):
        decode(body(**fields), NO_PROPS, now=NOW)


@pytest.mark.parametrize("key", ["eta", "countdown", "expires"])
def test_out_of_range_relative_time_error_names_the_field(key: str) -> None:
    with pytest.raises(DecodeError, match=f"^field '{key}' is out of range$"):
        decode(body(**{key: 1e20}), NO_PROPS, now=NOW)


@pytest.mark.parametrize(("value", "expected"), [(1.0, 1), (0.0, 0), (3.0, 3)])
def test_integral_float_retries_are_read_as_integers(value: float, expected: int) -> None:
    env = decode(body(retries=value), NO_PROPS)
    assert env.retries == expected
    assert type(env.retries) is int


# -- content types ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "application/json",
        "Application/JSON ",
        "application/json; charset=utf-8",
        "text/json",
    ],
)
def test_json_content_types(content_type: str | None) -> None:
    env = decode(MINIMAL, Properties(content_type=content_type))
    assert env.args == (2, 3)


# Only the media type (before ';') selects the decoder: case, whitespace and parameters aside.
@pytest.mark.parametrize(
    "content_type",
    [
        "application/json;charset=utf-8",
        "application/json ; charset=UTF-8",
        "APPLICATION/JSON;CHARSET=utf-8",
        "\tapplication/json\t;\tcharset=utf-8 ",
        "application/json;",
        "text/json; charset=utf-8",
        "application/json; charset=utf-8; extra=1",
    ],
)
def test_json_content_types_with_parameters(content_type: str) -> None:
    env = decode(MINIMAL, Properties(content_type=content_type))
    assert env.args == (2, 3)


@pytest.mark.parametrize(
    "content_type",
    ["application/jsonx", "application/json-patch+json", "application/x-json", "charset=utf-8"],
)
def test_similar_media_types_are_still_refused(content_type: str) -> None:
    with pytest.raises(ContentTypeRefused, match="accepted: application/json"):
        decode(MINIMAL, Properties(content_type=content_type))


def test_pickle_media_type_with_parameters_is_still_refused_by_default() -> None:
    raw = pickle.dumps({"task": "t"})
    props = Properties(content_type=CONTENT_TYPE_PICKLE + "; protocol=5")
    with pytest.raises(ContentTypeRefused, match=CONTENT_TYPE_PICKLE):
        decode(raw, props)
    assert decode(raw, props, accept=WITH_PICKLE).task == "t"


SIDE_EFFECTS: list[str] = []


def _record(what: str) -> str:
    SIDE_EFFECTS.append(what)
    return what


class _RunsCodeWhenUnpickled:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_record, ("unpickled",))


def test_pickle_is_refused_by_default_and_never_loaded() -> None:
    SIDE_EFFECTS.clear()
    raw = pickle.dumps(_RunsCodeWhenUnpickled())

    with pytest.raises(ContentTypeRefused) as info:
        decode(raw, Properties(content_type=CONTENT_TYPE_PICKLE))

    assert CONTENT_TYPE_PICKLE in str(info.value)
    assert info.value.reason == "content-type-refused"
    assert SIDE_EFFECTS == []


def test_pickle_is_accepted_when_listed_and_that_runs_the_senders_code() -> None:
    env = decode(
        pickle.dumps({"task": "t", "args": [1]}),
        Properties(content_type=CONTENT_TYPE_PICKLE),
        accept=WITH_PICKLE,
    )
    assert env.args == (1,)

    SIDE_EFFECTS.clear()
    with pytest.raises(DecodeError, match="JSON object, got string"):
        decode(
            pickle.dumps(_RunsCodeWhenUnpickled()),
            Properties(content_type=CONTENT_TYPE_PICKLE),
            accept=WITH_PICKLE,
        )
    assert SIDE_EFFECTS == ["unpickled"]  # why it is off unless a user turns it on


def test_corrupt_pickle_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="pickle"):
        decode(b"not a pickle", Properties(content_type=CONTENT_TYPE_PICKLE), accept=WITH_PICKLE)


@pytest.mark.parametrize("content_type", ["application/msgpack", "text/plain", "application/xml"])
def test_other_content_types_are_refused(content_type: str) -> None:
    with pytest.raises(ContentTypeRefused, match="accepted: application/json"):
        decode(MINIMAL, Properties(content_type=content_type))


def test_json_is_refused_when_not_accepted() -> None:
    with pytest.raises(ContentTypeRefused, match="application/json"):
        decode(MINIMAL, NO_PROPS, accept=frozenset({CONTENT_TYPE_PICKLE}))


# -- encode -------------------------------------------------------------------------------------
def test_encode_writes_the_minimal_form_and_persistent_json_properties() -> None:
    raw, props = encode(Envelope(task="examples.tasks.add", id="id-1", args=(2, 3)))

    assert loads(raw) == {"task": "examples.tasks.add", "id": "id-1", "args": [2, 3]}
    assert props.content_type == CONTENT_TYPE_JSON
    assert props.content_encoding == "utf-8"
    assert props.message_id == "id-1"
    assert props.correlation_id == "id-1"
    assert props.delivery_mode == 2
    assert props.headers is None
    assert props.reply_to is None


def test_encode_decode_round_trip_keeps_every_field() -> None:
    original = Envelope(
        task="examples.tasks.reduce",
        id="id-2",
        args=(1, "x", [1, 2], {"a": None}, 2.5, True),
        kwargs={"op": "mul", "nested": {"k": [1]}},
        retries=2,
        eta=NOW + timedelta(hours=1),
        expires=datetime(2030, 1, 2, 5, 0, tzinfo=timezone(timedelta(hours=1))),
        root_id="root",
        parent_id="parent",
        links={
            "callbacks": [{"task": "cb"}],
            "chord": {"id": "c", "index": 0, "size": 1, "body": {"task": "b"}},
        },
        correlation_id="corr",
        reply_to="amq.rabbitmq.reply-to",
        priority=5,
        headers={"x-trace": "t-1"},
    )
    raw, props = encode(original)

    assert decode(raw, props, now=NOW) == original


@pytest.mark.parametrize(
    ("when", "written"),
    [
        (NOW, "2030-01-02T03:04:05+00:00"),
        (NOW.astimezone(timezone(timedelta(hours=5, minutes=30))), "2030-01-02T08:34:05+05:30"),
        (NOW.astimezone(timezone(timedelta(minutes=19, seconds=32))), "2030-01-02T03:04:05+00:00"),
        (datetime(2030, 1, 2, 3, 4, 5, 250000), "2030-01-02T03:04:05.250000"),  # naive: UTC
    ],
)
def test_encode_writes_times_parse_time_reads_back(when: datetime, written: str) -> None:
    raw, props = encode(Envelope(task="t", eta=when))
    assert loads(raw)["eta"] == written
    assert parse_time(written, "eta") == (
        when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    )
    assert decode(raw, props, now=NOW).eta == parse_time(written, "eta")


@pytest.mark.parametrize("bad", [object(), {1, 2}, b"bytes", 2**64, complex(1, 2)])
def test_encode_refuses_arguments_json_cannot_carry(bad: object) -> None:
    with pytest.raises(EncodeError, match="'t' arguments are not JSON-serialisable") as info:
        encode(Envelope(task="t", args=(bad,)))
    assert info.value.reason == "encode-error"


def test_encode_refuses_non_serialisable_kwargs() -> None:
    with pytest.raises(EncodeError):
        encode(Envelope(task="t", kwargs={"when": object()}))


# -- replies ------------------------------------------------------------------------------------
@pytest.mark.parametrize("result", [5, None, "text", [1, {"a": 2.5}], {"nested": [True, None]}])
def test_success_reply_round_trip(result: object) -> None:
    raw = encode_reply(Reply("id-1", SUCCESS, "examples.tasks.add", result=result))

    assert loads(raw) == {
        "id": "id-1",
        "task": "examples.tasks.add",
        "status": SUCCESS,
        "result": result,
    }
    assert decode_reply(raw) == Reply("id-1", SUCCESS, "examples.tasks.add", result=result)


def test_failure_reply_round_trip() -> None:
    reply = Reply(
        "id-1",
        FAILURE,
        "examples.tasks.add",
        error_type="ZeroDivisionError",
        error_message="division by zero",
        traceback="Traceback (most recent call last):\n  ...",
    )
    raw = encode_reply(reply)

    assert loads(raw) == {
        "id": "id-1",
        "task": "examples.tasks.add",
        "status": FAILURE,
        "error": {
            "type": "ZeroDivisionError",
            "message": "division by zero",
            "traceback": "Traceback (most recent call last):\n  ...",
        },
    }
    assert decode_reply(raw) == reply


def test_non_serialisable_result_becomes_an_encode_error_failure() -> None:
    raw = encode_reply(Reply("id-1", SUCCESS, "t", result={1, 2}))
    obj = loads(raw)

    assert obj["status"] == FAILURE
    assert (obj["id"], obj["task"]) == ("id-1", "t")
    assert "result" not in obj
    assert obj["error"]["type"] == "EncodeError"
    assert "set" in obj["error"]["message"]
    assert obj["error"]["traceback"] is None
    reply = decode_reply(raw)
    assert (reply.status, reply.error_type) == (FAILURE, "EncodeError")


def test_failure_without_error_type_or_message_is_sent_as_task_error() -> None:
    raw = encode_reply(Reply("id-1", FAILURE, "t"))

    assert loads(raw)["error"] == {"type": "TaskError", "message": "", "traceback": None}
    reply = decode_reply(raw)
    assert (reply.status, reply.error_type, reply.error_message) == (FAILURE, "TaskError", "")


# -- dumps --------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_dumps_writes_non_finite_floats_as_null_as_documented(value: float) -> None:
    assert dumps({"x": value}) == b'{"x":null}'


@pytest.mark.parametrize(
    "raw",
    [
        b"[]",
        b'{"id": "i"}',
        b'{"id": "i", "status": "PENDING"}',
        b'{"id": "i", "status": "FAILURE", "error": "boom"}',
        b"not json",
    ],
)
def test_malformed_replies_are_decode_errors(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_reply(raw)


# -- dead-letter properties ---------------------------------------------------------------------
ORIGINAL = Properties(
    content_type="application/json",
    content_encoding="utf-8",
    message_id="id-1",
    correlation_id="corr-1",
    reply_to="amq.rabbitmq.reply-to.abc",
    priority=3,
    headers={"x-trace": "t-1", "x-tenant": 42},
    delivery_mode=1,
    timestamp=datetime(2030, 1, 1, tzinfo=timezone.utc),
)


def dead_letter(props: Properties = ORIGINAL, **overrides: object) -> Properties:
    kwargs: dict[str, object] = {
        "reason": "task-failed",
        "detail": "ZeroDivisionError: division by zero",
        "queue": "default",
        "exchange": "tasks",
        "routing_key": "task.add",
        "hostname": "amqptasks@host-1",
        "failed_at": NOW,
    }
    kwargs.update(overrides)
    return dead_letter_properties(props, **kwargs)  # type: ignore[arg-type]


def test_dead_letter_properties_keep_the_original_and_add_the_documented_headers() -> None:
    props = dead_letter(
        exc_type="ZeroDivisionError",
        exc_message="division by zero",
        traceback="Traceback ...",
        attempts=3,
    )
    headers = props.headers
    assert headers is not None

    assert headers["x-trace"] == "t-1"
    assert headers["x-tenant"] == 42
    assert {k: v for k, v in headers.items() if k.startswith(DL_PREFIX)} == {
        "x-amqptasks-reason": "task-failed",
        "x-amqptasks-detail": "ZeroDivisionError: division by zero",
        "x-amqptasks-queue": "default",
        "x-amqptasks-original-exchange": "tasks",
        "x-amqptasks-original-routing-key": "task.add",
        "x-amqptasks-worker": "amqptasks@host-1",
        "x-amqptasks-attempts": 3,
        "x-amqptasks-first-failed-at": NOW.isoformat(),
        "x-amqptasks-last-failed-at": NOW.isoformat(),
        "x-amqptasks-exception-type": "ZeroDivisionError",
        "x-amqptasks-exception-message": "division by zero",
        "x-amqptasks-traceback": "Traceback ...",
    }
    assert props.delivery_mode == 2
    for name in (
        "content_type",
        "content_encoding",
        "message_id",
        "correlation_id",
        "reply_to",
        "priority",
        "timestamp",
    ):
        assert getattr(props, name) == getattr(ORIGINAL, name)
    assert ORIGINAL.headers == {"x-trace": "t-1", "x-tenant": 42}  # input left untouched


def test_dead_letter_without_exception_has_no_exception_headers() -> None:
    headers = dead_letter(Properties(), reason="unknown-task", detail="not registered").headers
    assert headers is not None
    assert headers[DL_PREFIX + "reason"] == "unknown-task"
    assert headers[DL_PREFIX + "attempts"] == 1
    for absent in ("exception-type", "exception-message", "traceback"):
        assert DL_PREFIX + absent not in headers


def test_dead_letter_bounds_traceback_detail_and_message() -> None:
    long_tb = "T" * TRACEBACK_LIMIT + "the end"
    long_text = "start" + "D" * (2 * TRACEBACK_LIMIT)
    headers = dead_letter(
        detail=long_text, exc_type="E", exc_message=long_text, traceback=long_tb
    ).headers
    assert headers is not None

    traceback = headers[DL_PREFIX + "traceback"]
    assert len(traceback) == TRACEBACK_LIMIT
    assert traceback.endswith("the end")  # the last frames are the useful ones
    for key in ("detail", "exception-message"):
        assert len(headers[DL_PREFIX + key]) == TRACEBACK_LIMIT
        assert headers[DL_PREFIX + key].startswith("start")


def test_second_failure_keeps_first_failed_at() -> None:
    first = dead_letter(failed_at=NOW)
    later = NOW + timedelta(days=1)
    second = dead_letter(first, failed_at=later, attempts=2, reason="expired")
    headers = second.headers
    assert headers is not None

    assert headers[DL_PREFIX + "first-failed-at"] == NOW.isoformat()
    assert headers[DL_PREFIX + "last-failed-at"] == later.isoformat()
    assert headers[DL_PREFIX + "reason"] == "expired"
    assert headers[DL_PREFIX + "attempts"] == 2
    assert headers["x-trace"] == "t-1"


def test_dead_letter_copy_carries_the_id_the_worker_gave_a_message_without_one() -> None:
    assert dead_letter(Properties(), message_id="generated-1").message_id == "generated-1"
    # A producer's message_id is never replaced (the body id wins in decode() anyway).
    assert dead_letter(Properties(message_id="mine"), message_id="other").message_id == "mine"
    assert dead_letter(Properties()).message_id is None


def test_message_id_of_follows_decode() -> None:
    cases = [
        (b'{"task": "t", "id": "b"}', Properties(message_id="p"), "b"),
        (b'{"task": "t", "id": ""}', Properties(message_id="p"), "p"),
        (b'{"task": "t", "id": 7}', Properties(message_id="p"), "p"),
        (b"[1, 2]", Properties(message_id="p"), "p"),
        (b"\xff", Properties(), None),
        (b'{"task": "t"}', Properties(message_id=""), None),
    ]
    for raw, props, expected in cases:
        assert message_id_of(raw, props) == expected, raw
        try:
            decoded = decode(raw, props).id
        except DecodeError:
            continue
        if expected is not None:
            assert decoded == expected


# -- docs/protocol.md describes this module -----------------------------------------------------
PROTOCOL_DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def test_doc_lists_exactly_the_dead_letter_headers_written() -> None:
    headers = dead_letter(exc_type="E", exc_message="m", traceback="tb").headers
    assert headers is not None
    written = {k for k in headers if k.startswith(DL_PREFIX)}
    documented = set(re.findall(r"`(x-amqptasks-[a-z-]+)`", PROTOCOL_DOC.read_text("utf-8")))
    from amqptasks.dlq import REPLAY_HEADER  # written by `amqptasks dlq replay`, not a worker

    assert REPLAY_HEADER in documented
    assert documented - {REPLAY_HEADER} == written


def _doc_reasons() -> dict[str, str]:
    """The reason table of section 8: token -> its ``dlq replay`` column."""
    text = PROTOCOL_DOC.read_text("utf-8")
    table = text[text.index("| `x-amqptasks-reason` | When | `dlq replay` |") :]
    table = table[: table.index("\n\n")].split("\n", 2)[2]  # the rows, below the header
    rows = re.findall(r"^\| `([a-z:<>-]+)` \| .+? \| (.+?) \|$", table, re.M)
    return dict(rows)


def _worker_reasons() -> set[str]:
    """Every reason token the worker may write: the worker's settlement refuses any reason
    outside ``DEAD_LETTER_REASONS``, and the decoder's error reasons are in it."""
    assert {DecodeError.reason, ContentTypeRefused.reason} <= DEAD_LETTER_REASONS
    return set(DEAD_LETTER_REASONS)


def test_doc_lists_every_reason_the_worker_writes_in_one_table() -> None:
    documented = _doc_reasons()
    written = _worker_reasons()
    assert len(written) >= 9, written  # the scan still finds them
    assert set(documented) - {"broker:<reason>"} == written
    text = PROTOCOL_DOC.read_text("utf-8")
    assert MINIMAL.decode() in text
    # The other docs point at this table instead of keeping a list of their own.
    reliability = (PROTOCOL_DOC.parent / "reliability.md").read_text("utf-8")
    assert "protocol.md#reasons" in reliability and "| `task-failed`" not in reliability


def test_doc_replay_column_is_what_dlq_replay_does() -> None:
    from amqptasks.dlq import REPLAY_SKIPPED

    skipped = {r for r, what in _doc_reasons().items() if what.startswith("skipped")}
    assert skipped == set(REPLAY_SKIPPED)


def test_new_ids_are_distinct_version7_uuids_across_threads() -> None:
    import threading

    from amqptasks.protocol import new_id

    seen: list[str] = []
    lock = threading.Lock()

    def draw() -> None:
        mine = [new_id() for _ in range(3_000)]  # crosses many 256-id refills
        with lock:
            seen.extend(mine)

    threads = [threading.Thread(target=draw) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == len(seen) == 12_000
    for text in seen[:50] + seen[-50:]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122


def test_new_ids_are_time_ordered_and_carry_the_millisecond_they_were_made() -> None:
    import time

    from amqptasks.protocol import new_id

    before = time.time_ns() // 1_000_000
    first = new_id()
    time.sleep(0.002)  # the order holds across milliseconds (within one, the bits are random)
    second = new_id()
    after = time.time_ns() // 1_000_000
    stamp = uuid.UUID(first).int >> 80  # the top 48 bits: Unix time in ms
    assert before <= stamp <= after
    assert first < second  # as text too: what a store's index sorts by


def test_a_forked_child_does_not_reuse_the_parents_ids() -> None:
    import os

    from amqptasks.protocol import new_id

    new_id()  # the parent now holds a buffer of 255 unused ids
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        os.write(write, ",".join(new_id() for _ in range(10)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        child = set(f.read().split(","))
    os.waitpid(pid, 0)
    parent = {new_id() for _ in range(10)}
    assert len(child) == 10
    assert not child & parent
