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
import math
import os
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, overload

from . import canvas, tracing
from .canvas import Signature
from .config import Settings, load_config, policy_flag, redact_url
from .control import Control
from .errors import AmqpTasksError, ConfigError, DecodeError, TaskNotRegistered
from .events import EventSource, encode_batch
from .protocol import (
    CONTENT_TYPE_JSON,
    DL_PREFIX,
    Envelope,
    Properties,
    check_headers,
    check_priority,
    check_shortstr,
    encode,
    new_id,
    parse_time,
)
from .results import (
    AsyncResult,
    GroupResult,
    ResultBackend,
    ResultCollector,
    ResultStore,
    store_from_url,
)
from .routing import Router
from .tasks import Sender, Task
from .topology import EVENTS_EXCHANGE, delay_seconds
from .transport.aio import AsyncPublisher
from .transport.pika_publisher import REPLY_TO, SyncPublisher, wait

__all__ = ["App"]

# App has methods named AsyncResult and GroupResult (Celery's spelling), which would shadow
# the classes in its body.
ResultHandle = AsyncResult
GroupHandle = GroupResult
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
    """``countdown=``/``eta=``/``expires=`` as an aware time: seconds from ``now`` (a finite
    number) or a datetime (naive means UTC)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, str) and key != "countdown":  # a workflow step's eta/expires, as
        # it travelled in the wire form
        try:
            return parse_time(value, key, now)
        except DecodeError as exc:
            raise ValueError(f"{key}= {exc}") from None
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
        self._store: ResultStore | None = None
        self._store_loaded = False
        self._backend: ResultBackend | None = None
        #: Inspect and control the workers (``app.control.ping()``).
        self.control = Control(self)
        self._router: Router | None = None
        #: ignores_result() per task name, from the settings (a task's decorator aside).
        self._configured_ignore: dict[str, bool] = {}
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
        self._configured_ignore = {}

    def ignores_result(self, name: str) -> bool:
        """Whether task ``name`` keeps no result, short of a per-call ``ignore_result``: its
        decorator's choice, else its YAML ``tasks:`` entry, else ``results.ignore_result`` —
        the order the worker resolves it in (its merged task policies), so a caller never
        waits for a reply the worker will not send, nor refuses one it will."""
        task = self.tasks.get(name)
        if task is not None and task.ignore_result is not None:
            return task.ignore_result
        known = self._configured_ignore.get(name)
        if known is None:
            settings = self.settings  # globs: matched once per name
            known = policy_flag(
                settings.task_policy(name), "ignore_result", settings.results.ignore_result
            )
            self._configured_ignore[name] = known
        return known

    # -- results --------------------------------------------------------------------------------
    @property
    def store(self) -> ResultStore | None:
        """The result store of ``results.backend`` (None for ``rpc://``), opened on first use."""
        if not self._store_loaded:
            with self._lock:
                if not self._store_loaded:
                    r = self.settings.results
                    try:
                        self._store = store_from_url(r.backend, expires=r.expires)
                    except ValueError as exc:
                        raise ConfigError(
                            self.settings.source, "results.backend", str(exc)
                        ) from None
                    self._store_loaded = True
        return self._store

    @property
    def backend(self) -> ResultBackend:
        """What result handles of this app read: its replies and its store (built once per
        store: every ``delay()`` hands it to its handle)."""
        store = self.store
        backend = self._backend
        if backend is None or backend.store is not store:
            backend = self._backend = ResultBackend(
                self.results,
                store,
                redact_url(self.settings.results.backend),
                revoke=self.control.revoke,
            )
        return backend

    def AsyncResult(self, task_id: str) -> ResultHandle:
        """The result of task ``task_id``, from any process (needs a store to be read)."""
        return ResultHandle(task_id, backend=self.backend)

    def GroupResult(self, group_id: str) -> GroupHandle:
        """The group saved under ``group_id`` when it was applied (needs a store)."""
        return GroupHandle.restore(group_id, self.backend)

    def signature(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        immutable: bool = False,
    ) -> Signature:
        """A signature of task ``name``, which this process need not be able to import."""
        return Signature(name, args, kwargs, options, immutable=immutable, app=self)

    def apply_workflow(
        self,
        node: canvas.Node,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        """Apply a signature, chain, group or chord: publish its first task(s), confirmed,
        with the rest of the workflow in their links; return its result handle
        (:class:`AsyncResult`, or :class:`GroupResult` for a group).

        ``args``/``kwargs`` are prepended/merged into the first task(s) like a parent's result;
        ``options`` (``queue=``, ``countdown=``, ...) apply to the tasks published now. A copy of
        ``node`` is applied, so applying it twice runs it twice (ids fixed on ``node`` itself by
        ``canvas.freeze`` are kept).
        """
        timeout = options.pop("timeout", None)
        node = canvas.freeze(canvas.node_from_wire(node.to_wire()))
        if canvas.needs_store(node):
            self.backend.require_store("a chord (or a group followed by more in a chain)")
        plan = canvas.plan(node, tuple(args), dict(kwargs or {}))
        store = self.store
        if plan.groups and store is not None:
            for group_id, ids in plan.groups:
                store.save_group(group_id, ids)
        keep = not options.get("ignore_result")
        calls = [
            (m.task, m.args, m.kwargs, {**options, **m.options}, m.links) for m in plan.messages
        ]
        states: dict[str, Any] = {}
        self._publish(
            calls, timeout=timeout, expect=canvas.result_ids(node) if keep else (), states=states
        )
        return self._handle(node, states)

    def _handle(
        self, node: canvas.Node, states: dict[str, Any], parent: ResultHandle | None = None
    ) -> Any:
        backend = self.backend
        if isinstance(node, canvas.group):
            assert node.id is not None
            results: list[ResultHandle] = []
            for t in node.tasks:
                h = self._handle(t, states)
                results.extend(h.results if isinstance(h, GroupHandle) else [h])
            return GroupHandle(node.id, results, backend=backend)
        if isinstance(node, canvas.chain):
            handle: Any = parent
            for t in canvas.upgraded(node):
                handle = self._handle(
                    t, states, handle if isinstance(handle, ResultHandle) else None
                )
            return handle
        if isinstance(node, canvas.chord):
            assert node.body is not None
            return self._handle(node.body, states, parent)
        task_id = node.options["task_id"]
        return ResultHandle(
            task_id,
            node.task,
            states.get(task_id),
            backend=backend,
            parent=parent,
        )

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
        time_limit=..., acks_early=..., ignore_result=..., rate_limit="100/m",
        rate_limit_scope="worker"|"fleet", rate_limit_burst=N)``."""

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
                        s.urls,
                        timeout=s.publish_timeout,
                        on_reply=self._on_reply,
                        on_replies_lost=self.results.lost,
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
                s.urls,
                timeout=s.publish_timeout,
                on_reply=self.results.deliver,
                on_replies_lost=self.results.lost,
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
        links: Mapping[str, Any] | None = None,
        parent_id: str | None = None,
        root_id: str | None = None,
        **options: Any,
    ) -> Prepared:
        """Everything a publish needs, computed without I/O; a bad option raises
        ``TypeError``/``ValueError`` naming it (and the header key) before any I/O.

        ``links``, ``parent_id`` and ``root_id`` are a workflow's fields (planned by
        :mod:`amqptasks.canvas`); they travel in the body as documented."""
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
            ignore = self.ignores_result(name)
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
            links=dict(links or {}),
            parent_id=parent_id,
            root_id=root_id,
        )
        if self.settings.tracing.enabled:  # the caller's trace travels with the message
            tracing.inject(envelope.headers, self.settings.source)
        delay = delay_seconds((eta - now).total_seconds()) if eta is not None else 0
        destinations = self.settings.topology.destinations(route.exchange, route.routing_key, delay)
        for _exchange, key in destinations:  # a delayed route's key carries the queue name
            check_shortstr(key, f"routing key {key[:40]!r}... of the delayed route")
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
    ) -> ResultHandle:
        """Publish task ``name`` (registered here or not) and wait for the broker's confirm
        (of every copy, when a delayed route reaches several queues)."""
        return self.send_many([(name, args, kwargs)], **options)[0]

    def send_many(
        self,
        calls: Iterable[tuple[str, Sequence[Any], Mapping[str, Any] | None]],
        *,
        window: int = 1000,
        **options: Any,
    ) -> list[ResultHandle]:
        """Publish many tasks with pipelined confirms: up to ``window`` publishes in flight,
        every one confirmed before this returns (the bulk API, e.g. for a backfill).

        ``calls`` yields ``(task name, args, kwargs)``; ``options`` apply to every call. If any
        publish fails, the others still in flight are awaited, then the first error is raised
        with ``.index`` set to the failing call's position (earlier calls are confirmed).
        """
        timeout = options.pop("timeout", None)
        states: dict[str, Any] = {}
        prepared = self._publish(
            ((name, args, kwargs, options, None) for name, args, kwargs in calls),
            timeout=timeout,
            window=window,
            states=states,
        )
        backend = self.backend
        return [
            ResultHandle(
                p.envelope.id,
                p.envelope.task,
                states.get(p.props.correlation_id or p.envelope.id),
                backend=backend,
                ignored=not p.wants_reply,
            )
            for p in prepared
        ]

    def _publish(
        self,
        calls: Iterable[
            tuple[str, Sequence[Any], Mapping[str, Any] | None, Mapping[str, Any], Any]
        ],
        *,
        timeout: float | None,
        window: int = 1000,
        expect: Iterable[str] = (),
        states: dict[str, Any] | None = None,
    ) -> list[Prepared]:
        """Prepare and publish ``(name, args, kwargs, options, links)`` calls with pipelined
        confirms; replies are expected for each call that wants one and for ``expect`` (ids
        whose replies come from later workflow steps), registered before anything is sent.
        The reply states go into ``states`` (the collector holds them weakly: whoever makes
        the handles must keep them)."""
        if window < 1:
            raise ValueError("window must be at least 1")
        if timeout is not None:
            _check_options({"timeout": timeout})
        publisher = self.publisher
        limit = publisher.timeout if timeout is None else timeout
        states = {} if states is None else states
        for task_id in expect:
            states[task_id] = self.results.expect(task_id)
        done: list[Prepared] = []
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

        for index, (name, args, kwargs, options, links) in enumerate(calls):
            p = self.prepare(name, tuple(args), kwargs, reply_to=REPLY_TO, links=links, **options)
            if p.wants_reply:
                key = p.props.correlation_id or p.envelope.id
                states[key] = self.results.expect(key)
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
            done.append(p)
            drain(window)
            if first_error is not None:
                break
        drain(0)
        if sent:
            failed_at = getattr(first_error, "index", len(sent))
            self._publish_sent(sent[:failed_at])
        if first_error is not None:
            raise first_error
        return done

    async def send_task_async(
        self,
        name: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> ResultHandle:
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
        return ResultHandle(
            p.envelope.id, name, state, backend=self.backend, ignored=not p.wants_reply
        )

    def close(self) -> None:
        """Close the sync publisher and the result store (async publishers:
        ``await app.aclose()``)."""
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None
        if self._store is not None:
            self._store.close()
            self._store = None
            self._store_loaded = False

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        pub = self._async_publishers.pop(loop, None)
        if pub is not None:
            await pub.close()


def _log_event_failure(future: concurrent.futures.Future[None]) -> None:
    exc = future.exception()
    if exc is not None:
        log.warning("task-sent event not published: %s", exc)
