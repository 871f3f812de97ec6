"""Celery protocol v2 in, Celery's rpc result format out: how an unmodified Celery 5 producer
feeds amqptasks workers. Pure: no I/O, no Celery import.

What Celery's producer sends (``celery/app/amqp.py``, ``as_task_v2``): the call in AMQP
headers (``task``, ``id``, ``retries``, ``eta``, ``expires``, ``timelimit`` as ``[hard, soft]``
— the order of Celery's code, which its documentation states the other way round —
``root_id``, ``parent_id``, ``group``, ``group_index``, ``ignore_result`` and cosmetic ones),
``correlation_id`` = the task id and ``reply_to`` in the properties, and the body
``[args, kwargs, embed]`` with ``embed = {callbacks, errbacks, chain, chord}`` holding
Celery signatures as dicts (``task``/``args``/``kwargs``/``options``/``subtask_type``/
``immutable``); ``chain`` is stored last step first.

:func:`decode_any` is what a worker calls for every delivery: a message whose AMQP headers
carry Celery's ``task`` and ``id`` is decoded here into the same :class:`Envelope` as an
amqptasks message (its workflow mapped onto amqptasks nodes, docs/protocol.md section 12), any
other with :func:`amqptasks.protocol.decode`. What cannot be mapped is refused with
:class:`CeleryUnsupported` (dead-letter reason ``celery-unsupported``), never dropped.
:func:`encode_any` writes a retry or delay copy back in the format it came in, and
:func:`encode_celery_reply` answers a Celery caller in what Celery's ``rpc://`` backend reads
(``celery/backends/rpc.py``: a JSON body with ``task_id``, ``status``, ``result``,
``traceback``, ``children``; ``correlation_id`` = the task id). docs/migration.md is the
field-by-field account.
"""

from __future__ import annotations

import builtins
import math
import pickle
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import orjson

from . import canvas
from .errors import CeleryUnsupported, ContentTypeRefused, DecodeError
from .protocol import (
    CONTENT_TYPE_JSON,
    CONTENT_TYPE_PICKLE,
    DEFAULT_ACCEPT,
    SUCCESS,
    Envelope,
    Properties,
    Reply,
    check_links,
    decode,
    dumps,
    encode,
    json_message,
    parse_time,
)
from .protocol import message_id_of as _amqptasks_message_id_of

__all__ = [
    "CELERY_HEADERS",
    "celery_task_of",
    "decode_any",
    "decode_celery",
    "encode_any",
    "encode_celery",
    "encode_celery_reply",
    "is_celery",
    "message_id_of",
    "node_from_celery",
]

#: The AMQP headers Celery's protocol v2 defines. Any other header of a Celery message (a
#: producer's ``apply_async(headers=...)``, stamps) is an application header, as for ours.
CELERY_HEADERS = frozenset(
    {
        "lang",
        "task",
        "id",
        "shadow",
        "eta",
        "expires",
        "group",
        "group_index",
        "retries",
        "timelimit",
        "root_id",
        "parent_id",
        "argsrepr",
        "kwargsrepr",
        "origin",
        "ignore_result",
        "replaced_task_nesting",
        "stamped_headers",
        "stamps",
    }
)
_JSON_MEDIA_TYPES = frozenset({"", CONTENT_TYPE_JSON, "text/json"})
_EMBED_KEYS = frozenset({"callbacks", "errbacks", "chain", "chord"})
_SIGNATURE_KEYS = frozenset({"task", "args", "kwargs", "options", "subtask_type", "immutable"})
#: Celery signature options and what becomes of them. Options mapped one to one:
_SAME_OPTIONS = frozenset(
    {
        "task_id",
        "group_id",
        "queue",
        "exchange",
        "routing_key",
        "priority",
        "countdown",
        "eta",
        "expires",
        "headers",
        "ignore_result",
    }
)
#: Options dropped because amqptasks does the same without them: a step replies to the
#: ``reply_to`` of the message that started it, and its root and parent are set when it is
#: published; ``group_index`` is informational (a group's results are kept in order anyway).
_DROPPED_OPTIONS = frozenset({"reply_to", "root_id", "parent_id", "group_index"})
#: Options of a Celery chain, group or chord node that need nothing on our side.
_CONTAINER_OPTIONS = frozenset({"task_id", *_DROPPED_OPTIONS})


def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def is_celery(props: Properties) -> bool:
    """Whether a message is Celery protocol v2: its AMQP headers carry ``task`` and ``id``
    (whatever its content type, so a pickled one is recognised, and refused, too)."""
    headers = props.headers
    if not headers:
        return False
    task = _text(headers.get("task"))
    return isinstance(task, str) and bool(task) and "id" in headers


def celery_task_of(props: Properties) -> tuple[str, str | None] | None:
    """``(task name, task id)`` from a Celery message's headers, or None if it is not one."""
    if not is_celery(props):
        return None
    headers = props.headers or {}
    task_id = _text(headers.get("id"))
    return str(_text(headers["task"])), task_id if isinstance(task_id, str) and task_id else None


def message_id_of(body: bytes, props: Properties) -> str | None:
    """:func:`amqptasks.protocol.message_id_of`, with a Celery message's ``id`` header first:
    the id a worker logs, dead-letters and replies under, even when the body does not decode."""
    celery = celery_task_of(props)
    if celery is not None and celery[1] is not None:
        return celery[1]
    return _amqptasks_message_id_of(body, props)


# -- decoding ----------------------------------------------------------------------------------
def decode_any(
    body: bytes,
    props: Properties,
    accept: frozenset[str] = DEFAULT_ACCEPT,
    now: datetime | None = None,
    *,
    celery_ingest: bool = True,
    chords: bool = True,
) -> Envelope:
    """Decode an amqptasks or a Celery protocol v2 message.

    With ``celery_ingest`` off a Celery message is refused (:class:`CeleryUnsupported`) rather
    than misread; ``chords`` says whether this worker has a result store to count a chord in.
    """
    if not is_celery(props):
        return decode(body, props, accept, now)
    if not celery_ingest:
        task, task_id = celery_task_of(props) or ("", None)
        raise CeleryUnsupported(
            f"Celery protocol v2 message (header task={task!r}, id={task_id!r}) refused: "
            "Celery ingest is off (serialization.celery_ingest: false)"
        )
    return decode_celery(body, props, accept, now, chords=chords)


def _celery_body(body: bytes, media_type: str, accept: frozenset[str]) -> Any:
    if media_type in _JSON_MEDIA_TYPES and CONTENT_TYPE_JSON in accept:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"Celery message body is not valid UTF-8 JSON: {exc}") from exc
    if media_type == CONTENT_TYPE_PICKLE and CONTENT_TYPE_PICKLE in accept:
        try:
            return pickle.loads(body)
        except Exception as exc:
            raise DecodeError(f"Celery message pickle body could not be loaded: {exc}") from exc
    raise ContentTypeRefused(
        f"Celery message content type {media_type!r} is not accepted (accepted: "
        f"{', '.join(sorted(accept))}); have the Celery producer send JSON "
        "(task_serializer='json')"
    )


def _opt_str(headers: Mapping[str, Any], key: str) -> str | None:
    value = _text(headers.get(key))
    if value is not None and not isinstance(value, str):
        raise DecodeError(f"Celery header {key!r} must be a string or null, got {value!r}")
    return value or None


def _time(headers: Mapping[str, Any], key: str, now: datetime | None) -> datetime | None:
    value = _text(headers.get(key))
    if value is None:
        return None
    if not isinstance(value, str):
        raise DecodeError(f"Celery header {key!r} must be an ISO 8601 time, got {value!r}")
    try:
        return parse_time(value, key, now)
    except DecodeError:
        raise DecodeError(f"Celery header {key!r} is not an ISO 8601 time: {value!r}") from None


def _seconds(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _time_limits(headers: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """Celery's ``timelimit`` header: ``[hard, soft]`` — the order ``as_task_v2`` writes and
    ``celery/worker/request.py`` reads (``time_limit, soft_time_limit = ...``)."""
    value = headers.get("timelimit")
    if value is None:
        return None, None
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(v is None or _seconds(v) for v in value)
    ):
        raise DecodeError(
            f"Celery header 'timelimit' must be [hard, soft] seconds (each a number >= 0 or "
            f"null), got {value!r}"
        )
    hard, soft = value
    return (float(hard) if hard else None), (float(soft) if soft else None)


def decode_celery(
    body: bytes,
    props: Properties,
    accept: frozenset[str] = DEFAULT_ACCEPT,
    now: datetime | None = None,
    *,
    chords: bool = True,
) -> Envelope:
    """A Celery protocol v2 message as an :class:`Envelope` (see the module docstring).

    Raises :class:`DecodeError`, :class:`ContentTypeRefused` or :class:`CeleryUnsupported`
    naming the header or the embed path that is wrong.
    """
    headers: dict[str, Any] = {k: _text(v) for k, v in (props.headers or {}).items()}
    task = headers.get("task")
    if not isinstance(task, str) or not task:
        raise DecodeError("Celery header 'task' must be a non-empty string")
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not task_id:
        raise DecodeError(f"Celery header 'id' must be a non-empty string, got {task_id!r}")
    media_type = (props.content_type or "").split(";", 1)[0].strip().lower()
    obj = _celery_body(body, media_type, accept)
    if headers.get("compression"):
        raise CeleryUnsupported(
            f"Celery message body is compressed ({headers['compression']!r}); amqptasks reads "
            "uncompressed bodies only (leave Celery's task_compression unset)"
        )
    if not isinstance(obj, (list, tuple)) or len(obj) != 3:
        raise DecodeError(
            "a Celery protocol v2 body must be [args, kwargs, embed], got "
            f"{type(obj).__name__}{f' of {len(obj)}' if isinstance(obj, (list, tuple)) else ''}"
        )
    args, kwargs, embed = obj
    if not isinstance(args, (list, tuple)):
        raise DecodeError(f"Celery body args must be an array, got {type(args).__name__}")
    if not isinstance(kwargs, dict):
        raise DecodeError(f"Celery body kwargs must be an object, got {type(kwargs).__name__}")
    if embed is not None and not isinstance(embed, dict):
        raise DecodeError(f"Celery body embed must be an object, got {type(embed).__name__}")
    retries = headers.get("retries") or 0
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise DecodeError(f"Celery header 'retries' must be an integer >= 0, got {retries!r}")
    ignore_result = headers.get("ignore_result")
    if ignore_result is not None and not isinstance(ignore_result, bool):
        raise DecodeError(
            f"Celery header 'ignore_result' must be true, false or null, got {ignore_result!r}"
        )
    group_id = _opt_str(headers, "group")
    group_index = headers.get("group_index")
    if group_index is not None and (not isinstance(group_index, int) or group_index < 0):
        raise DecodeError(
            f"Celery header 'group_index' must be an integer >= 0 or null, got {group_index!r}"
        )
    hard, soft = _time_limits(headers)
    links = embed_to_links(embed or {}, group_id=group_id, group_index=group_index, chords=chords)
    protocol = {k: v for k, v in headers.items() if k in CELERY_HEADERS}
    return Envelope(
        task=task,
        id=task_id,
        args=tuple(args),
        kwargs=kwargs,
        retries=retries,
        eta=_time(headers, "eta", now),
        expires=_time(headers, "expires", now),
        root_id=_opt_str(headers, "root_id"),
        parent_id=_opt_str(headers, "parent_id"),
        links=links,
        correlation_id=props.correlation_id or task_id,
        # Celery always sends reply_to (its rpc queue); ignore_result says nobody waits on it.
        reply_to=(props.reply_to or None) if ignore_result is not True else None,
        priority=props.priority,
        headers={k: v for k, v in (props.headers or {}).items() if k not in CELERY_HEADERS},
        time_limit=hard,
        soft_time_limit=soft,
        reply_format="celery",
        celery={"headers": protocol, "embed": embed},
    )


# -- embed -> workflow links -------------------------------------------------------------------
def embed_to_links(
    embed: Mapping[str, Any],
    *,
    group_id: str | None = None,
    group_index: int | None = None,
    chords: bool = True,
) -> dict[str, Any]:
    """Celery's ``embed`` (and ``group`` header) as the body's workflow fields
    (docs/protocol.md section 12), checked like an amqptasks message's."""
    unknown = embed.keys() - _EMBED_KEYS
    if unknown:
        raise CeleryUnsupported(f"Celery embed field(s) {', '.join(sorted(unknown))} unknown")
    links: dict[str, Any] = {}
    for key, ours in (("callbacks", "callbacks"), ("errbacks", "errbacks")):
        nodes = _node_list(embed.get(key), f"embed.{key}")
        if nodes:
            links[ours] = nodes
    chain = embed.get("chain")
    if chain:
        if not isinstance(chain, list):
            raise DecodeError("Celery embed.chain must be an array")
        # Celery keeps the rest of a chain last step first (it pops the next one off the end).
        links["chain"] = [
            node_from_celery(chain[i], f"embed.chain[{i}]") for i in reversed(range(len(chain)))
        ]
    if group_id:
        links["group_id"] = group_id
    chord = embed.get("chord")
    if chord:
        links["chord"] = _membership(chord, group_id, group_index)
    check_links(links)
    if not chords and _needs_store(links):
        raise CeleryUnsupported(
            "the Celery workflow holds a chord, and this worker has no result store to count "
            "it in (results.backend is rpc://; use sqlite:// or redis://)"
        )
    return links


def _needs_store(links: Mapping[str, Any]) -> bool:
    if "chord" in links:
        return True
    nodes = [*links.get("callbacks", ()), *links.get("errbacks", ())]
    if links.get("chain"):
        nodes.append({"chain": links["chain"]})
    return any(canvas.needs_store(canvas.node_from_wire(n)) for n in nodes)


def _membership(chord: Any, group_id: str | None, group_index: int | None) -> dict[str, Any]:
    """This message is a member of a chord's header. Celery keeps the chord's size in its own
    result backend (``set_chord_size``), not in the message, unless the body says
    ``chord_size``: without it the membership cannot be counted here."""
    if not isinstance(chord, dict):
        raise DecodeError("Celery embed.chord must be a signature object")
    size = chord.get("chord_size")
    if group_id is None or group_index is None or not isinstance(size, int) or size < 1:
        raise CeleryUnsupported(
            "Celery chord member: the chord's size is kept in Celery's result backend, not in "
            "the message (embed.chord has no chord_size), so amqptasks cannot tell when the "
            "chord is complete; start the chord from amqptasks (docs/migration.md)"
        )
    body = {k: v for k, v in chord.items() if k != "chord_size"}
    return {
        "id": group_id,
        "index": group_index,
        "size": size,
        "body": node_from_celery(body, "embed.chord"),
    }


def _node_list(value: Any, where: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, dict):  # a single signature where a list is usual
        value = [value]
    if not isinstance(value, list):
        raise DecodeError(f"Celery {where} must be an array of signatures")
    return [node_from_celery(n, f"{where}[{i}]") for i, n in enumerate(value)]


def node_from_celery(obj: Any, where: str = "signature") -> dict[str, Any]:
    """One Celery signature dict (a task, ``celery.chain``, ``celery.group`` or
    ``celery.chord``) as an amqptasks wire node; ``where`` names it in errors."""
    if not isinstance(obj, dict):
        raise DecodeError(f"Celery {where} must be a signature object, got {type(obj).__name__}")
    extra = obj.keys() - _SIGNATURE_KEYS - {"chord_size"}
    if extra:
        raise CeleryUnsupported(f"Celery {where}: unknown key(s) {', '.join(sorted(extra))}")
    kind = obj.get("subtask_type")
    options = obj.get("options") or {}
    kwargs = obj.get("kwargs") or {}
    if not isinstance(options, dict) or not isinstance(kwargs, dict):
        raise DecodeError(f"Celery {where}: options and kwargs must be objects")
    if kind is None:
        return _signature(obj, options, where)
    if kind not in ("chain", "group", "chord"):
        raise CeleryUnsupported(
            f"Celery {where}: subtask_type {kind!r} has no amqptasks equivalent "
            "(supported: plain signatures, chain, group, chord)"
        )
    unsupported = options.keys() - _CONTAINER_OPTIONS
    if unsupported:
        raise CeleryUnsupported(
            f"Celery {where}: {kind} option(s) {', '.join(sorted(unsupported))} not supported"
        )
    node_id = options.get("task_id")
    if kind in ("chain", "group"):
        tasks = kwargs.get("tasks")
        if not isinstance(tasks, list):
            raise DecodeError(f"Celery {where}: a {kind} needs kwargs.tasks, an array")
        node: dict[str, Any] = {
            kind: [node_from_celery(t, f"{where}.kwargs.tasks[{i}]") for i, t in enumerate(tasks)]
        }
        if kind == "group" and node_id:
            node["id"] = node_id
        return node
    header, body = kwargs.get("header"), kwargs.get("body")
    if kwargs.get("kwargs"):
        raise CeleryUnsupported(f"Celery {where}: chord kwargs.kwargs not supported")
    if isinstance(header, dict):  # a celery.group signature
        header_node = node_from_celery(header, f"{where}.kwargs.header")
        members = header_node.get("group", [header_node])
    elif isinstance(header, list):
        members = [node_from_celery(t, f"{where}.kwargs.header[{i}]") for i, t in enumerate(header)]
    else:
        raise DecodeError(f"Celery {where}: a chord needs kwargs.header")
    if body is None:
        raise DecodeError(f"Celery {where}: a chord needs kwargs.body")
    node = {"header": members, "body": node_from_celery(body, f"{where}.kwargs.body")}
    if node_id:
        node["id"] = node_id
    return node


def _signature(obj: Mapping[str, Any], options: Mapping[str, Any], where: str) -> dict[str, Any]:
    task = obj.get("task")
    if not isinstance(task, str) or not task:
        raise DecodeError(f"Celery {where}.task must be a non-empty string")
    unsupported = options.keys() - _SAME_OPTIONS - _DROPPED_OPTIONS - {"link", "link_error"}
    if unsupported:
        raise CeleryUnsupported(
            f"Celery {where} ({task}): option(s) {', '.join(sorted(unsupported))} not supported "
            "on a workflow step (docs/migration.md)"
        )
    ours: dict[str, Any] = {k: v for k, v in options.items() if k in _SAME_OPTIONS}
    for key in ("link", "link_error"):
        nodes = _node_list(options.get(key), f"{where}.options.{key}")
        if nodes:
            ours[key] = nodes
    args = obj.get("args") or []
    if not isinstance(args, (list, tuple)):
        raise DecodeError(f"Celery {where}.args must be an array")
    node: dict[str, Any] = {"task": task}
    if args:
        node["args"] = list(args)
    if obj.get("kwargs"):
        node["kwargs"] = dict(obj["kwargs"])
    if ours:
        node["options"] = ours
    if obj.get("immutable"):
        node["immutable"] = True
    return node


# -- encoding (a retry or delay copy of a Celery message) ----------------------------------------
def _iso(when: datetime | None) -> str | None:
    return when.isoformat() if when is not None else None


def encode_celery(envelope: Envelope) -> tuple[bytes, Properties]:
    """A Celery-decoded envelope back in Celery's format: its protocol headers as they came,
    with ``retries``, ``eta`` and ``expires`` as they are now, the application headers beside
    them, and the ``embed`` as received."""
    origin = envelope.celery or {}
    headers: dict[str, Any] = {**envelope.headers, **origin.get("headers", {})}
    headers.update(
        task=envelope.task,
        id=envelope.id,
        retries=envelope.retries,
        eta=_iso(envelope.eta),
        expires=_iso(envelope.expires),
    )
    body = [list(envelope.args), envelope.kwargs, origin.get("embed")]
    return json_message(envelope, body, headers)


def encode_any(envelope: Envelope) -> tuple[bytes, Properties]:
    """An envelope in the format it arrived in (Celery's or amqptasks')."""
    if envelope.celery is not None:
        return encode_celery(envelope)
    return encode(envelope)


# -- replies Celery's rpc backend reads ----------------------------------------------------------
def _builtin_exception(name: str) -> bool:
    value = getattr(builtins, name, None)
    return isinstance(value, type) and issubclass(value, BaseException)


def encode_celery_reply(
    reply: Reply,
    *,
    exc_module: str | None = None,
    exc_args: list[Any] | None = None,
    date_done: datetime | None = None,
) -> bytes:
    """The body Celery's ``rpc://`` backend turns into an ``AsyncResult`` state
    (``celery/backends/rpc.py``, ``_to_result``).

    A FAILURE carries Celery's exception form ``{exc_type, exc_message, exc_module}``; the
    caller rebuilds the exception from it (a class it has loaded, or one made up by that name,
    never an import). ``exc_module`` is ``builtins`` for builtin exception names when not given.
    A result that is not JSON-serialisable becomes an ``EncodeError`` FAILURE.
    """
    done = (date_done or datetime.now(timezone.utc)).isoformat()
    meta: dict[str, Any] = {
        "task_id": reply.id,
        "status": reply.status,
        "traceback": reply.traceback,
        "children": [],
        "date_done": done,
    }
    if reply.status == SUCCESS:
        meta["result"] = reply.result
        try:
            return dumps(meta)
        except TypeError as exc:
            reply = Reply(
                reply.id,
                "FAILURE",
                reply.task,
                error_type="EncodeError",
                error_message=f"result of type {type(reply.result).__name__} is not "
                f"JSON-serialisable: {exc}",
            )
            meta["traceback"] = None
            exc_module, exc_args = None, None
    name = reply.error_type or "TaskError"
    if exc_module is None and _builtin_exception(name):
        exc_module = "builtins"
    message = reply.error_message if reply.error_message is not None else ""
    meta["status"] = "FAILURE"
    meta["result"] = {"exc_type": name, "exc_message": [message], "exc_module": exc_module}
    if exc_args is not None:
        try:
            dumps(exc_args)
            meta["result"]["exc_message"] = list(exc_args)
        except TypeError:
            pass
    return dumps(meta)
