"""The application object: configuration, the task registry, and publishing.

``App.from_config()`` defers reading the config until first use, so task modules can create
their app at import time without reading the environment then; the CLI exports
``AMQPTASKS_CONFIG`` for ``--config`` so a worker and its task modules agree on one file.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, overload

from .config import Settings, load_config
from .control import Control
from .errors import AmqpTasksError, TaskNotRegistered
from .events import EventSource, encode_batch
from .protocol import CONTENT_TYPE_JSON, DL_PREFIX, Envelope, Properties, encode, new_id
from .results import AsyncResult, ResultCollector
from .routing import Router
from .tasks import Sender, Task
from .topology import EVENTS_EXCHANGE, delay_seconds
from .transport.aio import AsyncPublisher
from .transport.pika_publisher import REPLY_TO, SyncPublisher, wait

__all__ = ["App"]

log = logging.getLogger("amqptasks.events")
_EVENT_PROPS = Properties(content_type=CONTENT_TYPE_JSON, delivery_mode=2)

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
    #: The route before any delay: (exchange, routing key).
    route: tuple[str, str] = ("", "")


def _when(value: Any, key: str, now: datetime) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return now + timedelta(seconds=value)
    raise TypeError(f"{key}= must be seconds or a datetime, got {type(value).__name__}")


class App(Sender):
    """Holds settings, tasks and the publishers of one application.

    ``send_events=True`` publishes a ``task-sent`` event for every task sent (default: the
    config's ``events.send_sent``).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        config: str | os.PathLike[str] | None = None,
        send_events: bool | None = None,
    ) -> None:
        self._settings = settings
        self._config_path = config
        self._send_events = send_events
        self._event_source: EventSource | None = None
        self.tasks: dict[str, Task] = {}
        self.results = ResultCollector()
        #: Inspect and control the workers (``app.control.ping()``).
        self.control = Control(self)
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
                        on_reply=self._on_reply,
                        heartbeat=s.heartbeat,
                    )
                    atexit.register(self._publisher.close)
        return self._publisher

    def _on_reply(self, correlation_id: str | None, body: bytes) -> None:
        """Direct reply-to: control answers first, then task results."""
        if not self.control.deliver(correlation_id, body):
            self.results.deliver(correlation_id, body)

    # -- task-sent events ---------------------------------------------------------------------
    @property
    def sends_events(self) -> bool:
        if self._send_events is None:
            return self.settings.events.send_sent
        return self._send_events

    def _sent_event(self, p: Prepared) -> dict[str, Any]:
        """The ``task-sent`` event of ``p``, stamped now (just before its publish)."""
        if self._event_source is None:
            self._event_source = EventSource(socket.gethostname())
        src = self._event_source
        e = src.with_call(src.task_event("task-sent", p.envelope, None), p.envelope)
        e["exchange"], e["routing_key"] = p.route
        return e

    def _publish_sent(self, events: Sequence[dict[str, Any]]) -> None:
        """Publish ``task-sent`` events of confirmed tasks, in batches, without waiting (an
        events publish that fails is logged; the tasks are sent either way)."""
        for key, body, _count in encode_batch(events):
            future = self.publisher.publish_nowait(
                EVENTS_EXCHANGE, key, body, _EVENT_PROPS, mandatory=False
            )
            future.add_done_callback(_log_event_failure)

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
        """Everything a publish needs, computed without I/O."""
        unknown = options.keys() - _PUBLISH_OPTIONS
        if unknown:
            raise TypeError(f"unknown publish option(s): {', '.join(sorted(unknown))}")
        if options.get("countdown") is not None and options.get("eta") is not None:
            raise TypeError("give countdown= or eta=, not both")
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
        if delay >= 1:  # the route it waits for travels with it (for the DLQ and replay)
            envelope.headers.setdefault(DL_PREFIX + "original-exchange", route.exchange)
            envelope.headers.setdefault(DL_PREFIX + "original-routing-key", route.routing_key)
        body, props = encode(envelope)
        return Prepared(
            destinations, body, props, envelope, wants_reply, (route.exchange, route.routing_key)
        )

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
        sent: list[dict[str, Any]] | None = [] if self.sends_events else None

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
            if sent is not None:
                sent.append(self._sent_event(p))
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
        if sent:
            failed_at = getattr(first_error, "index", len(sent))
            self._publish_sent(sent[:failed_at])
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
        event = self._sent_event(p) if self.sends_events else None
        await asyncio.gather(
            *(
                publisher.publish(ex, key, p.body, p.props, timeout=options.get("timeout"))
                for ex, key in p.destinations
            )
        )
        if event is not None:
            for key, body, _count in encode_batch([event]):
                try:
                    await publisher.publish(
                        EVENTS_EXCHANGE, key, body, _EVENT_PROPS, mandatory=False
                    )
                except AmqpTasksError as exc:
                    log.warning("task-sent event for %s not published: %s", p.envelope.id, exc)
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


def _log_event_failure(future: concurrent.futures.Future[None]) -> None:
    exc = future.exception()
    if exc is not None:
        log.warning("task-sent event not published: %s", exc)
