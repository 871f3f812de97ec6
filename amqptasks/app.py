"""The application object: configuration, the task registry, and publishing.

``App.from_config()`` defers reading the config until first use, so task modules can create
their app at import time without reading the environment then; the CLI exports
``AMQPTASKS_CONFIG`` for ``--config`` so a worker and its task modules agree on one file.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, overload

from .config import Settings, load_config
from .errors import TaskNotRegistered
from .protocol import Envelope, Properties, encode, new_id
from .results import AsyncResult, ResultCollector
from .routing import Route, Router
from .tasks import Task
from .transport.aio import AsyncPublisher
from .transport.pika_publisher import REPLY_TO, SyncPublisher

__all__ = ["App"]

F = TypeVar("F", bound=Callable[..., Any])
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
    }
)


class App:
    """Holds settings, tasks and the publishers of one application."""

    def __init__(
        self, settings: Settings | None = None, *, config: str | os.PathLike[str] | None = None
    ) -> None:
        self._settings = settings
        self._config_path = config
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.results = ResultCollector()
        self._router: Router | None = None
        self._publisher: SyncPublisher | None = None
        self._async_publishers: dict[asyncio.AbstractEventLoop, AsyncPublisher] = {}
        self._lock = threading.Lock()

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
    def task(self, fn: Callable[..., Any], /) -> Task[Any, Any]: ...

    @overload
    def task(
        self,
        *,
        name: str | None = None,
        ignore_result: bool | None = None,
        acks_early: bool = False,
    ) -> Callable[[Callable[..., Any]], Task[Any, Any]]: ...

    def task(  # type: ignore[misc]  # mypy misreads the positional-only default
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        ignore_result: bool | None = None,
        acks_early: bool = False,
    ) -> Task[Any, Any] | Callable[[Callable[..., Any]], Task[Any, Any]]:
        """Register a function as a task: ``@app.task`` or ``@app.task(name=..., ...)``."""

        def register(func: Callable[..., Any]) -> Task[Any, Any]:
            t: Task[Any, Any] = Task(
                func, self, name=name, ignore_result=ignore_result, acks_early=acks_early
            )
            self.tasks[t.name] = t
            return t

        return register(fn) if fn is not None else register

    def get_task(self, name: str) -> Task[Any, Any]:
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
                        s.url, timeout=s.publish_timeout, on_reply=self.results.deliver
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
                s.url, timeout=s.publish_timeout, on_reply=self.results.deliver
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
    ) -> tuple[Route, bytes, Properties, Envelope, bool]:
        """Everything a publish needs, without I/O: route, body, properties, envelope and
        whether a reply is wanted."""
        unknown = options.keys() - _PUBLISH_OPTIONS
        if unknown:
            raise TypeError(f"unknown publish option(s): {', '.join(sorted(unknown))}")
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
        envelope = Envelope(
            task=name,
            id=options.get("task_id") or new_id(),
            args=tuple(args),
            kwargs=dict(kwargs or {}),
            reply_to=reply_to if wants_reply else None,
            priority=options.get("priority"),
            headers=dict(options.get("headers") or {}),
        )
        body, props = encode(envelope)
        return route, body, props, envelope, wants_reply

    def send_task(
        self,
        name: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Publish task ``name`` (registered here or not) and wait for the broker's confirm."""
        route, body, props, env, wants_reply = self.prepare(
            name, args, kwargs, reply_to=REPLY_TO, **options
        )
        publisher = self.publisher
        state = self.results.expect(props.correlation_id or env.id) if wants_reply else None
        publisher.publish(
            route.exchange, route.routing_key, body, props, timeout=options.get("timeout")
        )
        return AsyncResult(env.id, name, state)

    async def send_task_async(
        self,
        name: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        """``send_task`` for asyncio callers (aio-pika; the loop is never blocked)."""
        route, body, props, env, wants_reply = self.prepare(
            name, args, kwargs, reply_to=REPLY_TO, **options
        )
        state = self.results.expect(props.correlation_id or env.id) if wants_reply else None
        await self.async_publisher().publish(
            route.exchange, route.routing_key, body, props, timeout=options.get("timeout")
        )
        return AsyncResult(env.id, name, state)

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
