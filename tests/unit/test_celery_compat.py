"""Celery protocol v2 ingest (amqptasks/celery_compat.py), without a broker.

The messages here have the exact shape Celery 5's ``as_task_v2`` writes (headers, properties,
``[args, kwargs, embed]``), as captured from a real Celery 5.7 producer; tests/e2e/
test_celery_ingest.py runs the same paths with an unmodified Celery against a real worker.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from amqptasks import celery_compat as cc
from amqptasks.config import Settings
from amqptasks.dlq import describe, replay_message
from amqptasks.errors import CeleryUnsupported, ConfigError, ContentTypeRefused, DecodeError
from amqptasks.protocol import (
    CONTENT_TYPE_JSON,
    CONTENT_TYPE_PICKLE,
    FAILURE,
    REPLY_FORMAT_HEADER,
    SUCCESS,
    Envelope,
    Properties,
    Reply,
    decode,
    encode,
)

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
REPLY_QUEUE = "cd6e0f05-0405-364e-bc36-f646aebe869b"


def _sig(task: str, *args: Any, options: dict[str, Any] | None = None, **extra: Any) -> dict:
    return {
        "task": task,
        "args": list(args),
        "kwargs": {},
        "options": options or {},
        "subtask_type": None,
        "immutable": False,
        **extra,
    }


def celery_message(
    task: str = "tasks.add",
    args: list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    embed: dict[str, Any] | None = None,
    *,
    task_id: str = "f0900add-a579-411c-b31a-58dea6438d31",
    content_type: str = "application/json",
    body: bytes | None = None,
    **headers: Any,
) -> tuple[bytes, Properties]:
    """What ``as_task_v2`` + kombu publish for ``task.apply_async(args, kwargs, ...)``."""
    h = {
        "lang": "py",
        "task": task,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": repr(tuple(args or ())),
        "kwargsrepr": repr(kwargs or {}),
        "origin": "gen3883@vm",
        "ignore_result": False,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    h.update(headers)
    full_embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    full_embed.update(embed or {})
    if body is None:
        body = json.dumps([args or [], kwargs or {}, full_embed]).encode()
    props = Properties(
        content_type=content_type,
        content_encoding="utf-8",
        correlation_id=task_id,
        reply_to=REPLY_QUEUE,
        priority=0,
        headers=h,
        delivery_mode=2,
    )
    return body, props


def _explode() -> None:
    raise AssertionError("a refused pickle body was unpickled")


class Bomb:
    """Unpickling one calls :func:`_explode`."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _explode, ()


def _decode(body: bytes, props: Properties, **kw: Any) -> Envelope:
    return cc.decode_any(body, props, now=NOW, **kw)


# -- recognising and decoding --------------------------------------------------------------------
def test_a_delay_call_decodes_into_the_same_envelope_an_amqptasks_message_would():
    body, props = celery_message(args=[2, 3], x_tenant="a")
    env = _decode(body, props)
    assert (env.task, env.id, env.args, env.kwargs, env.retries) == (
        "tasks.add",
        "f0900add-a579-411c-b31a-58dea6438d31",
        (2, 3),
        {},
        0,
    )
    assert env.reply_to == REPLY_QUEUE and env.correlation_id == env.id
    assert env.reply_format == "celery" and env.links == {}
    assert env.root_id == env.id and env.parent_id is None
    assert env.eta is None and env.expires is None
    assert env.time_limit is None and env.soft_time_limit is None
    # Celery's protocol headers are not application headers; a producer's own header is.
    assert env.headers == {"x_tenant": "a"}
    assert env.celery is not None and env.celery["headers"]["argsrepr"] == "(2, 3)"


def test_only_a_message_with_celery_task_and_id_headers_is_celerys():
    assert cc.is_celery(celery_message()[1])
    assert not cc.is_celery(Properties(headers={"task": "tasks.add"}))  # no id
    assert not cc.is_celery(Properties(headers={"tenant": "a"}))
    assert not cc.is_celery(Properties())
    ours = b'{"task": "examples.tasks.add", "args": [2, 3]}'
    assert cc.decode_any(ours, Properties()).reply_format == "amqptasks"


def test_timelimit_is_hard_then_soft_as_celerys_code_sends_it():
    # as_task_v2 writes 'timelimit': [time_limit, soft_time_limit]; the worker reads it back
    # as `time_limit, soft_time_limit = ...` (its documentation says the other order).
    env = _decode(*celery_message(timelimit=[10, 5]))
    assert (env.time_limit, env.soft_time_limit) == (10.0, 5.0)
    env = _decode(*celery_message(timelimit=[None, 2.5]))
    assert (env.time_limit, env.soft_time_limit) == (None, 2.5)


@pytest.mark.parametrize("bad", [[1], "10", [1, "2"], [-1, None], [True, None], {"hard": 1}])
def test_a_malformed_timelimit_is_a_decode_error_naming_the_header(bad):
    with pytest.raises(DecodeError, match=r"Celery header 'timelimit' must be \[hard, soft\]"):
        _decode(*celery_message(timelimit=bad))


def test_eta_and_expires_are_celerys_iso_times():
    eta = (NOW + timedelta(seconds=3)).isoformat()
    expires = (NOW + timedelta(seconds=60)).isoformat()
    env = _decode(*celery_message(eta=eta, expires=expires))
    assert env.eta == NOW + timedelta(seconds=3) and env.expires == NOW + timedelta(seconds=60)
    with pytest.raises(DecodeError, match="Celery header 'eta' is not an ISO 8601 time"):
        _decode(*celery_message(eta="tomorrow"))
    with pytest.raises(DecodeError, match="Celery header 'expires' must be an ISO 8601 time"):
        _decode(*celery_message(expires=60))


def test_retries_and_group_headers():
    env = _decode(*celery_message(retries=2, group="g-1", group_index=0))
    assert env.retries == 2 and env.links == {"group_id": "g-1"}
    with pytest.raises(DecodeError, match="Celery header 'retries' must be an integer >= 0"):
        _decode(*celery_message(retries=-1))


def test_ignore_result_means_no_reply_even_though_celery_always_sends_reply_to():
    env = _decode(*celery_message(ignore_result=True))
    assert env.reply_to is None
    assert _decode(*celery_message(ignore_result=None)).reply_to == REPLY_QUEUE


@pytest.mark.parametrize(
    "body, match",
    [
        (b'{"task": "tasks.add"}', r"must be \[args, kwargs, embed\], got dict"),
        (b"[[1], {}]", r"must be \[args, kwargs, embed\], got list of 2"),
        (b'[{"a": 1}, {}, null]', "args must be an array"),
        (b"[[1], [], null]", "kwargs must be an object"),
        (b"[[1], {}, []]", "embed must be an object"),
        (b"[[1], {}, nul", "not valid UTF-8 JSON"),
    ],
)
def test_a_malformed_celery_body_is_a_decode_error(body, match):
    with pytest.raises(DecodeError, match=match):
        _decode(*celery_message(body=body))


def test_pickle_stays_refused_and_is_never_unpickled():
    body, props = celery_message(
        body=pickle.dumps(((Bomb(),), {}, {})), content_type=CONTENT_TYPE_PICKLE
    )
    with pytest.raises(ContentTypeRefused, match="'application/x-python-serialize' is not"):
        _decode(body, props)
    # Only where a user listed pickle under serialization.accept, like amqptasks messages.
    body, props = celery_message(
        body=pickle.dumps(([2, 3], {}, None)), content_type=CONTENT_TYPE_PICKLE
    )
    env = _decode(body, props, accept=frozenset({CONTENT_TYPE_JSON, CONTENT_TYPE_PICKLE}))
    assert env.args == (2, 3)


def test_other_serializers_and_compression_are_refused_with_the_reason():
    with pytest.raises(ContentTypeRefused, match="task_serializer='json'"):
        _decode(*celery_message(content_type="application/x-msgpack", body=b"\x93"))
    with pytest.raises(CeleryUnsupported, match="compressed"):
        _decode(*celery_message(compression="application/x-gzip"))


def test_ingest_off_refuses_every_celery_message_and_names_the_switch():
    with pytest.raises(CeleryUnsupported, match=r"serialization.celery_ingest: false") as info:
        _decode(*celery_message(), celery_ingest=False)
    assert info.value.reason == "celery-unsupported"
    assert "tasks.add" in str(info.value)
    # amqptasks messages are not affected.
    assert _decode(b'{"task": "a"}', Properties(), celery_ingest=False).task == "a"


# -- embed -> workflow -----------------------------------------------------------------------
def test_celery_chain_is_stored_last_first_and_maps_to_our_chain_in_order():
    # (add.s(2, 2) | add.s(4) | add.s(8)).apply_async(), as captured
    step8 = _sig("tasks.add", 8, options={"task_id": "s3", "reply_to": REPLY_QUEUE})
    step4 = _sig("tasks.add", 4, options={"task_id": "s2", "reply_to": REPLY_QUEUE})
    env = _decode(*celery_message(args=[2, 2], embed={"chain": [step8, step4]}))
    assert env.links == {
        "chain": [
            {"task": "tasks.add", "args": [4], "options": {"task_id": "s2"}},
            {"task": "tasks.add", "args": [8], "options": {"task_id": "s3"}},
        ]
    }


def test_link_and_link_error_map_to_callbacks_and_errbacks():
    cb = _sig("tasks.add", 10)
    eb = {**_sig("tasks.on_error", 0, 0), "immutable": True}
    env = _decode(*celery_message(embed={"callbacks": [cb], "errbacks": [eb]}))
    assert env.links == {
        "callbacks": [{"task": "tasks.add", "args": [10]}],
        "errbacks": [{"task": "tasks.on_error", "args": [0, 0], "immutable": True}],
    }


def test_celery_chain_group_and_chord_nodes_map_to_ours():
    group = {
        "task": "celery.group",
        "args": [],
        "kwargs": {
            "tasks": [
                _sig("tasks.add", 1, options={"task_id": "m0", "group_index": 0}),
                _sig("tasks.add", 2, options={"task_id": "m1", "group_index": 1}),
            ]
        },
        "options": {"task_id": "g1", "root_id": None, "parent_id": None},
        "subtask_type": "group",
        "immutable": False,
    }
    chord = {
        "task": "celery.chord",
        "args": [],
        "kwargs": {"kwargs": {}, "header": group, "body": _sig("tasks.tsum")},
        "options": {"task_id": "c1"},
        "subtask_type": "chord",
        "immutable": False,
    }
    chain = {
        "task": "celery.chain",
        "args": [],
        "kwargs": {"tasks": [_sig("tasks.add", 2), _sig("tasks.add", 3)]},
        "options": {},
        "subtask_type": "chain",
        "immutable": False,
    }
    assert cc.node_from_celery(group) == {
        "group": [
            {"task": "tasks.add", "args": [1], "options": {"task_id": "m0"}},
            {"task": "tasks.add", "args": [2], "options": {"task_id": "m1"}},
        ],
        "id": "g1",
    }
    assert cc.node_from_celery(chord) == {
        "header": cc.node_from_celery(group)["group"],
        "body": {"task": "tasks.tsum"},
        "id": "c1",
    }
    assert cc.node_from_celery(chain) == {
        "chain": [{"task": "tasks.add", "args": [2]}, {"task": "tasks.add", "args": [3]}]
    }
    # A chord in the chain needs a result store to be counted in.
    body, props = celery_message(embed={"chain": [chord]})
    assert "chain" in _decode(body, props).links
    with pytest.raises(CeleryUnsupported, match=r"no result store .* rpc://"):
        _decode(body, props, chords=False)
    # So does a group followed by more in a chain (it runs as a chord).
    body, props = celery_message(embed={"chain": [_sig("tasks.tsum"), group]})
    with pytest.raises(CeleryUnsupported, match="chord"):
        _decode(body, props, chords=False)


def test_a_chord_member_maps_only_when_the_message_carries_the_chords_size():
    body_sig = _sig("tasks.tsum", options={"task_id": "b1", "reply_to": REPLY_QUEUE})
    msg = celery_message(embed={"chord": body_sig}, group="c-1", group_index=1)
    with pytest.raises(CeleryUnsupported, match="size is kept in Celery's result backend"):
        _decode(*msg)
    sized = celery_message(
        embed={"chord": {**body_sig, "chord_size": 2}}, group="c-1", group_index=1
    )
    assert _decode(*sized).links["chord"] == {
        "id": "c-1",
        "index": 1,
        "size": 2,
        "body": {"task": "tasks.tsum", "options": {"task_id": "b1"}},
    }
    with pytest.raises(CeleryUnsupported, match="no result store"):
        _decode(*sized, chords=False)


@pytest.mark.parametrize(
    "embed, match",
    [
        (
            {"chain": [_sig("tasks.add", 1, options={"time_limit": 9})]},
            r"embed.chain\[0\] \(tasks.add\): option\(s\) time_limit not supported",
        ),
        (
            {"callbacks": [{**_sig("tasks.add"), "subtask_type": "xmap"}]},
            r"embed.callbacks\[0\]: subtask_type 'xmap' has no amqptasks equivalent",
        ),
        (
            {
                "chain": [
                    {
                        "task": "celery.group",
                        "kwargs": {"tasks": []},
                        "options": {"countdown": 3},
                        "subtask_type": "group",
                    }
                ]
            },
            r"embed.chain\[0\]: group option\(s\) countdown not supported",
        ),
        ({"future": 1}, "embed field"),
    ],
)
def test_what_cannot_map_is_refused_naming_the_path(embed, match):
    with pytest.raises(CeleryUnsupported, match=match) as info:
        _decode(*celery_message(embed=embed))
    assert info.value.reason == "celery-unsupported"


def test_a_malformed_signature_is_a_decode_error_with_our_path():
    bad = {"chain": [_sig("tasks.add", options={"queue": 5})]}
    with pytest.raises(DecodeError, match=r"chain\[0\].options.queue' must be a string"):
        _decode(*celery_message(embed=bad))


# -- re-encoding a retry or delay copy ----------------------------------------------------------
def test_a_retry_copy_stays_a_celery_message_with_its_limits_and_workflow():
    step = _sig("tasks.add", 4, options={"task_id": "s2", "reply_to": REPLY_QUEUE})
    env = _decode(*celery_message(args=[2, 2], embed={"chain": [step]}, timelimit=[10, 5], t="x"))
    retried = replace(
        env,
        retries=1,
        eta=NOW + timedelta(seconds=3),
        headers={**env.headers, "x-amqptasks-first-failed-at": NOW.isoformat()},
    )
    body, props = cc.encode_any(retried)
    assert props.content_type == CONTENT_TYPE_JSON and props.delivery_mode == 2
    assert props.correlation_id == env.id and props.reply_to == REPLY_QUEUE
    assert props.headers is not None
    assert props.headers["retries"] == 1 and props.headers["timelimit"] == [10, 5]
    assert props.headers["argsrepr"] == "(2, 2)" and props.headers["t"] == "x"
    assert json.loads(body)[2]["chain"] == [step]  # the embed exactly as Celery sent it
    again = _decode(body, props)
    assert (again.id, again.args, again.retries, again.eta) == (env.id, (2, 2), 1, retried.eta)
    assert (again.time_limit, again.soft_time_limit, again.links) == (10.0, 5.0, env.links)
    assert again.headers == {"t": "x", "x-amqptasks-first-failed-at": NOW.isoformat()}


def test_encode_any_keeps_amqptasks_messages_ours():
    env = decode(b'{"task": "a", "id": "i", "args": [1]}', Properties())
    assert cc.encode_any(env) == encode(env)


# -- replies Celery's rpc backend reads -------------------------------------------------------
def test_success_reply_is_celerys_rpc_result_body():
    body = cc.encode_celery_reply(Reply("t1", SUCCESS, "tasks.add", result=5), date_done=NOW)
    assert json.loads(body) == {
        "task_id": "t1",
        "status": "SUCCESS",
        "result": 5,
        "traceback": None,
        "children": [],
        "date_done": NOW.isoformat(),
    }


def test_failure_reply_carries_celerys_exception_form():
    reply = Reply(
        "t1", FAILURE, "tasks.fail", error_type="ValueError", error_message="no", traceback="tb"
    )
    meta = json.loads(cc.encode_celery_reply(reply, exc_args=["no", 2]))
    assert meta["status"] == "FAILURE" and meta["traceback"] == "tb"
    assert meta["result"] == {
        "exc_type": "ValueError",
        "exc_message": ["no", 2],
        "exc_module": "builtins",
    }
    # A type known by name only: no module, so a Celery caller makes up a class of that name.
    named = Reply("t1", FAILURE, error_type="TaskNotRegistered", error_message="gone")
    assert json.loads(cc.encode_celery_reply(named))["result"] == {
        "exc_type": "TaskNotRegistered",
        "exc_message": ["gone"],
        "exc_module": None,
    }


def test_a_result_that_is_not_json_becomes_an_encode_error_failure():
    meta = json.loads(cc.encode_celery_reply(Reply("t1", SUCCESS, result=object())))
    assert meta["status"] == "FAILURE" and meta["result"]["exc_type"] == "EncodeError"


# -- ids, dead letters, replay ------------------------------------------------------------------
def test_a_celery_message_is_named_by_its_id_header_even_when_it_does_not_decode():
    body, props = celery_message(body=b"\x80not json")
    assert cc.message_id_of(body, props) == "f0900add-a579-411c-b31a-58dea6438d31"
    assert cc.message_id_of(b'{"task": "a", "id": "x"}', Properties()) == "x"


def test_dlq_names_a_celery_dead_letter_and_replay_resets_its_retries():
    body, props = celery_message(args=[1], retries=3)
    dl = replace(props, headers={**(props.headers or {}), "x-amqptasks-reason": "task-failed"})
    letter = describe(body, dl)
    assert (letter.task, letter.id, letter.reason) == (
        "tasks.add",
        props.correlation_id,
        "task-failed",
    )
    new_body, new_props = replay_message(body, dl, marker="m")
    assert new_body == body and new_props.reply_to is None
    assert new_props.headers is not None
    assert new_props.headers["retries"] == 0 and new_props.headers["task"] == "tasks.add"
    assert "x-amqptasks-reason" not in new_props.headers


# -- the reply-format header and the config switch ---------------------------------------------
def test_reply_format_header_of_workflow_steps():
    env = decode(b'{"task": "a"}', Properties(headers={REPLY_FORMAT_HEADER: "celery"}))
    assert env.reply_format == "celery"
    with pytest.raises(DecodeError, match=REPLY_FORMAT_HEADER):
        decode(b'{"task": "a"}', Properties(headers={REPLY_FORMAT_HEADER: "xml"}))


def test_celery_ingest_config_switch():
    assert Settings.from_mapping({}).celery_ingest is True
    off = Settings.from_mapping({"serialization": {"celery_ingest": False}})
    assert off.celery_ingest is False
    with pytest.raises(ConfigError, match=r"serialization.celery_ingest: expected true or false"):
        Settings.from_mapping({"serialization": {"celery_ingest": "no"}}, source="c.yaml")
