"""The inspect/control formats: arguments, command and reply bodies against the shipped
schema (schema/control-v1.json), and one registry shared by the CLI, the client and the
server. Real replies from real workers are validated in tests/e2e/test_inspect_control.py."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import jsonschema
import pytest
from click.testing import CliRunner

from amqptasks.cli import main
from amqptasks.control import (
    COMMANDS,
    Command,
    ControlReply,
    check_arguments,
    decode_command,
    decode_reply,
    encode_command,
    encode_reply,
)
from amqptasks.errors import DecodeError
from amqptasks.worker.control import HANDLERS

SCHEMA = json.loads(
    (resources.files("amqptasks") / "schema" / "control-v1.json").read_text(encoding="utf-8")
)
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def errors(obj: Any) -> list[str]:
    return [e.message for e in VALIDATOR.iter_errors(obj)]


def test_schema_is_valid_and_knows_every_command() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert set(SCHEMA["$defs"]["arguments"]) == set(COMMANDS)
    assert set(SCHEMA["$defs"]["results"]) == set(COMMANDS)


def test_every_command_has_a_handler_and_a_cli_subcommand() -> None:
    assert set(HANDLERS) == set(COMMANDS)
    runner = CliRunner()
    for group in ("inspect", "control"):
        out = runner.invoke(main, [group, "--help"]).output
        for spec in COMMANDS.values():
            assert (spec.name in out) == (spec.group == group), (group, spec.name)


def test_arguments_from_positionals_or_a_mapping() -> None:
    assert check_arguments("ping", []) == {}
    assert check_arguments("query-task", ["a", "b"]) == {"ids": ["a", "b"]}
    assert check_arguments("add-consumer", ["web_tasks"]) == {"queue": "web_tasks"}
    assert check_arguments("add-consumer", {"queue": "q"}) == {"queue": "q"}
    assert check_arguments("pool-grow", ["4"]) == {"n": 4}
    assert check_arguments("autoscale", ["6", "1"]) == {"max": 6, "min": 1}
    assert check_arguments("autoscale", {"max": 6, "min": 1}) == {"max": 6, "min": 1}
    for name, given, problem in [
        ("nope", [], "unknown command 'nope'"),
        ("query-task", [], "give at least one id"),
        ("add-consumer", [], "expected QUEUE, got 0 value"),
        ("ping", ["x"], "expected no arguments, got 1"),
        ("add-consumer", {"queue": ""}, "must be a non-empty string"),
        ("add-consumer", {"queue": "q", "extra": 1}, "unknown argument 'extra'"),
        ("query-task", {"ids": "a"}, "must be a non-empty list of strings"),
        ("cancel-consumer", {}, "missing argument(s) queue"),
        ("pool-grow", ["two"], "N must be a whole number, got 'two'"),
        ("pool-grow", {"n": 0}, "'n' must be a whole number of at least 1, got 0"),
        ("pool-shrink", {"n": "2"}, "'n' must be a whole number of at least 1, got '2'"),
        ("autoscale", {"max": 6, "min": True}, "'min' must be a whole number"),
        ("autoscale", ["6"], "expected MAX MIN, got 1 value"),
        ("time-limit", ["t", "30", "10"], "SOFT (30s) must be below HARD (10s)"),
        # The wire's mapping form too: the one check a worker runs on a command from any client.
        ("time-limit", {"task": "t", "soft": 30, "hard": 10}, "SOFT (30s) must be below HARD"),
    ]:
        with pytest.raises(ValueError) as err:
            check_arguments(name, given)
        assert problem in str(err.value)


#: A valid value for each kind of positional parameter (from the CLI's text).
SAMPLE = {"str": "x", "count": "3", "seconds": "2.5", "rate": "10/m"}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_encoded_commands_validate_and_decode_back(name: str) -> None:
    spec = COMMANDS[name]
    values = [SAMPLE[spec.kind(p)] for p in spec.params]
    if name == "time-limit":
        values[-1] = "5"  # SOFT must be below HARD
    cmd = Command(name, check_arguments(name, values), ("w1@host",))
    body = encode_command(cmd)
    assert errors(json.loads(body)) == []
    assert decode_command(body) == cmd


def test_a_bad_command_body_is_refused_by_both() -> None:
    for bad in (
        {"v": 1, "id": "c", "command": "add-consumer", "arguments": {}, "destination": None},
        {"v": 2, "id": "c", "command": "ping", "arguments": {}, "destination": None},
        {"v": 1, "id": "c", "command": "ping", "arguments": {}, "destination": "w1"},
    ):
        assert errors(bad), bad
    for body, problem in [
        (b"[]", "JSON object"),
        (b'{"v": 2, "id": "c", "command": "ping"}', "'v'"),
        (b'{"id": "c"}', "'command'"),
        (b'{"id": "c", "command": "ping", "destination": "w1"}', "'destination'"),
        (b'{"command": "ping"}', "'id'"),
    ]:
        with pytest.raises(DecodeError, match=problem):
            decode_command(body)


def test_replies_validate_ok_or_error_and_decode_back() -> None:
    ok = ControlReply("c", "ping", "w1@host", 12, True, {"pong": True, "uptime": 1.5})
    bad = ControlReply("c", "add-consumer", "w1@host", 12, False, None, "UnknownQueue", "no q")
    for reply in (ok, bad):
        body = encode_reply(reply)
        assert errors(json.loads(body)) == []
        assert decode_reply(body) == reply
    wrong = json.loads(encode_reply(ok))
    wrong["result"] = {"pong": "yes"}
    assert errors(wrong)
    missing = json.loads(encode_reply(bad))
    del missing["error"]
    assert errors(missing)


def test_revoke_rate_limit_and_time_limit_arguments_are_typed_on_the_wire() -> None:
    assert check_arguments("revoke", ["a", "b"], {"terminate": True, "expires": 60}) == {
        "ids": ["a", "b"],
        "terminate": True,
        "expires": 60.0,
    }
    assert check_arguments("revoke", {"ids": ["a"], "terminate": None}) == {"ids": ["a"]}
    assert check_arguments("rate-limit", ["t", "100/m"], {"scope": "fleet"}) == {
        "task": "t",
        "rate": "100/m",
        "scope": "fleet",
    }
    assert check_arguments("time-limit", ["t", "1.5", "0"]) == {
        "task": "t",
        "soft": 1.5,
        "hard": 0.0,
    }
    for name, given, problem in [
        ("revoke", {"ids": ["a"], "terminate": "yes"}, "'terminate' must be true or false"),
        ("revoke", {"ids": ["a"], "expires": "soon"}, "EXPIRES must be seconds, got 'soon'"),
        ("revoke", {"ids": ["a"], "expires": -1}, "'expires' must be a number of seconds >= 0"),
        ("rate-limit", ["t", "10/sec"], "RATE: expected a rate such as '10/s'"),
        ("rate-limit", {"task": "t", "rate": "1/s", "scope": "all"}, "one of worker, fleet"),
        ("time-limit", ["t", "soon", "2"], "SOFT must be seconds, got 'soon'"),
        ("time-limit", ["t", "1"], "expected TASK SOFT HARD, got 2 value(s)"),
    ]:
        with pytest.raises(ValueError) as err:
            check_arguments(name, given)
        assert problem in str(err.value), (name, given, str(err.value))
