"""Result handles: :class:`AsyncResult` for one task, :class:`GroupResult` for a group.

A handle reads from a :class:`ResultBackend`: this process's direct reply-to collector (the
``rpc`` path) and the result store, when one is configured. How ``get()`` waits, in order:

1. a handle made by ``delay()`` in this process waits for the reply the worker sends to the
   caller — the fastest way, no store read at all (the worker writes the store before it
   replies, so the two always agree);
2. when there is no reply to wait for (a handle restored by id in another process, or a reply
   that cannot come because the caller's reply channel was lost), it waits on the store:
   Redis subscriptions, SQLite's change counter (docs/results.md) — never a read loop.

With ``results.backend: rpc://`` only the first exists: a handle restored by id raises
:class:`~amqptasks.errors.ResultsUnavailable` instead of waiting for nothing.

No type named in a result is ever imported: failures are re-raised as
:class:`~amqptasks.errors.TaskError` subclasses named after the remote type
(:func:`~amqptasks.results.rpc.remote_error`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

from ..errors import ResultsDisabled, ResultsUnavailable, ResultTimeout
from ..protocol import Reply
from .meta import FAILURE, PENDING, READY_STATES, REVOKED, SUCCESS, ResultMeta
from .rpc import ResultCollector, _State, remote_error
from .store import ResultStore

__all__ = ["AsyncResult", "GroupResult", "ResultBackend"]


#: ``revoke(ids, terminate=, expires=, timeout=)``: the application's ``control.revoke``.
Revoke = Callable[..., Any]


class ResultBackend:
    """Where the handles of one application read results: rpc replies and the store; and
    how they revoke (the application's control client, for ``AsyncResult.revoke``)."""

    def __init__(
        self,
        collector: ResultCollector,
        store: ResultStore | None,
        url: str,
        revoke: Revoke | None = None,
    ) -> None:
        self.collector = collector
        self.store = store
        self.url = url
        self.revoke = revoke

    def require_store(self, what: str) -> ResultStore:
        if self.store is None:
            raise ResultsUnavailable(
                f"{what} needs a result store, and results.backend is {self.url!r} (direct "
                "reply-to reaches only the publishing process): set it to sqlite:///PATH "
                "(one host) or redis://HOST:PORT/DB (many hosts)"
            )
        return self.store


def _hear(state: _State, deadline: float | None, *, wait_on: bool) -> Reply | None:
    """The reply, if it comes before ``deadline``. Woken with no reply (a connection that
    carried replies closed: :meth:`ResultCollector.lost`), it gives up at once when the
    caller has a store to read instead; without one (``wait_on``) it goes on waiting for the
    rest of the time: the reply may have been due on another connection that is still open."""
    while state.event.wait(_left(deadline)):
        if state.reply is not None:
            return state.reply
        if not wait_on:
            return None
        state.event.clear()
        if state.reply is not None:  # delivered between the wake and the clear
            return state.reply
    return None


def _status(record: Reply | ResultMeta) -> str:
    """A record's state. The reply of a revoked task says FAILURE with reason ``revoked`` (the
    reply format knows only SUCCESS and FAILURE) where the store says REVOKED: a caller's
    handle and ``AsyncResult(id)`` in another process must agree, so both read REVOKED."""
    if record.status == FAILURE and isinstance(record, Reply) and record.reason == "revoked":
        return REVOKED
    return record.status


def _revoker(backend: ResultBackend | None, what: str) -> Revoke:
    if backend is None or backend.revoke is None:
        raise ResultsUnavailable(f"{what}: this handle has no application to revoke through")
    return backend.revoke


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class AsyncResult:
    """One task's result: ``.id``, ``.state``, ``.ready()``, ``.get(timeout=)``, ``.forget()``.

    ``parent`` is the previous step of a chain (``chain(...)()`` returns the last step's
    handle); for a handle restored by id it is read from the stored record's ``parent_id``.
    """

    def __init__(
        self,
        task_id: str,
        task: str = "",
        state: _State | None = None,
        *,
        backend: ResultBackend | None = None,
        parent: AsyncResult | None = None,
        ignored: bool = False,
    ) -> None:
        self.id = task_id
        self.task = task
        self._state = state
        self._backend = backend
        self._parent = parent
        self._ignored = ignored

    def __repr__(self) -> str:
        return f"<AsyncResult {self.task or '?'}[{self.id}] {self.state}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AsyncResult) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    # -- reading --------------------------------------------------------------------------------
    def _reply(self) -> Reply | None:
        return self._state.reply if self._state is not None else None

    def _stored(self) -> ResultMeta | None:
        store = self._backend.store if self._backend is not None else None
        return store.get(self.id) if store is not None else None

    def _record(self) -> Reply | ResultMeta | None:
        """The outcome known now: the reply if it came, else the stored record."""
        reply = self._reply()
        return reply if reply is not None else self._stored()

    @property
    def state(self) -> str:
        """PENDING, STARTED, RETRY, SUCCESS, FAILURE or REVOKED."""
        record = self._record()
        return _status(record) if record is not None else PENDING

    status = state

    def ready(self) -> bool:
        return self.state in READY_STATES

    def successful(self) -> bool:
        return self.state == SUCCESS

    def failed(self) -> bool:
        return self.state == FAILURE

    @property
    def result(self) -> Any:
        """The return value (SUCCESS), the error as an exception (FAILURE), else None."""
        record = self._record()
        if record is None:
            return None
        if record.status == SUCCESS:
            return record.result
        if record.status in READY_STATES:
            return remote_error(record)
        return None

    @property
    def traceback(self) -> str | None:
        record = self._record()
        return record.traceback if record is not None else None

    @property
    def date_done(self) -> datetime | None:
        stored = self._stored()
        return stored.date_done if stored is not None else None

    @property
    def parent(self) -> AsyncResult | None:
        if self._parent is None:
            stored = self._stored()
            if stored is not None and stored.parent_id:
                self._parent = AsyncResult(stored.parent_id, backend=self._backend)
        return self._parent

    # -- waiting --------------------------------------------------------------------------------
    def get(self, timeout: float | None = 30.0, *, propagate: bool = True) -> Any:
        """Wait for the outcome; return the result or raise the task's error.

        Raises :class:`ResultTimeout` after ``timeout`` seconds (``None`` waits forever — not
        recommended: a worker may never run the task), :class:`ResultsDisabled` for a task that
        keeps no result, :class:`ResultsUnavailable` for a handle that can neither hear a reply
        nor read a store.
        """
        record = self._wait(timeout)
        if record.status == SUCCESS:
            return record.result
        err = remote_error(record)
        if propagate:
            raise err
        return err

    def _wait(self, timeout: float | None) -> Reply | ResultMeta:
        if self._ignored:
            raise ResultsDisabled(
                f"task {self.task!r} ignores results (ignore_result): none is kept or sent"
            )
        deadline = _deadline(timeout)
        store = self._backend.store if self._backend is not None else None
        state = self._state
        if state is not None:
            reply = _hear(state, deadline, wait_on=store is None)
            if reply is not None:
                return reply
        if store is None:
            if state is None:
                url = self._backend.url if self._backend is not None else "rpc://"
                raise ResultsUnavailable(
                    f"the result of {self.id} cannot be read here: results.backend is {url!r}, "
                    "so only the process that published the task receives it (configure "
                    "sqlite:///PATH or redis://HOST:PORT/DB)"
                )
            raise ResultTimeout(f"no result for task {self.task!r} id {self.id} within {timeout}s")
        # No reply heard: the store knows (a reply can be lost with the caller's channel).
        stored = store.get(self.id)
        if stored is None or not stored.ready:
            store.wait([self.id], _left(deadline))
            stored = store.get(self.id)
        if stored is None or not stored.ready:
            raise ResultTimeout(
                f"no result for task {self.task or '?'!r} id {self.id} within {timeout}s"
            )
        return stored

    def forget(self) -> None:
        """Remove the stored result (a no-op for the rpc backend)."""
        if self._backend is not None and self._backend.store is not None:
            self._backend.store.forget([self.id])

    def revoke(
        self, *, terminate: bool = False, expires: float | None = None, timeout: float = 1.0
    ) -> Any:
        """Revoke this task (Celery's ``AsyncResult.revoke``): it never starts on any worker
        until the revocation expires; ``terminate`` also stops it where it runs now. Returns
        the workers' answers (``app.control.revoke``, docs/control.md)."""
        return _revoker(self._backend, self.id)(
            [self.id], terminate=terminate, expires=expires, timeout=timeout
        )


class GroupResult:
    """The results of a group, in order: ``get()`` returns the list of member results.

    Saved in the store when the group is applied, so ``app.GroupResult(id)`` restores it in
    another process.
    """

    def __init__(
        self,
        group_id: str,
        results: Sequence[AsyncResult],
        *,
        backend: ResultBackend | None = None,
    ) -> None:
        self.id = group_id
        self.results = list(results)
        self._backend = backend

    def __repr__(self) -> str:
        return f"<GroupResult {self.id} {self.completed_count()}/{len(self.results)}>"

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[AsyncResult]:
        return iter(self.results)

    def __getitem__(self, index: int) -> AsyncResult:
        return self.results[index]

    def _states(self) -> list[str]:
        store = self._backend.store if self._backend is not None else None
        missing = [r for r in self.results if r._reply() is None]
        stored: dict[str, ResultMeta] = {}
        if store is not None and missing:
            for meta in store.get_many([r.id for r in missing]):
                if meta is not None:
                    stored[meta.id] = meta
        out = []
        for r in self.results:
            reply = r._reply()
            record = reply if reply is not None else stored.get(r.id)
            out.append(_status(record) if record is not None else PENDING)
        return out

    def completed_count(self) -> int:
        """How many members succeeded."""
        return sum(1 for s in self._states() if s == SUCCESS)

    def ready(self) -> bool:
        return all(s in READY_STATES for s in self._states())

    def successful(self) -> bool:
        return all(s == SUCCESS for s in self._states())

    def failed(self) -> bool:
        return any(s == FAILURE for s in self._states())

    def waiting(self) -> bool:
        return not self.ready()

    def get(self, timeout: float | None = 30.0, *, propagate: bool = True) -> list[Any]:
        """Every member's result, in order (one shared ``timeout``); the first failure is
        raised when ``propagate``, else failures are returned in place as exceptions."""
        deadline = _deadline(timeout)
        heard = [r for r in self.results if r._state is not None]
        for r in heard:
            r._state.event.wait(_left(deadline))  # type: ignore[union-attr]
        store = self._backend.store if self._backend is not None else None
        unheard = [r for r in self.results if r._reply() is None]
        if unheard and store is not None:
            store.wait([r.id for r in unheard], _left(deadline))
        return [r.get(timeout=_left(deadline), propagate=propagate) for r in self.results]

    join = get

    def forget(self) -> None:
        for r in self.results:
            r.forget()
        # the group record expires with the store's expiry

    def revoke(
        self, *, terminate: bool = False, expires: float | None = None, timeout: float = 1.0
    ) -> Any:
        """Revoke every member (one revocation for all of them)."""
        return _revoker(self._backend, f"group {self.id}")(
            [r.id for r in self.results], terminate=terminate, expires=expires, timeout=timeout
        )

    def save(self) -> None:
        """Store the member ids (done for you when the group is applied)."""
        if self._backend is None:
            raise ResultsUnavailable("this GroupResult has no backend to save to")
        store = self._backend.require_store("saving a group result")
        store.save_group(self.id, [r.id for r in self.results])

    @classmethod
    def restore(cls, group_id: str, backend: ResultBackend) -> GroupResult:
        """The group saved under ``group_id`` (KeyError-free: raises ResultsUnavailable)."""
        store = backend.require_store("restoring a group result by id")
        ids = store.get_group(group_id)
        if ids is None:
            raise ResultsUnavailable(
                f"no group {group_id!r} in the result store (never saved, or expired)"
            )
        return cls(group_id, [AsyncResult(i, backend=backend) for i in ids], backend=backend)
