"""The CLI's log formatting: JSON lines, and client-library records cut to one line per event.

The records are built the way pika and aiormq emit them (logger names, message templates,
exceptions attached), then passed through the real filter and formatters.
"""

from __future__ import annotations

import json
import logging
import sys

import pytest

from amqptasks.cli.logs import ClientNoise, JsonFormatter


def record(
    name: str,
    msg: str,
    *args: object,
    level: int = logging.ERROR,
    exc: BaseException | None = None,
    **extra: object,
) -> logging.LogRecord:
    exc_info = None
    if exc is not None:
        try:
            raise exc
        except BaseException:
            exc_info = sys.exc_info()
    r = logging.LogRecord(name, level, "x.py", 1, msg, args or None, exc_info)
    r.__dict__.update(extra)
    return r


def shown(noise: ClientNoise, r: logging.LogRecord) -> str | None:
    if not noise.filter(r):
        return None
    return logging.Formatter("%(levelname)s %(name)s: %(message)s").format(r)


class ConnectionClosed(Exception):  # aiormq's, by name and text
    pass


def test_aiormq_close_then_its_reader_dying_of_it_is_one_line() -> None:
    noise = ClientNoise()
    first = record(
        "aiormq.connection",
        'Unexpected connection close from remote "%s", Connection.Close(reply_code=%r, '
        "reply_text=%r)",
        "amqp://guest:******@localhost:5672/v",
        320,
        "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'",
    )
    second = record(
        "aiormq.connection",
        "Cancelling cause reader exited abnormally",
        level=logging.WARNING,
        exc=ConnectionClosed(
            "[Errno 320] CONNECTION_FORCED - broker forced connection closure with reason "
            "'shutdown'"
        ),
    )
    line = shown(noise, first)
    assert line is not None and "\n" not in line and "CONNECTION_FORCED" in line
    assert shown(noise, second) is None  # the same event, seen from the reader task


def test_a_client_traceback_becomes_one_line_with_the_exception() -> None:
    noise = ClientNoise()
    r = record(
        "aiormq.connection",
        "Cancelling cause reader exited abnormally",
        level=logging.WARNING,
        exc=ConnectionResetError(104, "Connection reset by peer"),
    )
    assert shown(noise, r) == (
        "WARNING aiormq.connection: Cancelling cause reader exited abnormally "
        "(ConnectionResetError: Connection reset by peer)"
    )
    assert r.exc_info is None and r.exc_text is None


@pytest.mark.parametrize(
    ("name", "msg", "args"),
    [
        # aiormq logs a failed connect, then raises it to transport/aio.py, which reports it.
        ("aiormq.connection", "error when creating transport: %r", (OSError(111, "refused"),)),
        # pika's I/O layer: socket reprs and stacks; the owning transport reports the loss.
        (
            "pika.adapters.utils.io_services_utils",
            "_AsyncBaseTransport._consume() failed, aborting connection: error=%r; sock=%s; "
            "Caller's stack:\n%s",
            (ConnectionResetError(104, "reset"), "<socket.socket fd=6, laddr=(...)>", "stack"),
        ),
        ("pika.adapters.base_connection", "connection_lost: %r", (OSError("lost"),)),
        ("pika.adapters.utils.io_services_utils", "Socket failed to connect: %s", ("<s>",)),
        # pika's guess at a wrong password: the transport reports the broker's ACCESS_REFUSED.
        (
            "pika.connection",
            "Connection closed while authenticating indicating a probable authentication error",
            (),
        ),
    ],
)
def test_restated_client_records_are_dropped(name: str, msg: str, args: tuple) -> None:
    assert shown(ClientNoise(), record(name, msg, *args)) is None


def test_other_client_records_stay_one_line_and_ours_are_untouched() -> None:
    noise = ClientNoise()
    blocked = record(
        "pika.connection",
        "Received %s from broker",
        "<Connection.Blocked(['reason=low on memory'])>",
        level=logging.WARNING,
    )
    assert shown(noise, blocked) == (
        "WARNING pika.connection: Received <Connection.Blocked(['reason=low on memory'])> "
        "from broker"
    )
    multi = record("asyncio", "Task exception was never retrieved\nfuture: <Task ...>")
    assert shown(noise, multi) == "ERROR asyncio: Task exception was never retrieved"
    ours = record("amqptasks.worker", "boom\nsecond line", exc=ValueError("x"))
    assert noise.filter(ours) and ours.exc_info is not None and ours.getMessage().count("\n")


def test_json_lines_carry_the_documented_fields() -> None:
    fmt = JsonFormatter()
    plain = json.loads(fmt.format(record("amqptasks.worker", "ready %s", "now", level=20)))
    assert plain.keys() == {"time", "level", "logger", "pid", "message"}
    assert plain["level"] == "INFO" and plain["message"] == "ready now"
    assert plain["logger"] == "amqptasks.worker" and isinstance(plain["pid"], int)
    assert plain["time"].endswith("Z") and "T" in plain["time"]
    task = json.loads(
        fmt.format(
            record(
                "amqptasks.worker",
                "task failed",
                exc=ZeroDivisionError("division by zero"),
                task_id="id-1",
                task_name="examples.tasks.x",
            )
        )
    )
    assert task["task_id"] == "id-1" and task["task_name"] == "examples.tasks.x"
    assert task["exc"].startswith("Traceback (most recent call last)")
    assert task["exc"].endswith("ZeroDivisionError: division by zero")
    line = fmt.format(record("amqptasks.worker", "two\nlines"))
    assert "\n" not in line and json.loads(line)["message"] == "two\nlines"


def test_printable_shows_control_characters_escaped():
    from amqptasks.cli.logs import printable

    evil = "boom\x1b]52;c;ZXZpbA==\x07 \x1b[2J\x9b31m\x7f"
    assert printable(evil) == "boom\\x1b]52;c;ZXZpbA==\\x07 \\x1b[2J\\x9b31m\\x7f"
    assert printable("a\nb\tc") == "a\\nb\tc"  # one line stays one line; tabs are harmless
    assert printable("Traceback\n  line\x1b[A", newlines=True) == "Traceback\n  line\\x1b[A"
    assert printable("plain ünïcode ✓") == "plain ünïcode ✓"
