"""The wire format: AMQP body + properties in, a typed :class:`Envelope` out, and back.

Pure: no I/O, no client library. ``docs/protocol.md`` is the human spec and
``amqptasks/schema/message-v1.json`` the machine one; tests check all three agree.

The minimal valid message is ``{"task": "examples.tasks.add", "args": [2, 3]}`` published by any
AMQP client with no properties at all, so every field but ``task`` has a default and an absent
``content_type`` means JSON.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson

from .errors import ContentTypeRefused, DecodeError, EncodeError

__all__ = [
    "CONTENT_TYPE_JSON",
    "CONTENT_TYPE_PICKLE",
    "DEAD_LETTER_REASONS",
    "DEFAULT_ACCEPT",
    "DL_PREFIX",
    "FAILURE",
    "PROTOCOL_VERSION",
    "REPLY_FORMATS",
    "REPLY_FORMAT_HEADER",
    "SIGNATURE_OPTIONS",
    "SUCCESS",
    "Envelope",
    "Properties",
    "Reply",
    "check_headers",
    "check_links",
    "check_membership",
    "check_node",
    "check_priority",
    "check_shortstr",
    "dead_letter_properties",
    "decode",
    "decode_reply",
    "dumps",
    "encode",
    "encode_reply",
    "json_message",
    "loads",
    "message_id_of",
    "new_id",
    "parse_time",
    "reply_format_of",
]

PROTOCOL_VERSION = 1
CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_PICKLE = "application/x-python-serialize"
#: Pickle is never accepted unless a user adds it to ``serialization.accept`` explicitly:
#: unpickling a message runs code chosen by whoever could publish to the queue.
DEFAULT_ACCEPT: frozenset[str] = frozenset({CONTENT_TYPE_JSON})
#: Media types (the part of ``content_type`` before any ``;`` parameters) read as JSON.
_JSON_MEDIA_TYPES = frozenset({"", CONTENT_TYPE_JSON, "text/json"})
#: RFC 3339 date-time, the same pattern as ``$defs.datetime`` in schema/message-v1.json: ``T``,
#: ``t`` or a space between date and time, any number of fraction digits, upper-case ``Z`` or
#: ``±HH:MM`` or no offset (UTC). Calendar validity is left to :class:`datetime`.
_DATETIME = re.compile(
    r"([0-9]{4})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt ]"
    r"([01][0-9]|2[0-3]):([0-5][0-9]):([0-5][0-9])(?:\.([0-9]+))?"
    r"(Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])?"
)

#: AMQP header asking for the reply in another format than schema/reply-v1.json: ``celery``
#: (the format Celery's ``rpc://`` result backend reads; docs/migration.md). A worker writes it
#: on the workflow steps it publishes for a Celery caller, so their replies reach the caller in
#: the format its ``AsyncResult.get()`` reads.
REPLY_FORMAT_HEADER = "x-amqptasks-reply-format"
REPLY_FORMATS = frozenset({"amqptasks", "celery"})

# Fields a later feature fills; accepted and type-checked now so producers can rely on them.
_LINK_FIELDS = ("callbacks", "errbacks", "chain", "chord", "group_id")
_KNOWN_FIELDS = frozenset(
    {
        "v",
        "task",
        "id",
        "args",
        "kwargs",
        "retries",
        "eta",
        "countdown",
        "expires",
        "root_id",
        "parent_id",
        *_LINK_FIELDS,
    }
)
#: The fields of a message with no times and no workflow links: decoded without looking for
#: those (``decode``'s fast path; the result is the same).
_PLAIN_FIELDS = frozenset({"v", "task", "id", "args", "kwargs", "retries", "root_id", "parent_id"})


_ID_BYTES = 16 * 256
_id_lock = threading.Lock()
_id_random = b""
_id_pos = 0


def _forget_random() -> None:
    # A forked child must never hand out ids from its parent's buffer (duplicates), nor
    # inherit the lock held by a parent thread at the fork (it would never be released).
    global _id_random, _id_pos, _id_lock
    _id_random, _id_pos, _id_lock = b"", 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_random)


def new_id() -> str:
    """A fresh task id: a time-ordered UUID as text (version 7, RFC 9562: the Unix time in
    milliseconds, then 74 random bits), unique without coordination.

    Why time-ordered rather than random (version 4): a result store keys its records by id,
    and ids made one after the other land side by side in its index instead of on a random
    page each. Measured on SQLite (WAL, ``synchronous=FULL``, batches of 158): a stored
    result cost 15.8 µs with version-4 ids and 5.5 µs with these. The price: an id tells
    when it was made, to the millisecond (events and results say so anyway). The random
    bits come from ``os.urandom``, drawn 256 ids at a time: one system call per id was a
    visible share of a pipelined publisher's time. Any string still works as an id.
    """
    global _id_random, _id_pos
    with _id_lock:
        if _id_pos >= len(_id_random):
            _id_random, _id_pos = os.urandom(_ID_BYTES), 0
        raw = bytearray(_id_random[_id_pos : _id_pos + 16])
        _id_pos += 16
    raw[0:6] = (time.time_ns() // 1_000_000).to_bytes(6, "big")
    raw[6] = (raw[6] & 0x0F) | 0x70  # version 7
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 9562 (4122) variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def dumps(value: Any) -> bytes:
    """JSON-encode ``value`` as UTF-8 bytes with orjson (fast, strict UTF-8).

    Like orjson, this writes a non-finite float (``nan``, ``inf``, ``-inf``) as ``null``: JSON
    has no NaN or Infinity, and the value is not refused.
    """
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)


def loads(data: bytes | str) -> Any:
    """Decode UTF-8 JSON; raises :class:`DecodeError` on anything else."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"body is not valid UTF-8 JSON: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Properties:
    """The AMQP basic properties the protocol reads or writes, independent of any client."""

    content_type: str | None = None
    content_encoding: str | None = None
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    priority: int | None = None
    headers: dict[str, Any] | None = None
    delivery_mode: int | None = None
    timestamp: datetime | None = None


@dataclass(frozen=True, slots=True)
class Envelope:
    """One task invocation as it travels: what to run, with what, and its delivery metadata."""

    task: str
    id: str = field(default_factory=new_id)
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    retries: int = 0
    eta: datetime | None = None
    expires: datetime | None = None
    root_id: str | None = None
    parent_id: str | None = None
    links: dict[str, Any] = field(default_factory=dict)
    # From AMQP properties, not the body:
    correlation_id: str | None = None
    reply_to: str | None = None
    priority: int | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    #: Per-message time limits in seconds (None: the task's policy decides; a message's limit
    #: wins, as in Celery). Only Celery's ``timelimit`` header sets them (celery_compat).
    time_limit: float | None = None
    soft_time_limit: float | None = None
    #: The format of the reply to ``reply_to``: ``amqptasks`` (schema/reply-v1.json) or
    #: ``celery`` (what Celery's rpc result backend reads; docs/migration.md).
    reply_format: str = "amqptasks"
    #: A message decoded from Celery protocol v2: its protocol headers and ``embed`` as they
    #: arrived, so a retry or delay copy is written back in Celery's format (celery_compat).
    #: None for amqptasks messages.
    celery: dict[str, Any] | None = None

    def is_expired(self, now: datetime) -> bool:
        return self.expires is not None and now >= self.expires


def parse_time(value: Any, key: str, now: datetime | None = None) -> datetime:
    """An RFC 3339 date-time string (no offset means UTC) or, relative to ``now``, seconds.

    Strings are parsed by :data:`_DATETIME` (the schema's pattern), not
    :meth:`datetime.fromisoformat`, whose accepted forms differ between Python 3.10 and 3.11.
    A fraction finer than a microsecond is truncated.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            if not math.isfinite(value):
                raise DecodeError(f"field {key!r} must be a finite number of seconds")
            return (now or datetime.now(timezone.utc)) + timedelta(seconds=value)
        except (OverflowError, ValueError) as exc:
            raise DecodeError(f"field {key!r} is out of range") from exc
    if isinstance(value, str):
        match = _DATETIME.fullmatch(value)
        if match is None:
            raise DecodeError(f"field {key!r} is not an ISO 8601 time: {value!r}")
        year, month, day, hour, minute, second, fraction, offset = match.groups()
        tz = timezone.utc
        if offset not in (None, "Z"):
            sign = -1 if offset[0] == "-" else 1
            tz = timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6])))
        try:
            return datetime(
                int(year),
                int(month),
                int(day),
                int(hour),
                int(minute),
                int(second),
                int((fraction or "")[:6].ljust(6, "0")),
                tzinfo=tz,
            )
        except ValueError as exc:
            raise DecodeError(f"field {key!r} is not an ISO 8601 time: {value!r}") from exc
    raise DecodeError(f"field {key!r} must be an ISO 8601 time or seconds, got {_json_type(value)}")


def _body_object(body: bytes, content_type: str, accept: frozenset[str]) -> dict[str, Any]:
    """``content_type`` is the media type alone: lower-case, no parameters, no whitespace."""
    if content_type in _JSON_MEDIA_TYPES:
        if CONTENT_TYPE_JSON not in accept:
            raise ContentTypeRefused(f"content type {CONTENT_TYPE_JSON!r} is not accepted")
        obj = loads(body)
    elif content_type == CONTENT_TYPE_PICKLE and CONTENT_TYPE_PICKLE in accept:
        try:
            obj = pickle.loads(body)
        except Exception as exc:
            raise DecodeError(f"pickle body could not be loaded: {exc}") from exc
    else:
        raise ContentTypeRefused(
            f"content type {content_type!r} is not accepted (accepted: {', '.join(sorted(accept))})"
        )
    if not isinstance(obj, dict):
        raise DecodeError(f"body must be a JSON object, got {_json_type(obj)}")
    return obj


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    for typ, name in names.items():
        if isinstance(value, typ):
            return name
    return "number" if isinstance(value, (int, float)) else type(value).__name__


def _opt_str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise DecodeError(f"field {key!r} must be a string, got {_json_type(value)}")
    return value


def decode(
    body: bytes,
    props: Properties,
    accept: frozenset[str] = DEFAULT_ACCEPT,
    now: datetime | None = None,
) -> Envelope:
    """Turn a delivery's body and properties into an :class:`Envelope`.

    Raises :class:`DecodeError` or :class:`ContentTypeRefused` with a message naming the field
    and what was expected; the worker dead-letters the delivery with that text as the reason.
    """
    # Parameters (``; charset=utf-8``) are ignored: a JSON body is UTF-8 whatever they say.
    media_type = props.content_type
    if media_type != CONTENT_TYPE_JSON:  # what our producers send needs no normalising
        media_type = (media_type or "").split(";", 1)[0].strip().lower()
    obj = _body_object(body, media_type, accept)

    task = obj.get("task")
    if not isinstance(task, str) or not task:
        raise DecodeError("field 'task' is required and must be a non-empty string")
    plain = obj.keys() <= _PLAIN_FIELDS
    if not plain:
        unknown = obj.keys() - _KNOWN_FIELDS
        if unknown:
            raise DecodeError(f"unknown field(s) {', '.join(sorted(map(repr, unknown)))}")
    version = obj.get("v", PROTOCOL_VERSION)
    if isinstance(version, bool):  # True == 1 in Python, but not in JSON
        raise DecodeError(f"field 'v' must be the number {PROTOCOL_VERSION}, got boolean")
    if version != PROTOCOL_VERSION:
        raise DecodeError(
            f"field 'v' is {version!r}; this worker speaks version {PROTOCOL_VERSION}"
        )

    args = obj.get("args", [])
    if not isinstance(args, list):
        raise DecodeError(f"field 'args' must be a JSON array, got {_json_type(args)}")
    kwargs = obj.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise DecodeError(f"field 'kwargs' must be a JSON object, got {_json_type(kwargs)}")
    retries = obj.get("retries", 0)
    if isinstance(retries, float) and retries.is_integer():
        retries = int(retries)  # 1.0 is a JSON Schema integer; 1.5, nan and inf are not
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise DecodeError("field 'retries' must be a non-negative integer")

    task_id = _opt_str(obj, "id") or props.message_id or new_id()
    eta: datetime | None = None
    expires: datetime | None = None
    links: dict[str, Any] = {}
    if not plain:  # most messages have no time or workflow field: nothing to look for
        eta, expires, links = _times_and_links(obj, now)

    priority = props.priority
    return Envelope(
        task=task,
        id=task_id,
        args=tuple(args),
        kwargs=kwargs,
        retries=retries,
        eta=eta,
        expires=expires,
        root_id=_opt_str(obj, "root_id"),
        parent_id=_opt_str(obj, "parent_id"),
        links=links,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        priority=priority,
        headers=dict(props.headers) if props.headers else {},
        reply_format=reply_format_of(props),
    )


def _times_and_links(
    obj: dict[str, Any], now: datetime | None
) -> tuple[datetime | None, datetime | None, dict[str, Any]]:
    """A body's ``eta`` (or ``countdown``), ``expires`` and workflow fields, checked."""
    eta = None
    if obj.get("eta") is not None and obj.get("countdown") is not None:
        raise DecodeError("fields 'eta' and 'countdown' are mutually exclusive")
    if obj.get("eta") is not None:
        eta = parse_time(obj["eta"], "eta", now)
    elif obj.get("countdown") is not None:
        if not isinstance(obj["countdown"], (int, float)) or isinstance(obj["countdown"], bool):
            raise DecodeError("field 'countdown' must be a number of seconds")
        eta = parse_time(obj["countdown"], "countdown", now)
    expires = parse_time(obj["expires"], "expires", now) if obj.get("expires") is not None else None
    links: dict[str, Any] = {}
    for key in _LINK_FIELDS:
        if obj.get(key) is not None:
            links[key] = obj[key]
    check_links(links)
    return eta, expires, links


def reply_format_of(props: Properties) -> str:
    """The reply format a message asks for (:data:`REPLY_FORMAT_HEADER`); an unknown value
    is a :class:`DecodeError` (a reply nobody can read is worse than a refusal)."""
    value = (props.headers or {}).get(REPLY_FORMAT_HEADER, "amqptasks")
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if value not in REPLY_FORMATS:
        raise DecodeError(
            f"header {REPLY_FORMAT_HEADER!r} must be one of {', '.join(sorted(REPLY_FORMATS))}, "
            f"got {value!r}"
        )
    return str(value)


def check_links(links: Mapping[str, Any]) -> None:
    """The workflow fields of a body (``callbacks``, ``errbacks``, ``chain``, ``chord``,
    ``group_id``), checked in full; a :class:`DecodeError` names the path of what is wrong."""
    for key in ("callbacks", "errbacks", "chain"):
        if key in links:
            if not isinstance(links[key], list):
                raise DecodeError(f"field {key!r} must be a JSON array")
            for i, node in enumerate(links[key]):
                check_node(node, f"{key}[{i}]")
    if "chord" in links:
        if not isinstance(links["chord"], dict):
            raise DecodeError("field 'chord' must be a JSON object")
        check_membership(links["chord"], "chord")
    if "group_id" in links and (not isinstance(links["group_id"], str) or not links["group_id"]):
        raise DecodeError("field 'group_id' must be a non-empty string")


# -- workflow nodes (docs/protocol.md, "Workflows"; schema $defs/node) -------------------------
#: Options a signature node may carry: publish options plus the links it starts with.
SIGNATURE_OPTIONS = frozenset(
    {
        "task_id",
        "queue",
        "routing_key",
        "exchange",
        "priority",
        "countdown",
        "eta",
        "expires",
        "headers",
        "ignore_result",
        "link",
        "link_error",
        "chord",
        "group_id",
    }
)
_NODE_FIELDS = {
    "task": frozenset({"task", "args", "kwargs", "options", "immutable"}),
    "chain": frozenset({"chain"}),
    "group": frozenset({"group", "id"}),
    "header": frozenset({"header", "body", "id"}),
}


def check_node(obj: Any, where: str) -> None:
    """Refuse a workflow node that is not of the documented shape; the error names the path
    (``chain[1].options.link[0].task``) and what was expected. Checks the whole tree."""
    if not isinstance(obj, dict):
        raise DecodeError(f"field {where!r}: a workflow node must be a JSON object")
    kind = next((k for k in _NODE_FIELDS if k in obj), None)
    if kind is None:
        raise DecodeError(
            f"field {where!r}: not a workflow node (needs 'task', 'chain', 'group' or 'header')"
        )
    unknown = obj.keys() - _NODE_FIELDS[kind]
    if unknown:
        raise DecodeError(f"field {where!r}: unknown field(s) {', '.join(sorted(unknown))}")
    if kind == "task":
        if not isinstance(obj["task"], str) or not obj["task"]:
            raise DecodeError(f"field '{where}.task' must be a non-empty string")
        if not isinstance(obj.get("args", []), list):
            raise DecodeError(f"field '{where}.args' must be a JSON array")
        if not isinstance(obj.get("kwargs", {}), dict):
            raise DecodeError(f"field '{where}.kwargs' must be a JSON object")
        if not isinstance(obj.get("immutable", False), bool):
            raise DecodeError(f"field '{where}.immutable' must be true or false")
        options = obj.get("options", {})
        if not isinstance(options, dict):
            raise DecodeError(f"field '{where}.options' must be a JSON object")
        unknown = options.keys() - SIGNATURE_OPTIONS
        if unknown:
            raise DecodeError(
                f"field '{where}.options': unknown option(s) {', '.join(sorted(unknown))}"
            )
        for key in ("task_id", "group_id", "queue", "routing_key", "exchange"):
            if key in options and not isinstance(options[key], str):
                raise DecodeError(f"field '{where}.options.{key}' must be a string")
        for key in ("link", "link_error"):
            if key in options:
                if not isinstance(options[key], list):
                    raise DecodeError(f"field '{where}.options.{key}' must be a JSON array")
                for i, node in enumerate(options[key]):
                    check_node(node, f"{where}.options.{key}[{i}]")
        if "chord" in options:
            check_membership(options["chord"], f"{where}.options.chord")
        return
    if kind == "chain" or kind == "group":
        if not isinstance(obj[kind], list):
            raise DecodeError(f"field '{where}.{kind}' must be a JSON array")
        for i, node in enumerate(obj[kind]):
            check_node(node, f"{where}.{kind}[{i}]")
    else:
        if not isinstance(obj["header"], list):
            raise DecodeError(f"field '{where}.header' must be a JSON array")
        for i, node in enumerate(obj["header"]):
            check_node(node, f"{where}.header[{i}]")
        if "body" not in obj:
            raise DecodeError(f"field {where!r}: a chord node needs 'body'")
        check_node(obj["body"], f"{where}.body")
    if "id" in obj and (not isinstance(obj["id"], str) or not obj["id"]):
        raise DecodeError(f"field '{where}.id' must be a non-empty string")


def check_membership(obj: Any, where: str) -> None:
    """A chord membership ``{"id", "index", "size", "body"}``."""
    if not isinstance(obj, dict):
        raise DecodeError(f"field {where!r} must be a JSON object")
    unknown = obj.keys() - {"id", "index", "size", "body"}
    if unknown:
        raise DecodeError(f"field {where!r}: unknown field(s) {', '.join(sorted(unknown))}")
    chord_id, index, size = obj.get("id"), obj.get("index"), obj.get("size")
    if not isinstance(chord_id, str) or not chord_id:
        raise DecodeError(f"field '{where}.id' must be a non-empty string")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise DecodeError(f"field '{where}.size' must be a positive integer")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < size:
        raise DecodeError(f"field '{where}.index' must be an integer from 0 to size - 1")
    if "body" not in obj:
        raise DecodeError(f"field '{where}.body' is required")
    check_node(obj["body"], f"{where}.body")


def _rfc3339(when: datetime) -> str:
    """``when.isoformat()``, in UTC if its offset has seconds (RFC 3339 offsets are HH:MM)."""
    offset = when.utcoffset()
    if offset is not None and offset % timedelta(minutes=1):
        when = when.astimezone(timezone.utc)
    return when.isoformat()


def encode(envelope: Envelope) -> tuple[bytes, Properties]:
    """Serialise an envelope as the documented JSON body and persistent properties.

    Only non-default fields are written, so a message stays as small as the minimal form.
    """
    obj: dict[str, Any] = {"task": envelope.task, "id": envelope.id, "args": list(envelope.args)}
    if envelope.kwargs:
        obj["kwargs"] = envelope.kwargs
    if envelope.retries:
        obj["retries"] = envelope.retries
    if envelope.eta is not None:
        obj["eta"] = _rfc3339(envelope.eta)
    if envelope.expires is not None:
        obj["expires"] = _rfc3339(envelope.expires)
    if envelope.root_id is not None:
        obj["root_id"] = envelope.root_id
    if envelope.parent_id is not None:
        obj["parent_id"] = envelope.parent_id
    obj.update(envelope.links)
    return json_message(envelope, obj, envelope.headers or None)


def json_message(
    envelope: Envelope, body: Any, headers: dict[str, Any] | None
) -> tuple[bytes, Properties]:
    """``body`` as JSON with the properties every task message carries (persistent, the
    envelope's ids, reply-to and priority): shared by this wire and Celery's
    (``celery_compat.encode_celery``), which differ only in body and headers."""
    try:
        data = dumps(body)
    except TypeError as exc:
        raise EncodeError(
            f"task {envelope.task!r} arguments are not JSON-serialisable: {exc}"
        ) from exc
    props = Properties(
        content_type=CONTENT_TYPE_JSON,
        content_encoding="utf-8",
        message_id=envelope.id,
        correlation_id=envelope.correlation_id or envelope.id,
        reply_to=envelope.reply_to,
        priority=envelope.priority,
        headers=headers,
        delivery_mode=2,
    )
    return data, props


# -- what AMQP properties can carry -----------------------------------------------------------
# Checked before a publish, so a bad value is refused by name instead of failing inside a client
# library's frame encoder. The limits are the intersection of what both our clients encode:
# pika (the sync publisher, the worker's consumer) and pamqp (aio-pika's encoder).
SHORTSTR_MAX = 255  # AMQP 0-9-1 shortstr: exchange, routing key, message_id, correlation_id
FIELD_NAME_MAX = 128  # AMQP 0-9-1 field names; pamqp truncates a longer header name silently
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_FIELD_TYPES = "str, bytes, bool, int, decimal.Decimal, datetime, None, list or dict"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _utf8_size(value: str, what: str) -> int:
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what} is not encodable as UTF-8 ({exc.reason}): {_short(value)}"
        ) from None


def check_shortstr(value: Any, what: str, *, empty: bool = True) -> str:
    """``value`` if it is a str that fits an AMQP short string (at most 255 bytes of UTF-8).

    ``what`` names the value in the error (``routing_key``, ``task_id``...).
    """
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}: {_short(value)}")
    size = _utf8_size(value, what)
    if size > SHORTSTR_MAX:
        raise ValueError(
            f"{what} is {size} bytes in UTF-8; AMQP allows at most {SHORTSTR_MAX}: {_short(value)}"
        )
    if not empty and not value:
        raise ValueError(f"{what} must not be empty")
    return value


def check_priority(value: Any, what: str = "priority") -> int | None:
    """``value`` if it is None or an int 0..255 (the AMQP ``priority`` octet)."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(
            f"{what} must be an int from 0 to 255, got {type(value).__name__}: {value!r}"
        )
    if not 0 <= value <= 255:
        raise ValueError(f"{what} must be from 0 to 255, got {value}")
    return value


def check_headers(headers: Any, what: str = "headers") -> dict[str, Any]:
    """``headers`` as a dict, if an AMQP field table can carry it through both clients.

    Keys: str of at most 128 bytes of UTF-8. Values: str, bytes, bool, int (signed 64-bit),
    ``decimal.Decimal`` (up to 255 decimal places, 32-bit mantissa), ``datetime`` (from
    1970-01-01 UTC; naive means UTC; sent in whole seconds), None, and lists and dicts of
    these. Not floats: pika, the sync publisher's client, has no float encoding (and pamqp
    would send a 32-bit one). The error names the offending key path, e.g.
    ``headers['tenant']['ids'][2]``.
    """
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise TypeError(
            f"{what} must be a mapping with str keys, got {type(headers).__name__}: "
            f"{_short(headers)}"
        )
    _check_table(headers, what)
    return dict(headers)


def _check_table(table: Mapping[Any, Any], where: str) -> None:
    for key, value in table.items():
        if not isinstance(key, str):
            raise TypeError(f"{where}: key {key!r} must be a str, got {type(key).__name__}")
        size = _utf8_size(key, f"{where}: key")
        if size > FIELD_NAME_MAX:
            raise ValueError(
                f"{where}: key {_short(key)} is {size} bytes in UTF-8; AMQP field names "
                f"hold at most {FIELD_NAME_MAX}"
            )
        _check_field(value, f"{where}[{key!r}]")


def _check_field(value: Any, where: str) -> None:
    if value is None or isinstance(value, (bool, bytes)):
        return
    if isinstance(value, str):
        _utf8_size(value, where)
    elif isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ValueError(f"{where} = {value} does not fit in a signed 64-bit integer")
    elif isinstance(value, float):
        raise TypeError(
            f"{where} is a float ({value!r}); AMQP headers sent by amqptasks cannot carry "
            "floats (pika has no float encoding): send a str or a decimal.Decimal"
        )
    elif isinstance(value, Decimal):
        if not value.is_finite() or not all(_decimal_fits(d) for d in (value, value.normalize())):
            raise ValueError(
                f"{where} = {value}: an AMQP decimal holds a finite value with at most 255 "
                "decimal places and a 32-bit signed mantissa"
            )
    elif isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
        if aware < _EPOCH:
            raise ValueError(
                f"{where} = {value.isoformat()}: AMQP timestamps start at 1970-01-01 UTC"
            )
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_field(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        _check_table(value, where)
    else:
        hint = " (use a list)" if isinstance(value, tuple) else ""
        raise TypeError(
            f"{where} has type {type(value).__name__} ({_short(value)}), which an AMQP field "
            f"table cannot carry{hint}; allowed: {_FIELD_TYPES}"
        )


def _decimal_fits(value: Decimal) -> bool:
    """Whether ``value`` encodes as an AMQP decimal (scale octet + signed 32-bit mantissa) the
    way pika and pamqp compute it (pika normalises first, pamqp does not: both are checked)."""
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)  # finite
    scale, mantissa = (0, int(value)) if exponent > 0 else (-exponent, int(value.scaleb(-exponent)))
    return 0 <= scale <= 255 and _INT32_MIN <= mantissa <= _INT32_MAX


def message_id_of(body: bytes, props: Properties) -> str | None:
    """The id :func:`decode` would give this message, without decoding it in full: the body's
    ``id`` (a JSON object's non-empty string field), else the ``message_id`` property, else
    None (:func:`decode` would then generate one).

    For the paths that must name a message that may not decode (dead-lettering, ``amqptasks
    dlq``), so logs, ``dlq list``/``show`` and replay agree on one id.
    """
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    body_id = obj.get("id") if isinstance(obj, dict) else None
    if isinstance(body_id, str) and body_id:
        return body_id
    return props.message_id or None


# -- replies ---------------------------------------------------------------------------------
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"


@dataclass(frozen=True, slots=True)
class Reply:
    """The outcome of one task, sent to the caller's ``reply_to`` (see docs/protocol.md)."""

    id: str
    status: str
    task: str = ""
    result: Any = None
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None
    #: The dead-letter reason when the message was settled without running (``unknown-task``,
    #: ``expired``, ...); None when the task ran.
    reason: str | None = None


def encode_reply(reply: Reply) -> bytes:
    """The documented reply body. A result that is not JSON-serialisable becomes a FAILURE.

    A FAILURE without an error type is sent as ``TaskError`` (and a missing message as ``""``),
    so the body always matches schema/reply-v1.json.
    """
    obj: dict[str, Any] = {"id": reply.id, "task": reply.task, "status": reply.status}
    if reply.status == SUCCESS:
        obj["result"] = reply.result
    else:
        obj["error"] = {
            "type": reply.error_type or "TaskError",
            "message": reply.error_message if reply.error_message is not None else "",
            "traceback": reply.traceback,
        }
        if reply.reason is not None:
            obj["error"]["reason"] = reply.reason
    try:
        return dumps(obj)
    except TypeError as exc:
        return dumps(
            {
                "id": reply.id,
                "task": reply.task,
                "status": FAILURE,
                "error": {
                    "type": "EncodeError",
                    "message": f"result of type {type(reply.result).__name__} is not "
                    f"JSON-serialisable: {exc}",
                    "traceback": None,
                },
            }
        )


def decode_reply(body: bytes) -> Reply:
    obj = loads(body)
    if not isinstance(obj, dict) or obj.get("status") not in (SUCCESS, FAILURE):
        raise DecodeError("reply must be a JSON object with status SUCCESS or FAILURE")
    error = obj.get("error") or {}
    if not isinstance(error, dict):
        raise DecodeError("reply field 'error' must be a JSON object")
    return Reply(
        id=str(obj.get("id", "")),
        status=obj["status"],
        task=str(obj.get("task", "")),
        result=obj.get("result"),
        error_type=error.get("type"),
        error_message=error.get("message"),
        traceback=error.get("traceback"),
        reason=error.get("reason"),
    )


# -- dead letters ----------------------------------------------------------------------------
DL_PREFIX = "x-amqptasks-"
#: Every ``x-amqptasks-reason`` a worker writes; docs/protocol.md section 8 explains each in
#: one table (a test keeps the two equal) and the worker refuses to write any other.
DEAD_LETTER_REASONS = frozenset(
    {
        "too-large",
        "decode-error",
        "content-type-refused",
        "unknown-task",
        "expired",
        "task-failed",
        "time-limit",
        "worker-lost",
        "workflow-error",
        "celery-unsupported",
    }
)
#: Header prefixes RabbitMQ adds when it dead-letters a message. A republished copy (a retry,
#: a replay) must not carry them, or the broker's cycle detection drops the copy when it
#: passes a delay level it passed before.
BROKER_DEATH_HEADERS = ("x-death", "x-first-death-", "x-last-death-")
TRACEBACK_LIMIT = 8192


def dead_letter_properties(
    props: Properties,
    *,
    reason: str,
    detail: str,
    queue: str,
    exchange: str,
    routing_key: str,
    hostname: str,
    failed_at: datetime,
    exc_type: str | None = None,
    exc_message: str | None = None,
    traceback: str | None = None,
    attempts: int = 1,
    message_id: str | None = None,
) -> Properties:
    """The original properties plus the documented ``x-amqptasks-*`` dead-letter headers.

    The body is never changed, so a replay republishes exactly what the producer sent.
    ``message_id`` is the id the worker gave the message (and logged): it becomes the copy's
    ``message_id`` when the original has none, so an id the worker had to generate stays the
    message's id in ``amqptasks dlq list``/``show`` and after a replay.
    """
    headers = dict(props.headers or {})
    first = headers.get(DL_PREFIX + "first-failed-at") or failed_at.isoformat()
    headers.update(
        {
            DL_PREFIX + "reason": reason,
            DL_PREFIX + "detail": detail[:TRACEBACK_LIMIT],
            DL_PREFIX + "queue": queue,
            # A message that travelled through delay levels arrives from the delay exchange;
            # the route it was first published to travels in these headers and wins.
            DL_PREFIX + "original-exchange": headers.get(DL_PREFIX + "original-exchange", exchange),
            DL_PREFIX + "original-routing-key": headers.get(
                DL_PREFIX + "original-routing-key", routing_key
            ),
            DL_PREFIX + "worker": hostname,
            DL_PREFIX + "attempts": attempts,
            DL_PREFIX + "first-failed-at": first,
            DL_PREFIX + "last-failed-at": failed_at.isoformat(),
        }
    )
    if exc_type is not None:
        headers[DL_PREFIX + "exception-type"] = exc_type
        headers[DL_PREFIX + "exception-message"] = (exc_message or "")[:TRACEBACK_LIMIT]
    if traceback is not None:
        headers[DL_PREFIX + "traceback"] = traceback[-TRACEBACK_LIMIT:]
    return replace(
        props,
        headers=headers,
        delivery_mode=2,
        message_id=props.message_id or message_id or None,
    )
