"""Inspect and control a fleet of workers: the command and reply formats, and the client.

A command is published to the fanout exchange :data:`~amqptasks.topology.CONTROL_EXCHANGE`,
so every worker's exclusive control queue gets it; the workers it names in ``destination``
(all, when it names none) answer over direct reply-to with the command's correlation id.
The client waits until ``timeout`` or until every destination answered. ``docs/control.md``
is the human spec and ``schema/control-v1.json`` the machine one; the server side (what each
command does in a worker) is :mod:`amqptasks.worker.control`.

:data:`COMMANDS` is the registry of what exists, shared by the CLI, this client and the
server; a new command is one :class:`CommandSpec` here and one handler there.

``revoke`` is the one command with a client side: :meth:`Control.revoke` first appends the
revocation to the broker's revocations stream (:mod:`amqptasks.revocation`), confirmed, so
that it holds for workers that are down or not started yet, and only then tells the running
workers (who also follow the stream).

The client publishes with the app's sync publisher, whose channel already consumes direct
reply-to for results; :meth:`Control.deliver` takes the replies whose correlation id it is
waiting for (the app offers it every reply before the results collector).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import MAX_REVOKE_EXPIRES
from .errors import BrokerError, DecodeError, UnroutableError
from .protocol import CONTENT_TYPE_JSON, Properties, dumps, loads, new_id
from .rate import SCOPES, parse_rate
from .revocation import encode_revocation
from .topology import CONTROL_EXCHANGE, REVOCATIONS_QUEUE
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
    "Option",
    "check_arguments",
    "decode_command",
    "decode_reply",
    "encode_command",
    "encode_reply",
]

CONTROL_VERSION = 1
#: Correlation ids of control commands start with this (results use bare task ids).
_PREFIX = "control."


#: How a value is read and checked: a non-empty string; seconds (a finite number >= 0; from
#: the CLI's text too); a rate (``10/s``, ``100/m``, ``2/h``, ``0``); a boolean flag; one of
#: a few words.
KINDS = ("str", "seconds", "rate", "flag", "choice")


@dataclass(frozen=True, slots=True)
class Option:
    """A named argument a command may be given (the CLI's ``--name``); left out when unset."""

    name: str
    kind: str
    help: str
    choices: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """One command: its name, its group (``inspect`` reads, ``control`` acts), its
    positional parameters (the last one takes one or more values when ``variadic``), how
    each is read (``kinds``: ``(param, kind)`` pairs, kind ``str`` when not named, ``count`` a
    whole number of at least 1, ``seconds``, ``rate``) and its named ``options``. ``stored``
    commands keep their effect in the broker, so no worker answering is not a failure
    (``revoke``)."""

    name: str
    group: str
    summary: str
    params: tuple[str, ...] = ()
    variadic: bool = False
    kinds: tuple[tuple[str, str], ...] = ()
    options: tuple[Option, ...] = ()
    stored: bool = False

    def kind(self, param: str) -> str:
        for name, kind in self.kinds:
            if name == param:
                return kind
        for option in self.options:
            if option.name == param:
                return option.kind
        return "str"


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
        CommandSpec(
            "pool-grow", "control", "run N more tasks at once", ("n",), kinds=(("n", "count"),)
        ),
        CommandSpec(
            "pool-shrink",
            "control",
            "run N fewer tasks at once (running tasks finish first)",
            ("n",),
            kinds=(("n", "count"),),
        ),
        CommandSpec(
            "autoscale",
            "control",
            "grow the pool with the backlog up to MAX, shrink it when idle down to MIN",
            ("max", "min"),
            kinds=(("max", "count"), ("min", "count")),
        ),
        CommandSpec(
            "revoke",
            "control",
            "revoked ids never start on any worker until the revocation expires",
            ("ids",),
            variadic=True,
            options=(
                Option(
                    "terminate",
                    "flag",
                    "Also stop the task where it runs now (processes: the child is killed; "
                    "async def: cancelled; threads: TaskRevoked at its next bytecode).",
                ),
                Option(
                    "expires",
                    "seconds",
                    "Seconds the revocation holds (default: revoke.expires in the config).",
                ),
            ),
            stored=True,
        ),
        CommandSpec(
            "rate-limit",
            "control",
            "set a task's rate limit (10/s, 100/m, 2/h; 0 for none)",
            ("task", "rate"),
            kinds=(("rate", "rate"),),
            options=(
                Option(
                    "scope",
                    "choice",
                    "worker: each worker on its own (default); fleet: all workers together.",
                    SCOPES,
                ),
            ),
        ),
        CommandSpec(
            "time-limit",
            "control",
            "set a task's soft and hard time limits in seconds (0 for none)",
            ("task", "soft", "hard"),
            kinds=(("soft", "seconds"), ("hard", "seconds")),
        ),
    )
}


def _value(name: str, key: str, kind: str, value: Any, choices: tuple[str, ...]) -> Any:
    """``value`` checked (and read, when it is the CLI's text) as ``kind``."""
    if kind == "flag":
        if not isinstance(value, bool):
            raise ValueError(f"{name}: argument {key!r} must be true or false")
        return value
    if kind == "count":  # the CLI's text was read in check_arguments: the wire has integers
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"{name}: argument {key!r} must be a whole number of at least 1, got {value!r}"
            )
        return value
    if kind == "seconds":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{name}: {key.upper()} must be seconds, got {value!r}") from None
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(f"{name}: argument {key!r} must be a number of seconds >= 0")
        return float(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name}: argument {key!r} must be a non-empty string")
    if kind == "rate":
        try:
            parse_rate(value)
        except ValueError as exc:
            raise ValueError(f"{name}: {key.upper()}: {exc}") from None
    if kind == "choice" and value not in choices:
        raise ValueError(f"{name}: argument {key!r} must be one of {', '.join(choices)}")
    return value


def check_arguments(
    name: str,
    arguments: Mapping[str, Any] | Sequence[str] | None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The arguments of command ``name`` as the wire carries them: from a mapping
    (``{"queue": "q"}``) or from positional strings (the CLI) plus named ``options`` (unset
    ones as None). Raises ``ValueError`` naming what is wrong."""
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
        for key, text in list(arguments.items()):
            if spec.kind(key) == "count":  # the CLI's strings: whole numbers, or said to be wrong
                try:
                    arguments[key] = int(text)
                except ValueError:
                    raise ValueError(
                        f"{name}: {key.upper()} must be a whole number, got {text!r}"
                    ) from None
    if options:
        arguments = {**arguments, **options}
    out: dict[str, Any] = {}
    options = {o.name: o for o in spec.options}
    for key, value in arguments.items():
        if key not in spec.params and key not in options:
            raise ValueError(f"{name}: unknown argument {key!r}")
        if key in options and value is None:
            continue  # an option left unset
        if spec.variadic and key == spec.params[-1]:
            if not (
                isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
            ):
                raise ValueError(f"{name}: argument {key!r} must be a non-empty list of strings")
            out[key] = value
            continue
        option = options.get(key)
        out[key] = _value(
            name, key, spec.kind(key), value, option.choices if option is not None else ()
        )
    missing = [p for p in spec.params if p not in out]
    if missing:
        raise ValueError(f"{name}: missing argument(s) {', '.join(missing)}")
    if name == "time-limit" and out["soft"] and out["hard"] and out["soft"] >= out["hard"]:
        # Said here, before the broadcast: every worker would refuse it anyway.
        raise ValueError(
            f"time-limit: SOFT ({out['soft']:g}s) must be below HARD ({out['hard']:g}s)"
        )
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

    def revoke(
        self,
        ids: str | Iterable[str],
        *,
        terminate: bool = False,
        expires: float | None = None,
        timeout: float = 1.0,
        destination: Sequence[str] | None = None,
    ) -> dict[str, ControlReply]:
        """Revoke task ``ids`` (one id or several): none of them starts on any worker — one
        started later, or a task still waiting in the delay levels, included — for
        ``expires`` seconds (default: the config's ``revoke.expires``; at most 48.5 days).

        The revocation is appended to the broker's revocations stream first (confirmed;
        ``BrokerError`` if it cannot be), so it holds whatever the workers do; then the running
        workers are told, and each answers ``{"revoked": [...], "terminated": [...],
        "expires": RFC 3339}``. ``terminate=True`` also stops a revoked task that is running
        now (docs/control.md says what each pool can do); it is settled as REVOKED, never
        retried. ``destination`` only chooses which workers answer (and terminate): the
        revocation itself always holds fleet-wide.
        """
        wanted = [ids] if isinstance(ids, str) else list(ids)
        if expires is None:
            expires = self.app.settings.revoke.expires
        if not (
            isinstance(expires, (int, float))
            and not isinstance(expires, bool)
            and 0 < expires <= MAX_REVOKE_EXPIRES
        ):
            raise ValueError(
                f"expires= must be seconds > 0 and at most {MAX_REVOKE_EXPIRES:.0f} (48.5 days), "
                f"got {expires!r}"
            )
        arguments = check_arguments(
            "revoke", {"ids": wanted, "terminate": terminate, "expires": float(expires)}
        )
        self.store_revocation(wanted, float(expires))
        return self.broadcast("revoke", arguments, timeout=timeout, destination=destination)

    def store_revocation(self, ids: Sequence[str], expires: float) -> None:
        """Append the revocation of ``ids`` to the revocations stream (confirmed)."""
        props = Properties(content_type=CONTENT_TYPE_JSON, message_id=new_id(), delivery_mode=2)
        try:
            self.app.publisher.publish(
                "", REVOCATIONS_QUEUE, encode_revocation(ids, expires), props
            )
        except UnroutableError:
            raise BrokerError(
                f"the revocation was not stored: the stream {REVOCATIONS_QUEUE!r} does not "
                "exist on the broker (run 'amqptasks topology apply', or start a worker: each "
                "declares it)"
            ) from None

    def rate_limit(
        self,
        task: str,
        rate: str | float,
        *,
        scope: str | None = None,
        timeout: float = 1.0,
        destination: Sequence[str] | None = None,
    ) -> dict[str, ControlReply]:
        """Set ``task``'s rate limit on the chosen workers from now on (``"10/s"``,
        ``"100/m"``, ``"2/h"``; 0 for none); ``scope`` ``worker`` (the default) or
        ``fleet``. Each answers ``{"task", "rate_limit": {...}, "was": {...}}``. Not kept
        across a worker's restart (the decorator and the config decide then)."""
        arguments = check_arguments("rate-limit", {"task": task, "rate": str(rate), "scope": scope})
        return self.broadcast("rate-limit", arguments, timeout=timeout, destination=destination)

    def time_limit(
        self,
        task: str,
        soft: float,
        hard: float,
        *,
        timeout: float = 1.0,
        destination: Sequence[str] | None = None,
    ) -> dict[str, ControlReply]:
        """Set ``task``'s soft and hard time limits (seconds, 0 for none) on the chosen
        workers, for the executions that start from now on. Each answers ``{"task",
        "soft_time_limit", "time_limit"}``."""
        arguments = check_arguments("time-limit", {"task": task, "soft": soft, "hard": hard})
        return self.broadcast("time-limit", arguments, timeout=timeout, destination=destination)

    def send(
        self,
        command: str,
        arguments: Mapping[str, Any],
        *,
        destination: Sequence[str] | None = None,
        timeout: float = 1.0,
    ) -> dict[str, ControlReply]:
        """Like :meth:`broadcast`, doing the client's part of a command first (``revoke``
        stores its revocation): what the CLI calls."""
        if command == "revoke":
            return self.revoke(
                arguments["ids"],
                terminate=bool(arguments.get("terminate", False)),
                expires=arguments.get("expires"),
                timeout=timeout,
                destination=destination,
            )
        return self.broadcast(command, arguments, timeout=timeout, destination=destination)
