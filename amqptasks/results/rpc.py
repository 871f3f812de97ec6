"""Result handles over AMQP direct reply-to (the ``rpc`` backend: no extra infrastructure).

A publisher that wants a reply sets ``reply_to = amq.rabbitmq.reply-to`` on a channel that
consumes that pseudo-queue; the worker answers through the default exchange with the request's
``correlation_id``. :class:`ResultCollector` matches replies to waiting :class:`AsyncResult`s.
Replies are not stored: a handle dropped (or a process restarted) before the reply arrives
means the reply is discarded — that is the rpc contract, documented in docs/results.md.

Remote errors are re-raised as :class:`TaskError` subclasses *named* after the remote type.
No type named in a message is ever imported; builtin exception types are mixed in (they are
already loaded), so ``except ZeroDivisionError`` works for the common cases.
"""

from __future__ import annotations

import builtins
import threading
import weakref
from typing import Protocol

from .. import errors
from ..errors import TaskError
from ..protocol import FAILURE, Reply, decode_reply

__all__ = ["RemoteFailure", "ResultCollector", "remote_error"]


class RemoteFailure(Protocol):
    """What :func:`remote_error` reads: a :class:`~amqptasks.protocol.Reply` (rpc) and a
    stored :class:`~amqptasks.results.meta.ResultMeta` both have these fields, so a failure
    read from a store raises exactly the error a failure replied over AMQP does."""

    @property
    def error_type(self) -> str | None: ...

    @property
    def error_message(self) -> str | None: ...

    @property
    def traceback(self) -> str | None: ...


class _State:
    """What one handle waits on; owned by the handle, looked up weakly by the collector."""

    __slots__ = ("__weakref__", "event", "reply")

    def __init__(self) -> None:
        #: Set when the reply came, or when a connection that carried replies closed before
        #: it did (the reply may never come: ``reply`` is still None, the waiter decides).
        self.event = threading.Event()
        self.reply: Reply | None = None


class ResultCollector:
    """Routes replies (by correlation id) to the handles still alive in this process."""

    def __init__(self) -> None:
        self._waiting: weakref.WeakValueDictionary[str, _State] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def expect(self, correlation_id: str) -> _State:
        state = _State()
        with self._lock:
            self._waiting[correlation_id] = state
        return state

    def state_of(self, correlation_id: str) -> _State | None:
        """The state a reply for ``correlation_id`` will be handed to, if one is expected."""
        with self._lock:
            return self._waiting.get(correlation_id)

    def deliver(self, correlation_id: str | None, body: bytes) -> bool:
        """Hand a reply to its handle; False when nobody waits for it (handle dropped)."""
        if correlation_id is None:
            return False
        with self._lock:
            state = self._waiting.pop(correlation_id, None)
        if state is None:
            return False
        try:
            state.reply = decode_reply(body)
        except Exception as exc:  # a malformed reply must still wake the caller
            state.reply = Reply(
                correlation_id,
                FAILURE,
                error_type="DecodeError",
                error_message=f"malformed reply: {exc}",
            )
        state.event.set()
        return True

    def lost(self) -> None:
        """A connection that consumed replies closed: wake every waiter, whose reply may have
        been due on it (direct reply-to replies live and die with their channel). A waiter
        with a result store reads it from there; a reply that still comes is still taken."""
        with self._lock:
            states = list(self._waiting.values())
        for state in states:
            state.event.set()

    def pending(self) -> int:
        with self._lock:
            return len(self._waiting)


#: The outcomes a worker reports under one of our own error names: mixed in like builtins
#: (this module is loaded; nothing is imported by name), so ``except TaskRevoked`` around
#: ``get()`` catches a revoked task, ``except TimeLimitExceeded`` one that was stopped.
OWN_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (
        errors.TaskRevoked,
        errors.TaskExpired,
        errors.TimeLimitExceeded,
        errors.SoftTimeLimitExceeded,
        errors.WorkerLost,
        errors.MaxRetriesExceeded,
        errors.TaskNotRegistered,
        errors.DecodeError,
        errors.EncodeError,
        errors.ContentTypeRefused,
        errors.MessageTooLarge,
        errors.CeleryUnsupported,
    )
}


def remote_error(reply: RemoteFailure) -> TaskError:
    """A :class:`TaskError` whose class name is the remote type name (never imported)."""
    name = reply.error_type or "TaskError"
    bases: tuple[type, ...] = (TaskError,)
    builtin = OWN_ERRORS.get(name) or getattr(builtins, name, None)
    if isinstance(builtin, type) and issubclass(builtin, Exception) and builtin is not Exception:
        bases = (TaskError, builtin)
    safe = name if name.isidentifier() else "TaskError"
    args = (name, reply.error_message or "", reply.traceback)
    try:
        err: TaskError = type(safe, bases, {"__module__": "amqptasks.remote"})(*args)
    except (TypeError, ValueError):
        # A builtin whose C layout cannot be mixed in, or whose constructor wants other
        # arguments (UnicodeDecodeError, ExceptionGroup): carry the name on a plain TaskError.
        err = type(safe, (TaskError,), {"__module__": "amqptasks.remote"})(*args)
    return err
