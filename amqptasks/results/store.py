"""The result-store seam: the :class:`ResultStore` protocol every store implements, the
:class:`ChordProgress` value ``chord_add`` returns, and the rules all stores share. Pure.

A store is one module beside this one (``sqlite.py``, ``redis.py``); a PostgreSQL store would
be one more (``postgres.py``) implementing these methods, with ``store_from_url`` in
``results/__init__.py`` learning its scheme. Nothing else in the package changes. Notes for
such a module, from the two that exist:

* ``save`` is one transaction per batch; the "ready wins" rule (:func:`replaceable`) is
  applied inside it, against the row as it is *in* the transaction (``SELECT ... FOR
  UPDATE``, or ``INSERT ... ON CONFLICT DO UPDATE ... WHERE`` the stored status is not ready).
* ``chord_add`` is one transaction: insert the member row if its ``(chord_id, index)`` is new
  (a unique key makes the first writer win), count the members, read the first failure.
* ``wait`` must not busy-poll: PostgreSQL has ``LISTEN``/``NOTIFY`` (notify in the saving
  transaction, listen, then read, then wait), the same shape as the Redis store.
* Expired rows are really deleted by ``purge_expired``; reads ignore rows past their expiry.

The methods are synchronous: the worker calls them from one writer thread of its own (and
batches), callers from their own threads. Every store is safe to use from several threads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from .meta import READY_STATES, SUCCESS, ResultMeta, StoredRecord

__all__ = [
    "DEFAULT_EXPIRES",
    "ChordMember",
    "ChordProgress",
    "ResultStore",
    "check_chord_member",
    "check_expires",
    "replaceable",
]

#: Seconds a record lives unless configured otherwise (``results.expires``): one day.
DEFAULT_EXPIRES = 86400.0
#: One ``chord_add`` call's arguments: (chord_id, size, index, meta).
ChordMember = tuple[str, int, int, ResultMeta]


@dataclass(frozen=True, slots=True, kw_only=True)
class ChordProgress:
    """A chord's accounting after one ``chord_add`` call.

    ``done`` is the number of distinct members recorded, ``complete`` is ``done == size``.
    ``failed`` is the record of the first member recorded that did not succeed (FAILURE or
    REVOKED), else None. ``results`` holds the members' results in index order, only when the
    chord is complete and none failed (else None). ``body_sent`` tells whether some caller
    already won :meth:`ResultStore.chord_mark_body_sent`. ``recorded`` is True when *this*
    call recorded its member (False for a duplicate of an index already recorded).
    """

    done: int
    size: int
    complete: bool
    failed: ResultMeta | None
    results: list[Any] | None
    body_sent: bool
    recorded: bool


@runtime_checkable
class ResultStore(Protocol):
    """Where results outlive the caller. See docs/results.md for what each store promises."""

    #: The URL as configured; ``repr()`` of a store redacts its password.
    url: str
    #: Seconds each saved record (and group, and chord) lives; None keeps them forever.
    expires: float | None

    def save(self, metas: Sequence[StoredRecord]) -> None:
        """Write a batch atomically (all or nothing), in order.

        Each item is a :class:`ResultMeta` or an :class:`EncodedRecord` (the worker's fast
        path): a store reads only ``.id``, ``.status`` and ``.to_json()``.

        A READY record is never replaced: neither by a non-ready one (a late STARTED or RETRY
        must not hide a SUCCESS) nor by another READY one (the first outcome wins; a duplicate
        run's outcome is dropped). A write that lands restarts the record's ``expires``.
        """
        ...

    def get(self, task_id: str) -> ResultMeta | None:
        """The record, or None (never written, forgotten, or expired)."""
        ...

    def get_many(self, task_ids: Sequence[str]) -> list[ResultMeta | None]:
        """Records in the order of ``task_ids`` (None where missing), in one round trip."""
        ...

    def forget(self, task_ids: Sequence[str]) -> None:
        """Remove records (missing ids are fine)."""
        ...

    def wait(self, task_ids: Sequence[str], timeout: float | None) -> bool:
        """Block until every id is READY (True) or ``timeout`` seconds pass (False).

        ``None`` waits forever. Never a busy loop of reads: see docs/results.md for how each
        store learns that a record landed.
        """
        ...

    def save_group(self, group_id: str, task_ids: Sequence[str]) -> None:
        """Remember a group's member ids (in order), for ``expires`` seconds."""
        ...

    def get_group(self, group_id: str) -> list[str] | None:
        """A group's member ids, or None."""
        ...

    def chord_add(self, chord_id: str, size: int, index: int, meta: ResultMeta) -> ChordProgress:
        """Record member ``index`` (0 <= index < size) of a chord of ``size`` members.

        Atomic and idempotent per ``(chord_id, index)``: the first record for an index wins;
        another call for the same index changes nothing but reports progress. ``meta`` must
        be READY. Exactly ``size`` calls in a chord's life return ``recorded=True``, and their
        ``done`` values are 1..size, each once; so exactly one call records the member that
        completes it. Several calls may *see* ``complete=True`` (duplicates after the end):
        decide who sends the body with :meth:`chord_mark_body_sent`, not from ``complete``.
        """
        ...

    # Optional: ``chord_add_many(members: Sequence[ChordMember]) -> list[ChordProgress |
    # ValueError]`` — several chord_add calls in one round trip or transaction, each with the
    # same meaning; a member refused with ValueError is answered alone. The worker's store
    # thread uses it for the chord adds queued together when the store has it.

    def chord_mark_body_sent(self, chord_id: str, token: str | None = None) -> bool:
        """Set the chord's body-sent flag; True for the call that set it, False after.

        ``token`` makes the call repeatable: a call with the token that set the flag gets True
        again. Pass the id of the member message that completed the chord, so the same
        message redelivered after a crash (before the body was published) may still send it.
        """
        ...

    def purge_expired(self, now: datetime | None = None) -> int:
        """Really remove what has expired (records, groups, chords); the count removed."""
        ...

    def stats(self) -> dict[str, int]:
        """Counts of what is stored (keys or rows per kind), for tests and dashboards."""
        ...

    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""
        ...


def replaceable(stored_status: str | None) -> bool:
    """May a save replace a record stored with ``stored_status`` (None: no record)? The rule
    every store applies inside its save transaction: nothing replaces a READY record (the
    first outcome wins, and a late STARTED or RETRY cannot hide it); anything replaces the
    rest. The Redis store's Lua script spells the same rule."""
    return stored_status is None or stored_status not in READY_STATES


def check_expires(expires: float | None) -> float | None:
    """A positive finite number of seconds, or None (keep forever); ValueError otherwise."""
    if expires is None:
        return None
    if isinstance(expires, bool) or not isinstance(expires, (int, float)):
        raise ValueError(f"expires must be a number of seconds or None, got {expires!r}")
    if not math.isfinite(expires) or expires <= 0:
        raise ValueError(f"expires must be a positive number of seconds, got {expires!r}")
    return float(expires)


def check_chord_member(chord_id: str, size: int, index: int, meta: ResultMeta) -> bool:
    """Validate a ``chord_add`` call; returns whether the member failed (not SUCCESS)."""
    if not chord_id:
        raise ValueError("chord id must be a non-empty string")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"chord {chord_id!r}: size must be a positive integer, got {size!r}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < size:
        raise ValueError(f"chord {chord_id!r}: index must be in 0..{size - 1}, got {index!r}")
    if not meta.ready:
        raise ValueError(
            f"chord {chord_id!r}: member {index} ({meta.id}) is {meta.status}; "
            "only a READY record (SUCCESS, FAILURE, REVOKED) can be added"
        )
    return meta.status != SUCCESS
