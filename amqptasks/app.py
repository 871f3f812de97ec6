"""The application object: configuration, the task registry, and publishing.

``App.from_config()`` defers reading the config until first use, so task modules can create
their app at import time without reading the environment then; the CLI exports
``AMQPTASKS_CONFIG`` for ``--config`` so a worker and its task modules agree on one file.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import math
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, overload

from .config import Settings, load_config
from .errors import AmqpTasksError, TaskNotRegistered
from .protocol import (
    DL_PREFIX,
    Envelope,
    Properties,
    check_headers,
    check_priority,
    check_shortstr,
    encode,
    new_id,
)
from .results import AsyncResult, ResultCollector
from .routing import Router
from .tasks import Sender, Task
from .topology import delay_seconds
from .transport.aio import AsyncPublisher
from .transport.pika_publisher import REPLY_TO, SyncPublisher, wait

__all__ = ["App"]

_PUBLISH_OPTIONS = frozenset(
    {
        "queue",
        "routing_key",
        "exchange",
        "priority",
        "headers",
        "task_id",
        "ignore_result",
        "timeout",
        "countdown",
        "eta",
        "expires",
    }
)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A publish ready to go, without I/O: destinations (one, or one per target queue when
    delayed), body, properties, envelope, and whether a reply is wanted."""

    destinations: tuple[tuple[str, str], ...]
    body: bytes
    props: Properties
    envelope: Envelope
    wants_reply: bool


def _when(value: Any, key: str, now: datetime) -> datetime | None:
    """``countdown=``/``eta=``/``expires=`` as an aware time: seconds from ``now`` (a finite
    number) or a datetime (naive means UTC)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{key}= must be a finite number of seconds, got {value!r}")
        try:
            return now + timedelta(seconds=value)
        except OverflowError:
            raise ValueError(f"{key}={value!r} seconds is out of range for a time") from None
    raise TypeError(f"{key}= must be seconds or a datetime, got {type(value).__name__}: {value!r}")


def _check_options(options: Mapping[str, Any]) -> None:
    """Refuse a bad publish option by name before anything reaches the wire.

    Every value that ends up in an AMQP frame is checked here (protocol's ``check_*``): a
    value a client library fails to encode would otherwise surface as a bare ``struct.error``
    from deep inside pika or pamqp.
    """
    unknown = options.keys() - _PUBLISH_OPTIONS
    if unknown:
        raise TypeError(f"unknown publish option(s): {', '.join(sorted(unknown))}")
    for key in ("exchange", "routing_key", "queue"):
        if options.get(key) is not None:
            check_shortstr(options[key], key)
    if options.get("task_id") is not None:
        check_shortstr(options["task_id"], "task_id", empty=False)
    check_priority(options.get("priority"))
    check_headers(options.get("headers"))
    timeout = options.get("timeout")
    if timeout is not None:
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
            raise TypeError(f"timeout= must be seconds, got {type(timeout).__name__}: {timeout!r}")
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout= must be a finite number of seconds > 0, got {timeout!r}")
    ignore = options.get("ignore_result")
    if ignore is not None and not isinstance(ignore, bool):
        raise TypeError(f"ignore_result= must be a bool, got {type(ignore).__name__}: {ignore!r}")
    if options.get("countdown") is not None and options.get("eta") is not None:
        raise TypeError("give countdown= or eta=, not both")


class App(Sender):
    """Holds settings, tasks and the publishers of one application."""

    def __init__(
        self, settings: Settings | None = None, *, config: str | os.PathLike[str] | None = None
    ) -> None:
        self._settings = settings
        self._config_path = config
        self.tasks: dict[str, Task] = {}
        self.results = ResultCollector()
        self._router: Router | None = None
        self._publisher: SyncPublisher | None = None
        self._async_publishers: dict[asyncio.AbstractEventLoop, AsyncPublisher] = {}
        # Re-entrant: the first use of .publisher reads .settings, which takes it too.
        self._lock = threading.RLock()

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None) -> App:
        """An app whose config is looked up (``--config``/``$AMQPTASKS_CONFIG``/default) on
        first use."""
        return cls(config=path)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            with self._lock:
                if self._settings is None:
                    self._settings = load_config(self._config_path)
        return self._settings

    def configure(self, settings: Settings) -> None:
        """Replace the settings (before anything was published)."""
        self._settings = settings
        self._router = None

    @property
    def router(self) -> Router:
        if self._router is None:
            self._router = self.settings.router()
        return self._router

    # -- tasks --------------------------------------------------------------------------------
    @overload
    def task(self, fn: Callable[..., Any], /) -> Task: ...

    @overload
    def task(
        self, *, name: str | None = None, bind: bool = False, **options: Any
    ) -> Callable[[Callable[..., Any]], Task]: ...

    def task(  # type: ignore[misc]  # mypy misreads the positional-only default
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        bind: bool = False,
        **options: Any,
    ) -> Task | Callable[[Callable[..., Any]], Task]:
        """Register a function as a task: ``@app.task`` or ``@app.task(name=..., bind=True,
        max_retries=..., autoretry_for=(...), retry_backoff=..., soft_time_limit=...,
        time_limit=..., acks_early=..., ignore_result=...)``."""

        def register(func: Callable[..., Any]) -> Task:
            t = Task(func, self, name=name, bind=bind, **options)
            self.tasks[t.name] = t
            return t

        return register(fn) if fn is not None else register

    def get_task(self, name: str) -> Task:
        try:
            return self.tasks[name]
        except KeyError:
            raise TaskNotRegistered(f"task {name!r} is not registered") from None

    # -- publishing ---------------------------------------------------------------------------
    @property
    def publisher(self) -> SyncPublisher:
        if self._publisher is None:
            with self._lock:
                if self._publisher is None:
                    s = self.settings.broker
                    self._publisher = SyncPublisher(
                        s.url,
                        timeout=s.publish_timeout,
                        on_reply=self.results.deliver,
                        heartbeat=s.heartbeat,
                    )
                    atexit.register(self._publisher.close)
        return self._publisher

    def async_publisher(self) -> AsyncPublisher:
        """The publisher of the running event loop (one per loop: aio-pika objects are
        loop-bound)."""
        loop = asyncio.get_running_loop()
        pub = self._async_publishers.get(loop)
        if pub is None:
            s = self.settings.broker
            pub = self._async_publishers[loop] = AsyncPublisher(
                s.url,
                timeout=s.publish_timeout,
                on_reply=self.results.deliver,
                heartbeat=s.heartbeat,
            )
        return pub

    def prepare(
        self,
        name: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        reply_to: str | None,
        **options: Any,
    ) -> Prepared:
        """Everything a publish needs, computed without I/O; a bad option raises
        ``TypeError``/``ValueError`` naming it (and the header key) before any I/O."""
        _check_options(options)
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise TypeError(f"kwargs must be a mapping, got {type(kwargs).__name__}")
        route = self.router.route(
            name,
            exchange=options.get("exchange"),
            routing_key=options.get("routing_key"),
            queue=options.get("queue"),
        )
        ignore = options.get("ignore_result")
        if ignore is None:
            task = self.tasks.get(name)
            ignore = task.ignore_result if task is not None else None
        if ignore is None:
            ignore = self.settings.results.ignore_result
        wants_reply = not ignore and reply_to is not None
        now = datetime.now(timezone.utc)
        eta = _when(options.get("countdown"), "countdown", now) or _when(
            options.get("eta"), "eta", now
        )
        envelope = Envelope(
            task=name,
            id=options.get("task_id") or new_id(),
            args=tuple(args),
            kwargs=dict(kwargs or {}),
            eta=eta,
            expires=_when(options.get("expires"), "expires", now),
            reply_to=reply_to if wants_reply else None,
            priority=options.get("priority"),
            headers=dict(options.get("headers") or {}),
        )
        delay = delay_seconds((eta - now).total_seconds()) if eta is not None else 0
        destinations = self.settings.topology.destinations(route.exchange, route.routing_key, delay)
        for _exchange, key in destinations:  # a delayed route's key carries the queue name
            check_shortstr(key, f"routing key {key[:40]!r}... of the delayed route")
        if delay >= 1:  # the route it waits for travels with it (for the DLQ and replay)
            envelope.headers.setdefault(DL_PREFIX + "original-exchange", route.exchange)
            envelope.headers.setdefault(DL_PREFIX + "original-routing-key", route.routing_key)
        body, props = encode(envelope)
        return Prepared(destinations, body, props, envelope, wants_reply)

    def send_task(
        self,
        name: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Publish task ``name`` (registered here or not) and wait for the broker's confirm
        (of every copy, when a delayed route reaches several queues)."""
        return self.send_many([(name, args, kwargs)], **options)[0]

    def send_many(
        self,
        calls: Iterable[tuple[str, Sequence[Any], Mapping[str, Any] | None]],
        *,
        window: int = 1000,
        **options: Any,
    ) -> list[AsyncResult]:
        """Publish many tasks with pipelined confirms: up to ``window`` publishes in flight,
        every one confirmed before this returns (the bulk API, e.g. for a group or a backfill).

        ``calls`` yields ``(task name, args, kwargs)``; ``options`` apply to every call. If any
        publish fails, the others still in flight are awaited, then the first error is raised
        with ``.index`` set to the failing call's position (earlier calls are confirmed).
        """
        if window < 1:
            raise ValueError("window must be at least 1")
        publisher = self.publisher
        timeout = options.get("timeout")
        limit = publisher.timeout if timeout is None else timeout
        results: list[AsyncResult] = []
        inflight: deque[tuple[int, concurrent.futures.Future[None], str, str]] = deque()
        first_error: BaseException | None = None

        def drain(keep: int) -> None:
            nonlocal first_error
            while len(inflight) > keep:
                index, future, ex, key = inflight.popleft()
                try:
                    wait(future, limit, ex, key)
                except AmqpTasksError as exc:
                    if first_error is None:
                        exc.index = index  # type: ignore[attr-defined]
                        first_error = exc

        for index, (name, args, kwargs) in enumerate(calls):
            p = self.prepare(name, tuple(args), kwargs, reply_to=REPLY_TO, **options)
            state = (
                self.results.expect(p.props.correlation_id or p.envelope.id)
                if (p.wants_reply)
                else None
            )
            for ex, key in p.destinations:
                inflight.append(
                    (
                        index,
                        publisher.publish_nowait(ex, key, p.body, p.props, timeout=timeout),
                        ex,
                        key,
                    )
                )
            results.append(AsyncResult(p.envelope.id, name, state))
            drain(window)
            if first_error is not None:
                break
        drain(0)
        if first_error is not None:
            raise first_error
        return results

    async def send_task_async(
        self,
        name: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        """``send_task`` for asyncio callers (aio-pika; the loop is never blocked)."""
        p = self.prepare(name, args, kwargs, reply_to=REPLY_TO, **options)
        state = (
            self.results.expect(p.props.correlation_id or p.envelope.id)
            if (p.wants_reply)
            else None
        )
        publisher = self.async_publisher()
        await asyncio.gather(
            *(
                publisher.publish(ex, key, p.body, p.props, timeout=options.get("timeout"))
                for ex, key in p.destinations
            )
        )
        return AsyncResult(p.envelope.id, name, state)

    def close(self) -> None:
        """Close the sync publisher (async publishers: ``await app.aclose()``)."""
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        pub = self._async_publishers.pop(loop, None)
        if pub is not None:
            await pub.close()
