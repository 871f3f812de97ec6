"""Revocations as they are kept in the broker: the records of the revocations stream. Pure.

``app.control.revoke(ids)`` (and ``amqptasks control revoke``) appends one record to the
stream :data:`~amqptasks.topology.REVOCATIONS_QUEUE` before it tells the running workers;
every worker reads the stream from its first offset when it connects and then follows it, so
a revoked id never starts on any worker — one started later included — until the record's
``expires`` passes. A record carries its own expiry: nothing else has to agree on it.

Two record types travel in the stream (UTF-8 JSON objects, ``content_type
application/json``; ``schema/control-v1.json`` ``$defs.revocation`` / ``$defs.marker``):

* ``{"v": 1, "type": "revoke", "ids": [...], "expires": RFC 3339, "time": RFC 3339,
  "by": "host (pid 42)"}`` — these ids must not start before ``expires``;
* ``{"v": 1, "type": "marker", "id": "..."}`` — written by a worker that connects, which
  then reads until it sees its own marker: everything appended before it has been read, and
  only then does it consume work (the stream has no "end" an AMQP 0-9-1 reader can see).

A reader skips records of a type (or version) it does not know, so the format can grow.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .errors import DecodeError
from .events import rfc3339
from .protocol import dumps, loads, parse_time

__all__ = [
    "REVOCATION_VERSION",
    "Marker",
    "Revocation",
    "decode_record",
    "encode_marker",
    "encode_revocation",
]

REVOCATION_VERSION = 1


@dataclass(frozen=True, slots=True)
class Revocation:
    """Task ids that must not start before ``expires`` (POSIX seconds)."""

    ids: tuple[str, ...]
    expires: float
    time: float = 0.0
    by: str = ""

    def expired(self, now: float | None = None) -> bool:
        return self.expires <= (time.time() if now is None else now)


@dataclass(frozen=True, slots=True)
class Marker:
    """A worker's "read up to here" record."""

    id: str


def who() -> str:
    """``host (pid N)``: who revoked, for a person reading the stream."""
    return f"{socket.gethostname()} (pid {os.getpid()})"


def encode_revocation(ids: Iterable[str], expires: float, *, now: float | None = None) -> bytes:
    """The record revoking ``ids`` for ``expires`` seconds from ``now``."""
    now = time.time() if now is None else now
    return dumps(
        {
            "v": REVOCATION_VERSION,
            "type": "revoke",
            "ids": list(ids),
            "expires": rfc3339(now + expires),
            "time": rfc3339(now),
            "by": who(),
        }
    )


def encode_marker(marker_id: str) -> bytes:
    return dumps({"v": REVOCATION_VERSION, "type": "marker", "id": marker_id})


def _epoch(value: Any, key: str) -> float:
    when: datetime = parse_time(value, key)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def decode_record(body: bytes) -> Revocation | Marker | None:
    """A record of the stream; None for a type or version this reader does not know.

    Raises :class:`DecodeError` naming the field for a record that is broken.
    """
    obj = loads(body)
    if not isinstance(obj, dict):
        raise DecodeError("a revocations record must be a JSON object")
    if obj.get("v") != REVOCATION_VERSION:
        return None
    kind = obj.get("type")
    if kind == "marker":
        marker = obj.get("id")
        if not isinstance(marker, str) or not marker:
            raise DecodeError("field 'id' of a marker must be a non-empty string")
        return Marker(marker)
    if kind != "revoke":
        return None
    ids = obj.get("ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
        raise DecodeError("field 'ids' must be a non-empty array of task ids")
    return Revocation(
        tuple(ids),
        _epoch(obj.get("expires"), "expires"),
        _epoch(obj["time"], "time") if obj.get("time") is not None else 0.0,
        str(obj.get("by") or ""),
    )
