"""Logging for every ``amqptasks`` command: one setup, text or JSON lines, quiet client libraries.

``-l/--loglevel`` and ``--log-format text|json`` are accepted by the ``amqptasks`` group (for
every command) and by the commands that log (worker, beat, send, topology); a command's own
option wins. What a person reads as a console line (the worker's banner, ``ready: consuming``,
``error: ...``) goes through :func:`echo`, so with ``--log-format json`` every line on stderr
is one JSON object.

``amqptasks worker -f/--logfile PATH`` (:func:`log_to_file`) sends all of it — banner too — to
a file instead, in the same format; ``error:`` lines are also shown on stderr, so a worker
that cannot start says why where it was started. The file is opened for appending and
never rotated here: use logrotate's ``copytruncate`` (appends continue at the new end), or
run under systemd and let its journal keep stderr.

Client libraries (pika, aiormq, aio-pika, asyncio) log at WARNING unless ``-l debug``, and then
one line per event (:class:`ClientNoise`): their tracebacks for a lost connection used to fill
the screen, and what they say is either reported by amqptasks itself in its own words or
worth one line, not forty.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import wraps
from typing import Any, TypeVar

import click

__all__ = [
    "CLIENT_LOGGERS",
    "FORMATS",
    "LEVELS",
    "ClientNoise",
    "JsonFormatter",
    "echo",
    "log_options",
    "log_to_file",
    "printable",
    "setup",
]

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("text", "json")
CLIENT_LOGGERS = ("pika", "aiormq", "aio_pika", "asyncio")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Client-library records that restate an error the library raises to amqptasks, which reports
#: it itself (naming the broker, password hidden): shown only with ``-l debug``.
RESTATED = frozenset(
    {
        # aiormq logs a failed connect, then raises it; transport/aio.py reports
        # "cannot connect to broker ..." (or keeps retrying within the publish timeout).
        ("aiormq.connection", "error when creating transport: %r"),
        # A channel closed by the broker (404, 406...) fails what was waiting on it; the owner
        # reports that error. The record itself carries the channel's and socket's reprs.
        ("pika.channel", "Received remote Channel.Close (%s): %r on %s"),
        # pika guesses at a connection closed during its handshake, then raises the guess
        # (ProbableAuthenticationError...): the transport reports the broker's own reason
        # ("refused the connection: ACCESS_REFUSED - Login was refused ...") in one line.
        ("pika.connection", "Probably incompatible Protocol Versions"),
        (
            "pika.connection",
            "Connection closed while authenticating indicating a probable authentication error",
        ),
        (
            "pika.connection",
            "Connection closed while tuning the connection indicating a probable permission "
            "error when accessing a virtual host",
        ),
    }
)
#: pika's I/O layer (sockets, transports, the connection workflow): every failure there reaches
#: the transport module that owns the connection as an error or a close callback, and each
#: reports it in one line ("connection to the broker lost (...)"); the records themselves carry
#: socket reprs and stacks.
PIKA_IO = "pika.adapters"

_SOCKET = re.compile(r"<socket\.socket [^>]*>")
_ERRNO = re.compile(r"^\[Errno [^\]]*\]\s*")

F = TypeVar("F", bound=Callable[..., Any])


def _library(name: str) -> str | None:
    for lib in CLIENT_LOGGERS:
        if name == lib or name.startswith(lib + "."):
            return lib
    return None


class ClientNoise(logging.Filter):
    """One line per event from the client libraries (installed unless ``-l debug``).

    * a record restating an error amqptasks reports itself is dropped (:data:`RESTATED`,
      pika's I/O layer below CRITICAL);
    * every other record becomes one line: the first line of its message, socket reprs
      elided, its exception as ``(Type: text)`` instead of a traceback;
    * a record whose exception repeats what the previous record of the same library said
      within two seconds is the same event seen from another layer (aiormq reports a
      broker's Connection.Close, then its reader task dying of it): dropped.
    """

    def __init__(self) -> None:
        super().__init__()
        self._last: tuple[str, str, float] = ("", "", 0.0)

    def filter(self, record: logging.LogRecord) -> bool:
        lib = _library(record.name)
        if lib is None:
            return True
        if (record.name, record.msg) in RESTATED:
            return False
        if record.name.startswith(PIKA_IO) and record.levelno < logging.CRITICAL:
            return False
        text = _SOCKET.sub("<socket>", record.getMessage()).strip()
        text = text.splitlines()[0].rstrip("; ") if text else ""
        text = text.removesuffix("; Caller's stack:").removesuffix("Caller's stack:").rstrip("; ")
        exc = record.exc_info[1] if record.exc_info else None
        now = time.monotonic()
        if exc is not None:
            said = _ERRNO.sub("", str(exc)).strip()
            last_lib, last_text, last_time = self._last
            if said and last_lib == lib and now - last_time < 2.0 and said in last_text:
                return False
            detail = f"{type(exc).__name__}: {said}" if said else type(exc).__name__
            if detail not in text:
                text = f"{text} ({detail})"
        record.msg, record.args = text, None
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        self._last = (lib, text, now)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (RFC 3339, UTC), ``level``, ``logger``, ``pid``,
    ``message``; ``task_id`` / ``task_name`` when the record carries them (the worker logs a
    task's lines with ``extra=``), ``exc`` with the formatted traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, timezone.utc)
        out: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key in ("task_id", "task_name"):
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class _State:
    format = "text"
    level = "INFO"
    handler: logging.Handler | None = None
    #: The log file's handler (``-f/--logfile``), when logs go to a file.
    logfile: logging.FileHandler | None = None


_state = _State()


def setup(level: str = "INFO", fmt: str = "text", logfile: str | None = None) -> None:
    """(Re)configure logging for this process: one stderr handler (or ``logfile``'s) in
    ``fmt``, the root logger at ``level``, client libraries at WARNING (one line per event)
    unless ``level`` is DEBUG. Called again by a command with its own options, it replaces
    the previous setup. Raises ``OSError`` when ``logfile`` cannot be opened."""
    level = level.upper()
    root = logging.getLogger()
    if _state.handler is not None:
        root.removeHandler(_state.handler)
    if _state.logfile is not None:
        _state.logfile.close()
        _state.logfile = None
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    if logfile is not None:
        handler = _state.logfile = logging.FileHandler(logfile, mode="a", encoding="utf-8")
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    debug = level == "DEBUG"
    if not debug:
        handler.addFilter(ClientNoise())
    root.addHandler(handler)
    root.setLevel(level)
    for name in CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
    logging.captureWarnings(True)
    _state.format, _state.level, _state.handler = fmt, level, handler


def log_to_file(path: str) -> None:
    """From now on write every log line and console line to ``path`` (appending), with the
    current level and format. Raises ``OSError`` when it cannot be opened."""
    setup(_state.level, _state.format, logfile=path)


def echo(text: str, *, level: int = logging.INFO) -> None:
    """A line for a person on stderr (banner, state changes, ``error: ...``): plain text, or
    with ``--log-format json`` a JSON record of logger ``amqptasks.cli`` — shown at any
    ``--loglevel``, like the plain line."""
    if _state.format == "json" and _state.handler is not None:
        record = logging.LogRecord("amqptasks.cli", level, __file__, 0, text, None, None)
        _state.handler.handle(record)
    elif _state.logfile is not None:
        _state.logfile.acquire()
        try:
            stream = _state.logfile.stream
            if stream is not None:
                stream.write(text + "\n")
                stream.flush()
        finally:
            _state.logfile.release()
    else:
        click.echo(text, err=True)
    if _state.logfile is not None and level >= logging.ERROR:
        click.echo(text, err=True)  # also where the worker was started: why it stopped


def debug_traceback(exc: BaseException) -> None:
    """With ``-l debug``, the full traceback of an error the CLI reports in one line."""
    log = logging.getLogger("amqptasks.cli")
    if log.isEnabledFor(logging.DEBUG):
        log.debug("traceback of the error above", exc_info=exc)


def _group_params() -> dict[str, Any]:
    ctx = click.get_current_context(silent=True)
    return dict(ctx.find_root().params) if ctx is not None else {}


def log_options(fn: F) -> F:
    """Add ``-l/--loglevel`` and ``--log-format`` to a command and set logging up before it
    runs (falling back to the ``amqptasks`` group's options, then INFO / text)."""

    @wraps(fn)
    def wrapper(*args: Any, loglevel: str | None, log_format: str | None, **kwargs: Any) -> Any:
        group = _group_params()
        setup(
            loglevel or group.get("loglevel") or "INFO",
            log_format or group.get("log_format") or "text",
        )
        return fn(*args, **kwargs)

    wrapper = click.option(
        "--log-format",
        type=click.Choice(FORMATS),
        default=None,
        help="text (default) or json: one JSON object per line on stderr.",
    )(wrapper)
    wrapper = click.option(
        "-l",
        "--loglevel",
        type=click.Choice(LEVELS, case_sensitive=False),
        default=None,
        help="DEBUG shows the client libraries (pika, aio-pika) and full tracebacks "
        "(default: INFO).",
    )(wrapper)
    return wrapper  # type: ignore[return-value]


#: Control characters (C0 but tab and newline, DEL, C1): what a terminal would act on.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str, *, newlines: bool = False) -> str:
    """``text`` safe to print on an operator's terminal: task names, ids, exception messages
    and tracebacks come from messages anyone with publish rights may have written, and an
    escape sequence in them (ESC, OSC 52 clipboard writes, cursor moves) would act on the
    terminal. Each control character is shown as ``\\xNN``; newlines too unless
    ``newlines`` (a traceback keeps its lines)."""
    out = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return out if newlines else out.replace("\n", "\\n")
