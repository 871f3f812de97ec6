"""Inspect and control a fleet of workers: the command and reply formats, and the client.

A command is published to the fanout exchange :data:`~amqptasks.topology.CONTROL_EXCHANGE`,
so every worker's exclusive control queue gets it; the workers it names in ``destination``
(all, when it names none) answer over direct reply-to with the command's correlation id.
The client waits until ``timeout`` or until every destination answered. ``docs/control.md``
is the human spec and ``schema/control-v1.json`` the machine one; the server side (what each
command does in a worker) is :mod:`amqptasks.worker.control`.

:data:`COMMANDS` is the registry of what exists, shared by the CLI, this client and the
server; a new command (``revoke``, ``rate-limit``...) is one :class:`CommandSpec` here and one
handler there.

The client publishes with the app's sync publisher, whose channel already consumes direct
reply-to for results; :meth:`Control.deliver` takes the replies whose correlation id it is
waiting for (the app offers it every reply before the results collector).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import BrokerError, DecodeError, UnroutableError
from .protocol import CONTENT_TYPE_JSON, Properties, dumps, loads, new_id
from .topology import CONTROL_EXCHANGE
from .transport.pika_publisher import REPLY_TO

if TYPE_CHECKING:
    from .app import App

__all__ = [
    "COMMANDS",
    "CONTROL_VERSION",
    "Command",
    "CommandSpec",
    "Control",
    "ControlReply",
    "check_arguments",
    "decode_command",
    "decode_reply",
    "encode_command",
    "encode_reply",
]

CONTROL_VERSION = 1
#: Correlation ids of control commands start with this (results use bare task ids).
_PREFIX = "control."


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """One command: its name, its group (``inspect`` reads, ``control`` acts) and its
    positional parameters (the last one takes one or more values when ``variadic``; those
    named in ``integers`` are whole numbers of at least 1, strings otherwise)."""

    name: str
    group: str
    summary: str
    params: tuple[str, ...] = ()
    variadic: bool = False
    integers: tuple[str, ...] = ()


COMMANDS: dict[str, CommandSpec] = {
    s.name: s
    for s in (
        CommandSpec("ping", "inspect", "every worker answers (name, pid, uptime)"),
        CommandSpec("active", "inspect", "tasks running now"),
        CommandSpec("reserved", "inspect", "tasks taken from the queue, waiting for a slot"),
        CommandSpec("stats", "inspect", "counters: processed by task and outcome, uptime, rusage"),
        CommandSpec("registered", "inspect", "task names with their delivery policies"),
        CommandSpec("conf", "inspect", "the worker's effective settings (passwords redacted)"),
        CommandSpec(
            "query-task", "inspect", "state of task ids on each worker", ("ids",), variadic=True
        ),
        CommandSpec("shutdown", "control", "warm shutdown (running tasks finish, the rest return)"),
        CommandSpec("add-consumer", "control", "start consuming a declared queue", ("queue",)),
        CommandSpec("cancel-consumer", "control", "stop consuming a queue", ("queue",)),
        CommandSpec("pool-grow", "control", "run N more tasks at once", ("n",), integers=("n",)),
        CommandSpec(
            "pool-shrink",
            "control",
            "run N fewer tasks at once (running tasks finish first)",
            ("n",),
            integers=("n",),
        ),
        CommandSpec(
            "autoscale",
            "control",
            "grow the pool with the backlog up to MAX, shrink it when idle down to MIN",
            ("max", "min"),
            integers=("max", "min"),
        ),
    )
}


def check_arguments(
    name: str, arguments: Mapping[str, Any] | Sequence[str] | None
) -> dict[str, Any]:
    """The arguments of command ``name`` as the wire carries them: from a mapping
    (``{"queue": "q"}``) or from positional strings (the CLI). Raises ``ValueError`` naming
    what is wrong."""
    spec = COMMANDS.get(name)
    if spec is None:
        raise ValueError(f"unknown command {name!r} (known: {', '.join(COMMANDS)})")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, Mapping):
        values = list(arguments)
        if spec.variadic:
            fixed = len(spec.params) - 1
            if len(values) <= fixed:
                raise ValueError(f"{name}: give at least one {spec.params[-1].rstrip('s')}")
            arguments = dict(zip(spec.params[:fixed], values[:fixed], strict=True))
            arguments[spec.params[-1]] = values[fixed:]
        else:
            if len(values) != len(spec.params):
                wanted = " ".join(p.upper() for p in spec.params) or "no arguments"
                raise ValueError(f"{name}: expected {wanted}, got {len(values)} value(s)")
            arguments = dict(zip(spec.params, values, strict=True))
        for key in spec.integers:  # the CLI's strings: whole numbers, or said to be wrong
            text = arguments[key]
            try:
                arguments[key] = int(text)
            except ValueError:
                raise ValueError(
                    f"{name}: {key.upper()} must be a whole number, got {text!r}"
                ) from None
    out: dict[str, Any] = {}
    for key, value in arguments.items():
        if key not in spec.params:
            raise ValueError(f"{name}: unknown argument {key!r}")
        if key in spec.integers:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"{name}: argument {key!r} must be a whole number of at least 1, got {value!r}"
                )
            out[key] = value
            continue
        last = spec.variadic and key == spec.params[-1]
        ok = (
            isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
            if last
            else isinstance(value, str) and bool(value)
        )
        if not ok:
            what = "a non-empty list of strings" if last else "a non-empty string"
            raise ValueError(f"{name}: argument {key!r} must be {what}")
        out[key] = value
    missing = [p for p in spec.params if p not in out]
    if missing:
        raise ValueError(f"{name}: missing argument(s) {', '.join(missing)}")
    return out


@dataclass(frozen=True, slots=True)
class Command:
    """A command as it travels (schema/control-v1.json ``$defs.command``)."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    #: Worker names that should answer; None: every worker.
    destination: tuple[str, ...] | None = None
    id: str = field(default_factory=lambda: _PREFIX + new_id())

    def addressed_to(self, hostname: str) -> bool:
        return self.destination is None or hostname in self.destination


def encode_command(cmd: Command) -> bytes:
    return dumps(
        {
            "v": CONTROL_VERSION,
            "id": cmd.id,
            "command": cmd.name,
            "arguments": cmd.arguments,
            "destination": list(cmd.destination) if cmd.destination is not None else None,
        }
    )


def decode_command(body: bytes) -> Command:
    """Raises :class:`DecodeError` naming the field; arguments are checked by the server
    (an unknown command must still get an answer saying so)."""
    obj = loads(body)
    if not isinstance(obj, dict):
        raise DecodeError("a control command must be a JSON object")
    if obj.get("v", CONTROL_VERSION) != CONTROL_VERSION:
        raise DecodeError(f"field 'v' must be {CONTROL_VERSION}")
    name = obj.get("command")
    if not isinstance(name, str) or not name:
        raise DecodeError("field 'command' must be a non-empty string")
    arguments = obj.get("arguments") or {}
    if not isinstance(arguments, dict):
        raise DecodeError("field 'arguments' must be a JSON object")
    destination = obj.get("destination")
    if destination is not None and (
        not isinstance(destination, list) or not all(isinstance(d, str) for d in destination)
    ):
        raise DecodeError("field 'destination' must be an array of worker names or null")
    cmd_id = obj.get("id")
    if not isinstance(cmd_id, str) or not cmd_id:
        raise DecodeError("field 'id' must be a non-empty string")
    return Command(name, arguments, tuple(destination) if destination is not None else None, cmd_id)


@dataclass(frozen=True, slots=True)
class ControlReply:
    """One worker's answer (schema/control-v1.json ``$defs.reply``)."""

    id: str
    command: str
    hostname: str
    pid: int
    ok: bool
    result: Any = None
    error_type: str | None = None
    error_message: str | None = None


def encode_reply(reply: ControlReply) -> bytes:
    obj: dict[str, Any] = {
        "v": CONTROL_VERSION,
        "id": reply.id,
        "command": reply.command,
        "hostname": reply.hostname,
        "pid": reply.pid,
        "ok": reply.ok,
    }
    if reply.ok:
        obj["result"] = reply.result
    else:
        obj["error"] = {
            "type": reply.error_type or "ControlError",
            "message": reply.error_message or "",
        }
    return dumps(obj)


def decode_reply(body: bytes) -> ControlReply:
    obj = loads(body)
    if not isinstance(obj, dict) or not isinstance(obj.get("ok"), bool):
        raise DecodeError("a control reply must be a JSON object with a boolean 'ok'")
    error = obj.get("error") or {}
    return ControlReply(
        id=str(obj.get("id", "")),
        command=str(obj.get("command", "")),
        hostname=str(obj.get("hostname", "")),
        pid=int(obj.get("pid") or 0),
        ok=obj["ok"],
        result=obj.get("result"),
        error_type=error.get("type") if isinstance(error, dict) else None,
        error_message=error.get("message") if isinstance(error, dict) else None,
    )


class _Waiting:
    __slots__ = ("cond", "replies")

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.replies: list[ControlReply] = []


class Control:
    """The fleet's remote control: ``app.control.ping()``, ``.inspect_active()``, ...

    Every method returns ``{worker name: ControlReply}`` for the workers that answered
    within ``timeout`` seconds (an empty dict when none did); with ``destination`` it
    returns as soon as every named worker answered.
    """

    def __init__(self, app: App) -> None:
        self.app = app
        self._waiting: dict[str, _Waiting] = {}
        self._lock = threading.Lock()

    def deliver(self, correlation_id: str | None, body: bytes) -> bool:
        """A direct reply-to message: True when it answered a command of ours."""
        if correlation_id is None or not correlation_id.startswith(_PREFIX):
            return False
        with self._lock:
            waiting = self._waiting.get(correlation_id)
        if waiting is None:
            return True  # a late answer to a command whose wait is over
        try:
            reply = decode_reply(body)
        except Exception as exc:
            reply = ControlReply(
                correlation_id, "", "?", 0, False, error_type="DecodeError", error_message=str(exc)
            )
        with waiting.cond:
            waiting.replies.append(reply)
            waiting.cond.notify_all()
        return True

    def broadcast(
        self,
        command: str,
        arguments: Mapping[str, Any] | Sequence[str] | None = None,
        *,
        destination: Sequence[str] | None = None,
        timeout: float = 1.0,
    ) -> dict[str, ControlReply]:
        """Send ``command`` and collect the answers (see the class docstring)."""
        cmd = Command(
            command,
            check_arguments(command, arguments),
            tuple(destination) if destination else None,
        )
        waiting = _Waiting()
        with self._lock:
            self._waiting[cmd.id] = waiting
        try:
            props = Properties(
                content_type=CONTENT_TYPE_JSON,
                message_id=cmd.id,
                correlation_id=cmd.id,
                reply_to=REPLY_TO,
                delivery_mode=1,
            )
            deadline = time.monotonic() + timeout
            try:
                self.app.publisher.publish(CONTROL_EXCHANGE, "", encode_command(cmd), props)
            except UnroutableError:
                return {}  # no control queue is bound: no worker is running
            except BrokerError as exc:
                if "NOT_FOUND" not in str(exc):
                    raise
                return {}  # the broker's 404: no worker (or topology apply) declared it yet
            wanted = set(cmd.destination or ())
            with waiting.cond:
                while True:
                    answered = {r.hostname for r in waiting.replies}
                    left = deadline - time.monotonic()
                    if (wanted and wanted <= answered) or left <= 0:
                        break
                    waiting.cond.wait(left)
                replies = list(waiting.replies)
        finally:
            with self._lock:
                self._waiting.pop(cmd.id, None)
        out: dict[str, ControlReply] = {}
        for r in replies:
            key = r.hostname if r.hostname not in out else f"{r.hostname} (pid {r.pid})"
            out[key] = r
        return out

    # -- inspect ----------------------------------------------------------------------------
    def ping(
        self, *, timeout: float = 1.0, destination: Sequence[str] | None = None
    ) -> dict[str, ControlReply]:
        return self.broadcast("ping", timeout=timeout, destination=destination)

    def inspect_active(
        self, *, timeout: float = 1.0, destination: Sequence[str] | None = None
    ) -> dict[str, ControlReply]:
        return self.broadcast("active", timeout=timeout, destination=destination)

    def inspect_reserved(
        self, *, timeout: float = 1.0, destination: Sequence[str] | None = None
    ) -> dict[str, ControlReply]:
        return self.broadcast("reserved", timeout=timeout, destination=destination)

    def inspect_stats(
        self, *, timeout: float = 1.0, destination: Sequence[str] | None = None
    ) -> dict[str, ControlReply]:
        return self.broadcast("stats", timeout=timeout, destination=destination)

    def inspect_registered(
        self, *, timeout: float = 1.0, destination: Sequence[str] | None = None
    ) -> dict[str, ControlReply]:
        return self.broadcast("registered", timeout=timeout, destination=destination)

    def inspect_conf(
        self, *, timeout: float = 1.0, destination: Sequence[str] | None = None
    ) -> dict[str, ControlReply]:
        return self.broadcast("conf", timeout=timeout, destination=destination)

    def inspect_query_task(
        self, *ids: str, timeout: float = 1.0, destination: Sequence[str] | None = None
    ) -> dict[str, ControlReply]:
        return self.broadcast(
            "query-task", {"ids": list(ids)}, timeout=timeout, destination=destination
        )

    # -- control ----------------------------------------------------------------------------
    def shutdown(
        self, *, timeout: float = 1.0, destination: Sequence[str] | None = None
    ) -> dict[str, ControlReply]:
        """Warm shutdown of the chosen workers (every worker without ``destination``)."""
        return self.broadcast("shutdown", timeout=timeout, destination=destination)

    def add_consumer(
        self, queue: str, *, timeout: float = 1.0, destination: Sequence[str] | None = None
    ) -> dict[str, ControlReply]:
        return self.broadcast(
            "add-consumer", {"queue": queue}, timeout=timeout, destination=destination
        )

    def cancel_consumer(
        self, queue: str, *, timeout: float = 1.0, destination: Sequence[str] | None = None
    ) -> dict[str, ControlReply]:
        return self.broadcast(
            "cancel-consumer", {"queue": queue}, timeout=timeout, destination=destination
        )

    def pool_grow(
        self, n: int = 1, *, timeout: float = 1.0, destination: Sequence[str] | None = None
    ) -> dict[str, ControlReply]:
        """Each chosen worker runs ``n`` more tasks at once (prefetch follows)."""
        return self.broadcast("pool-grow", {"n": n}, timeout=timeout, destination=destination)

    def pool_shrink(
        self, n: int = 1, *, timeout: float = 1.0, destination: Sequence[str] | None = None
    ) -> dict[str, ControlReply]:
        """Each chosen worker runs ``n`` fewer tasks at once; running tasks finish."""
        return self.broadcast("pool-shrink", {"n": n}, timeout=timeout, destination=destination)

    def autoscale(
        self,
        maximum: int,
        minimum: int,
        *,
        timeout: float = 1.0,
        destination: Sequence[str] | None = None,
    ) -> dict[str, ControlReply]:
        """Each chosen worker keeps its pool between ``minimum`` and ``maximum``, growing
        with the backlog and shrinking when idle."""
        return self.broadcast(
            "autoscale",
            {"max": maximum, "min": minimum},
            timeout=timeout,
            destination=destination,
        )
