"""The stored result record (:class:`ResultMeta`), the task states, and their JSON form. Pure.

A record is what a result store keeps per task id and what another process (a web request
asking "is it done?", a chord's accounting) reads back. Its JSON form is a contract between
processes, so it is documented (docs/results.md) and schema'd (``schema/result-v1.json``);
tests check real records against the schema. Only what is set is written, so a STARTED
record is a few dozen bytes.

Results are JSON values — what the task returned, already JSON-safe. Nothing is ever pickled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..errors import DecodeError
from ..protocol import FAILURE, SUCCESS, dumps, loads, parse_time

__all__ = [
    "FAILURE",
    "PENDING",
    "READY_STATES",
    "RETRY",
    "REVOKED",
    "STARTED",
    "STATES",
    "SUCCESS",
    "EncodedRecord",
    "ResultMeta",
    "StoredRecord",
    "encode_success",
    "utcnow",
]

#: No record yet: the task was not seen by a worker (or its record expired or was forgotten).
#: Never stored: it is what a reader reports for a missing record.
PENDING = "PENDING"
#: A worker started the task.
STARTED = "STARTED"
#: The task failed and a retry copy was published; it will run again.
RETRY = "RETRY"
#: The task was revoked before it ran (``reason`` says "revoked").
REVOKED = "REVOKED"
#: Every state a record can carry (PENDING included, for readers that build one).
STATES = frozenset({PENDING, STARTED, RETRY, SUCCESS, FAILURE, REVOKED})
#: States that end a task: a record in one of them is never replaced (see ResultStore.save).
READY_STATES = frozenset({SUCCESS, FAILURE, REVOKED})

_OPTIONAL_TEXT = (
    "task",
    "error_type",
    "error_message",
    "traceback",
    "reason",
    "worker",
    "parent_id",
    "root_id",
    "group_id",
)
_OFFSET = re.compile(r"(Z|[+-][0-9]{2}:[0-9]{2})$")
_FIELDS = frozenset({"id", "status", "result", "date_done", "retries", "children", *_OPTIONAL_TEXT})


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultMeta:
    """One task's stored outcome (or progress).

    ``date_done`` must be timezone-aware and is kept in UTC (a naive datetime is refused: its
    zone would be a guess). ``result`` is a JSON value and is written for SUCCESS records
    (``null`` included) and for any other record that carries one.
    """

    id: str
    status: str
    task: str | None = None
    result: Any = None
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None
    #: Why the task did not run or ended as it did: a dead-letter reason (``unknown-task``,
    #: ``expired``...) or ``revoked``.
    reason: str | None = None
    date_done: datetime | None = None
    retries: int = 0
    #: Host name (or node name) of the worker that wrote the record.
    worker: str | None = None
    parent_id: str | None = None
    root_id: str | None = None
    group_id: str | None = None
    children: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"result record: 'id' must be a non-empty string, got {self.id!r}")
        if self.status not in STATES or self.status == PENDING:
            raise ValueError(
                f"result record {self.id!r}: 'status' must be one of "
                f"{', '.join(sorted(STATES - {PENDING}))}, got {self.status!r}"
            )
        if self.date_done is not None:
            if self.date_done.utcoffset() is None:
                raise ValueError(
                    f"result record {self.id!r}: 'date_done' must be timezone-aware "
                    f"(got naive {self.date_done.isoformat()})"
                )
            object.__setattr__(self, "date_done", self.date_done.astimezone(timezone.utc))
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(
                f"result record {self.id!r}: 'retries' must be a non-negative integer, "
                f"got {self.retries!r}"
            )
        if not isinstance(self.children, tuple):
            object.__setattr__(self, "children", tuple(self.children))

    @property
    def ready(self) -> bool:
        """The task has ended (SUCCESS, FAILURE or REVOKED)."""
        return self.status in READY_STATES

    def to_dict(self) -> dict[str, Any]:
        """The documented JSON object (schema/result-v1.json): only the fields that are set."""
        obj: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.status == SUCCESS or self.result is not None:
            obj["result"] = self.result
        for name in _OPTIONAL_TEXT:
            value = getattr(self, name)
            if value is not None:
                obj[name] = value
        if self.date_done is not None:
            obj["date_done"] = self.date_done.isoformat()
        if self.retries:
            obj["retries"] = self.retries
        if self.children:
            obj["children"] = list(self.children)
        return obj

    def to_json(self) -> bytes:
        """UTF-8 JSON of :meth:`to_dict`; a result that is not JSON-safe raises ValueError
        naming the record (a store never falls back to pickle)."""
        try:
            return dumps(self.to_dict())
        except TypeError as exc:
            raise ValueError(
                f"result record {self.id!r}: result of type {type(self.result).__name__} "
                f"is not JSON-serialisable: {exc}"
            ) from exc

    @classmethod
    def from_dict(cls, obj: Any) -> ResultMeta:
        """Validate a decoded record the way schema/result-v1.json does; ValueError names the
        record id and the bad field."""
        if not isinstance(obj, dict):
            raise ValueError(f"result record must be a JSON object, got {type(obj).__name__}")
        rid = obj.get("id")
        label = f"result record {rid!r}" if isinstance(rid, str) else "result record"
        unknown = sorted(set(obj) - _FIELDS)
        if unknown:
            raise ValueError(f"{label}: unknown field(s) {', '.join(map(repr, unknown))}")
        for name in ("id", "status", *_OPTIONAL_TEXT):
            if (name in obj or name in ("id", "status")) and not isinstance(obj.get(name), str):
                raise ValueError(f"{label}: {name!r} must be a string, got {obj.get(name)!r}")
        if obj["status"] == SUCCESS and "result" not in obj:
            raise ValueError(f"{label}: a SUCCESS record must carry 'result'")
        date_done = None
        if "date_done" in obj:
            raw = obj["date_done"]
            if not isinstance(raw, str) or not _OFFSET.search(raw):
                raise ValueError(
                    f"{label}: 'date_done' must be an RFC 3339 time with an offset, got {raw!r}"
                )
            try:
                date_done = parse_time(raw, "date_done")
            except DecodeError as exc:
                raise ValueError(f"{label}: {exc}") from exc
        retries = obj.get("retries", 0)
        if isinstance(retries, bool) or not isinstance(retries, int):
            raise ValueError(f"{label}: 'retries' must be an integer, got {retries!r}")
        children = obj.get("children", [])
        if not isinstance(children, list) or not all(isinstance(c, str) for c in children):
            raise ValueError(f"{label}: 'children' must be a list of ids, got {children!r}")
        return cls(
            id=obj["id"],
            status=obj["status"],
            result=obj.get("result"),
            date_done=date_done,
            retries=retries,
            children=tuple(children),
            **{name: obj.get(name) for name in _OPTIONAL_TEXT},
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> ResultMeta:
        """Parse :meth:`to_json` output; ValueError (never a silent default) on anything else."""
        try:
            obj = loads(data)
        except DecodeError as exc:
            raise ValueError(f"result record is not valid JSON: {exc}") from exc
        return cls.from_dict(obj)


def utcnow() -> datetime:
    """The current time in UTC, for ``date_done``."""
    return datetime.now(timezone.utc)


class EncodedRecord:
    """A record already in its stored form (:meth:`ResultMeta.to_json`'s bytes), with the two
    fields a store's ``save`` reads beside them.

    Why it exists: the worker writes one SUCCESS per task on its fast path, and building a
    frozen, validated :class:`ResultMeta` (15 fields set through ``object.__setattr__``, a
    ``__post_init__``, ``to_dict``, and the result serialised twice — once to check it) was
    about a fifth of a no-op worker's CPU with a store configured. :func:`encode_success`
    builds the same JSON from the values the worker already has, in one ``dumps``.
    """

    __slots__ = ("_json", "id", "status")

    def __init__(self, id: str, status: str, json: bytes) -> None:
        self.id = id
        self.status = status
        self._json = json

    def to_json(self) -> bytes:
        return self._json

    def __repr__(self) -> str:
        return f"EncodedRecord(id={self.id!r}, status={self.status!r})"


#: What a store's ``save`` takes: a record, or one already encoded.
StoredRecord = ResultMeta | EncodedRecord


def encode_success(
    task_id: str,
    result: Any,
    *,
    task: str | None,
    worker: str | None,
    retries: int = 0,
    parent_id: str | None = None,
    root_id: str | None = None,
    group_id: str | None = None,
) -> EncodedRecord:
    """A SUCCESS record dated now, as :meth:`ResultMeta.to_json` would write it.

    Raises TypeError when ``result`` is not JSON-safe (the caller stores an EncodeError
    FAILURE instead, as it does for a :class:`ResultMeta`).
    """
    obj: dict[str, Any] = {"id": task_id, "status": SUCCESS, "result": result}
    if task is not None:
        obj["task"] = task
    if worker is not None:
        obj["worker"] = worker
    if parent_id is not None:
        obj["parent_id"] = parent_id
    if root_id is not None:
        obj["root_id"] = root_id
    if group_id is not None:
        obj["group_id"] = group_id
    obj["date_done"] = datetime.now(timezone.utc).isoformat()
    if retries:
        obj["retries"] = retries
    return EncodedRecord(task_id, SUCCESS, dumps(obj))
