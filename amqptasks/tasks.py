"""Tasks: registered functions and the options that travel with them.

A :class:`Task` wraps a function. Calling it runs the function in-process (no broker);
``delay``/``apply_async`` publish a message through the task's application. The task does not
know how publishing works: it asks its owner, anything implementing :class:`Sender`.

``bind=True`` passes a :class:`BoundTask` as the first argument: ``self.request`` (this
execution's id, retries, ...) and ``self.retry(exc=, countdown=, max_retries=)``. A fresh bound
object per execution keeps concurrent executions in threads from seeing each other's request.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from .canvas import MAP_TASK, STARMAP_TASK, Signature, group
from .config import TaskPolicy
from .errors import Retry
from .rate import rate_limit as parse_rate_limit

if TYPE_CHECKING:
    from .results import AsyncResult

__all__ = ["BoundTask", "Request", "Sender", "Task", "task_name"]


class Sender:
    """What a task needs from its application to be published (the App implements it)."""

    def send_task(
        self,
        name: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        raise NotImplementedError

    def send_many(
        self,
        calls: Iterable[tuple[str, Sequence[Any], Mapping[str, Any] | None]],
        **options: Any,
    ) -> list[AsyncResult]:
        raise NotImplementedError

    async def send_task_async(
        self,
        name: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        raise NotImplementedError


def task_name(fn: Callable[..., Any]) -> str:
    """The default task name: ``module.function``."""
    return f"{fn.__module__}.{fn.__qualname__}"


@dataclass(frozen=True, slots=True)
class Request:
    """What a bound task knows about the message it is running."""

    id: str
    task: str
    retries: int = 0
    queue: str = ""
    hostname: str = ""
    headers: dict[str, Any] = field(default_factory=dict)


class Task:
    """A registered function with its delivery policy.

    Policy arguments left as ``None`` are filled from the config's ``tasks`` section, then the
    built-in defaults (see :class:`amqptasks.config.TaskPolicy`). ``acks_early=True`` acks the
    message before running it (at-most-once); the default acks after the outcome is safe.

    ``rate_limit="100/m"`` (``N/s``, ``N/m``, ``N/h``; ``0`` for none) limits how many start per
    second, per worker unless ``rate_limit_scope="fleet"`` (all workers together);
    ``rate_limit_burst`` lets that many start at once after a quiet spell (default 1). A bad
    spelling raises ``ValueError`` here, at import time, naming the task.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        sender: Sender,
        *,
        name: str | None = None,
        bind: bool = False,
        ignore_result: bool | None = None,
        acks_early: bool | None = None,
        max_retries: int | None = None,
        autoretry_for: tuple[type[BaseException], ...] = (),
        retry_backoff: bool | float | None = None,
        retry_backoff_max: float | None = None,
        retry_jitter: bool | None = None,
        default_retry_delay: float | None = None,
        soft_time_limit: float | None = None,
        time_limit: float | None = None,
        track_started: bool | None = None,
        rate_limit: str | float | None = None,
        rate_limit_scope: str | None = None,
        rate_limit_burst: int | None = None,
    ) -> None:
        self.fn = fn
        self.sender = sender
        self.name = name or task_name(fn)
        self.bind = bind
        self.autoretry_for = tuple(autoretry_for)
        backoff = (
            (1.0 if retry_backoff else 0.0) if isinstance(retry_backoff, bool) else retry_backoff
        )
        limit = None
        if rate_limit is not None:
            try:
                limit = parse_rate_limit(rate_limit, rate_limit_scope, rate_limit_burst)
            except ValueError as exc:
                raise ValueError(f"task {self.name}: rate_limit={rate_limit!r}: {exc}") from None
        elif rate_limit_scope is not None or rate_limit_burst is not None:
            raise ValueError(
                f"task {self.name}: rate_limit_scope/rate_limit_burst need rate_limit="
            )
        #: Only what the decorator set explicitly; the worker merges config and defaults.
        self.policy = TaskPolicy(
            max_retries=max_retries,
            retry_backoff=backoff,
            retry_backoff_max=retry_backoff_max,
            retry_jitter=retry_jitter,
            default_retry_delay=default_retry_delay,
            soft_time_limit=soft_time_limit,
            time_limit=time_limit,
            acks_early=acks_early,
            ignore_result=ignore_result,
            track_started=track_started,
            rate_limit=limit,
        )
        self.is_async = inspect.iscoroutinefunction(fn)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    @property
    def ignore_result(self) -> bool | None:
        return self.policy.ignore_result

    @property
    def acks_early(self) -> bool:
        return bool(self.policy.acks_early)

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run in this process, like calling the function itself (an ``async def`` task
        returns its coroutine). A bound task gets a request with a local id."""
        if self.bind:
            return self.fn(BoundTask(self, Request(id="local", task=self.name)), *args, **kwargs)
        return self.fn(*args, **kwargs)

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        """Publish with the routed defaults; returns a result handle."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Publish with options: ``queue``, ``routing_key``, ``exchange``, ``priority``,
        ``headers``, ``task_id``, ``countdown``, ``eta``, ``expires``, ``ignore_result``,
        ``timeout`` (confirm wait, seconds)."""
        options.setdefault("ignore_result", self.ignore_result)
        return self.sender.send_task(self.name, tuple(args), kwargs, **options)

    def delay_many(self, arguments: Iterable[Sequence[Any]], **options: Any) -> list[AsyncResult]:
        """Publish one message per argument tuple, with pipelined confirms (``App.send_many``):
        the bulk form of ``delay`` (each call is its own task). Called ``map`` before 0.2;
        ``map`` now means what it means in Celery (one task over a list)."""
        options.setdefault("ignore_result", self.ignore_result)
        return self.sender.send_many(((self.name, tuple(a), None) for a in arguments), **options)

    # -- signatures (canvas) --------------------------------------------------------------------
    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A signature of this task: partial arguments, applied later (``task.s(2) | ...``)."""
        return Signature(self.name, args, kwargs, app=self.sender)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """An immutable signature: a parent's result is not prepended to its arguments."""
        return Signature(self.name, args, kwargs, immutable=True, app=self.sender)

    def signature(
        self,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Signature:
        """A signature with publish options (``queue=``, ``countdown=``, ...)."""
        return Signature(self.name, args, kwargs, options, app=self.sender)

    def map(self, items: Iterable[Any]) -> Signature:
        """Celery's ``map``: ONE task that runs this one over ``items`` in a worker (one
        argument each) and returns the list of results."""
        return Signature(MAP_TASK, (self.name, list(items)), app=self.sender)

    def starmap(self, items: Iterable[Sequence[Any]]) -> Signature:
        """Celery's ``starmap``: one task that runs ``self(*item)`` for each item."""
        return Signature(STARMAP_TASK, (self.name, [list(i) for i in items]), app=self.sender)

    def chunks(self, items: Iterable[Sequence[Any]], n: int) -> group:
        """Celery's ``chunks``: the argument tuples split into chunks of ``n``, a ``starmap``
        task per chunk, as a group (its result: a list of lists)."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"chunks needs a chunk size of at least 1, got {n!r}")
        rows = [list(i) for i in items]
        return group(
            *(self.starmap(rows[i : i + n]) for i in range(0, len(rows), n)), app=self.sender
        )

    async def delay_async(self, *args: Any, **kwargs: Any) -> AsyncResult:
        """``delay`` for asyncio callers: the publish is awaited, never blocks the loop."""
        return await self.apply_async_async(args, kwargs)

    async def apply_async_async(
        self,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        options.setdefault("ignore_result", self.ignore_result)
        return await self.sender.send_task_async(self.name, tuple(args), kwargs, **options)


class BoundTask:
    """``self`` of a ``bind=True`` task: the task plus this execution's request."""

    def __init__(self, task: Task, request: Request) -> None:
        self.task = task
        self.request = request
        self.name = task.name

    def retry(
        self,
        exc: BaseException | None = None,
        countdown: float | None = None,
        max_retries: int | None = None,
    ) -> NoReturn:
        """Ask the worker to run this task again later (raises :class:`Retry`).

        ``countdown`` defaults to the task's backoff policy. With no retries left the task
        fails with ``exc`` (or :class:`MaxRetriesExceeded`) and lands in the dead-letter queue.
        """
        raise Retry(exc=exc, countdown=countdown, max_retries=max_retries)

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        return self.task.delay(*args, **kwargs)

    def apply_async(self, *args: Any, **kwargs: Any) -> AsyncResult:
        return self.task.apply_async(*args, **kwargs)
