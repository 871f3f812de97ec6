"""YAML -> validated, frozen :class:`Settings`.

Looked up as ``--config PATH``, else ``$AMQPTASKS_CONFIG``, else ``./config/amqptasks.yaml``;
``$AMQPTASKS_BROKER_URL`` overrides ``broker.url``. The environment is passed in, never read at
import time. Every error is one line naming the file, the key path
(``queues.web_tasks.bindings[0].exchange``) and what was expected. Unknown keys are errors: a
typo must not silently fall back to a default.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import yaml

from .errors import ConfigError, RoutingError
from .protocol import CONTENT_TYPE_JSON, CONTENT_TYPE_PICKLE
from .rate import OFF, SCOPES, RateLimit, rate_limit
from .routing import DEFAULT_EXCHANGE, Route, Router, is_glob
from .schedule import (
    SCHEDULE_KEYS,
    Schedule,
    ScheduleFieldError,
    build_schedule,
    parse_duration,
    zone,
)
from .topology import (
    DLQ_SUFFIX,
    MAX_DELAY,
    RATE_LIMIT_PREFIX,
    RESERVED_EXCHANGES,
    REVOCATIONS_QUEUE,
    QueueSpec,
    Topology,
    build_topology,
    reserved_queue,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_POLICY",
    "MAX_REVOKE_EXPIRES",
    "BrokerSettings",
    "DashboardSettings",
    "EventSettings",
    "ResultSettings",
    "RevokeSettings",
    "Settings",
    "TaskPolicy",
    "TracingSettings",
    "WorkerSettings",
    "load_config",
    "redact_url",
    "redact_urls",
    "split_urls",
]

DEFAULT_CONFIG_PATH = Path("config/amqptasks.yaml")
DEFAULT_BROKER_URL = "amqp://guest:guest@localhost:5672/%2F"
DEFAULT_RESULT_BACKEND = "sqlite:///.amqptasks/results.sqlite3"
RESULT_SCHEMES = ("rpc", "sqlite", "redis", "rediss")
EXCHANGE_TYPES = ("direct", "topic", "fanout")
QUEUE_TYPES = ("classic", "quorum")
POOLS = ("threads", "asyncio", "processes")
ACCEPTABLE = (CONTENT_TYPE_JSON, CONTENT_TYPE_PICKLE)
TASK_KEYS = (
    "max_retries",
    "autoretry_for",
    "retry_backoff",
    "retry_backoff_max",
    "retry_jitter",
    "default_retry_delay",
    "soft_time_limit",
    "time_limit",
    "acks_early",
    "ignore_result",
    "track_started",
    "rate_limit",
)
RATE_LIMIT_KEYS = ("rate", "scope", "burst")
_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,255}$")


#: What may precede the authority: a scheme (even misspelt, or missing its ':') and slashes.
_URL_PREFIX = re.compile(r"\s*(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)(?P<colon>:?)(?P<slashes>/*)")


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` and every other character kept.

    Safe for logs, banners, reprs and errors — and for reporting a malformed URL: the point of
    showing it is the typo (``amqps//``, a wrong host or port), so nothing but the password is
    hidden. Works on the raw text rather than ``urlsplit``, which finds no credentials at all
    in ``amqps//user:pw@host``. The userinfo ends at the last '@' before the query: an
    unencoded '/' may be in a password as well as in the path (``user:p@ss/word@host`` and
    ``user:pw@host/v@h`` read alike), so an '@' in the path ends it too — better hide a
    vhost than show the rest of a password. With no '@' before the query, a password holding
    '?' or '#' may still end at a later '@': up to the last one is hidden.
    """
    start = len(url) - len(url.lstrip())
    m = _URL_PREFIX.match(url)
    if m is not None and (
        m["slashes"] or (m["colon"] and m["scheme"].lower() in ("amqp", "amqps"))
    ):
        start = m.end()  # 'user:pw@host' alone has no scheme: 'user' is not one
    return _redact_query(_redact_userinfo(url, start))


def _redact_userinfo(url: str, start: int) -> str:
    rest = url[start:]
    query = next((i for i, c in enumerate(rest) if c in "?#"), len(rest))
    at = rest.rfind("@", 0, query)
    if at < 0:
        authority = next((i for i, c in enumerate(rest) if c in "/?#"), len(rest))
        if ":" not in rest[:authority]:
            return url
        at = rest.rfind("@")
        if at < 0:
            return url
    colon = rest.find(":", 0, at)
    if colon < 0:
        return url  # a user name alone is not a secret
    return url[:start] + rest[: colon + 1] + "***" + rest[at:]


#: A password given as a query parameter (redis-py reads ``?password=``).
_QUERY_SECRET = re.compile(r"(?i)([?&](?:password|passwd|pass)=)[^&#]*")


def _redact_query(url: str) -> str:
    return _QUERY_SECRET.sub(r"\1***", url)


#: Several broker addresses in one string: a comma followed by the next URL's scheme (a comma
#: inside a password, not followed by ``scheme://``, stays part of it).
_URL_SEPARATOR = re.compile(r",\s*(?=[A-Za-z][A-Za-z0-9+.\-]*://)")


def split_urls(text: str) -> list[str]:
    """``"amqp://a,amqp://b"`` -> ``["amqp://a", "amqp://b"]`` (the comma-separated form)."""
    return [part.strip() for part in _URL_SEPARATOR.split(text)]


def redact_urls(urls: str | tuple[str, ...] | list[str]) -> str:
    """Several URLs in their comma-separated form, each with its password hidden."""
    items = [urls] if isinstance(urls, str) else list(urls)
    return ",".join(redact_url(u) for u in items)


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    #: The broker's addresses in failover order (one node, or the nodes of one cluster):
    #: every connection goes to the first that answers and, when it is lost, on to the next.
    urls: tuple[str, ...] = (DEFAULT_BROKER_URL,)
    #: Seconds a publish waits for the broker's confirm (or a connection) before raising.
    publish_timeout: float = 10.0
    #: AMQP heartbeat (seconds) on every connection. The broker drops a silent client after
    #: about two heartbeats; pika (publisher, consumer, beat lock) gives up on a silent broker
    #: within 2 x (heartbeat + 5) s.
    heartbeat: int = 30
    #: The broker's ``consumer_timeout`` (RabbitMQ default 30 min): a delivery unacked longer
    #: than this closes the channel, so hard time limits must stay below it.
    consumer_timeout: float = 1800.0
    #: How long a worker waits between reconnection attempts at most (exponential backoff).
    reconnect_max_delay: float = 30.0

    @property
    def url(self) -> str:
        """The first address (tools that talk to one node, such as the management API)."""
        return self.urls[0]

    @property
    def display(self) -> str:
        """Every address, comma-separated, passwords hidden: for banners, logs and errors."""
        return redact_urls(self.urls)

    def __repr__(self) -> str:
        # The dataclass keeps the real URLs; its repr is what lands in error trackers' captured
        # local variables and in debug prints, so it shows them with the passwords hidden.
        return (
            f"BrokerSettings(url={self.display!r}, "
            f"publish_timeout={self.publish_timeout!r}, heartbeat={self.heartbeat!r}, "
            f"consumer_timeout={self.consumer_timeout!r}, "
            f"reconnect_max_delay={self.reconnect_max_delay!r})"
        )


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    concurrency: int = 8
    prefetch_multiplier: int = 4
    pool: str = "threads"

    @property
    def prefetch(self) -> int:
        return self.concurrency * self.prefetch_multiplier


@dataclass(frozen=True, slots=True)
class TaskPolicy:
    """Per-task delivery options. ``None`` means "not set here": the decorator's explicit
    arguments win, then the YAML ``tasks`` entry (exact name, then globs in file order), then
    the built-in defaults in :data:`DEFAULT_POLICY`."""

    max_retries: int | None = None
    autoretry_for: tuple[str, ...] | None = None
    retry_backoff: float | None = None
    retry_backoff_max: float | None = None
    retry_jitter: bool | None = None
    default_retry_delay: float | None = None
    soft_time_limit: float | None = None
    time_limit: float | None = None
    acks_early: bool | None = None
    ignore_result: bool | None = None
    #: Write a STARTED state to the result store when the task starts (one more write).
    track_started: bool | None = None
    #: How many executions may start per second, per worker or fleet-wide
    #: (:class:`~amqptasks.rate.RateLimit`; ``rate.OFF`` switches one set below off).
    rate_limit: RateLimit | None = None

    def merged(self, fallback: TaskPolicy) -> TaskPolicy:
        """This policy with every unset field taken from ``fallback``."""
        return TaskPolicy(
            **{
                f: getattr(fallback, f) if getattr(self, f) is None else getattr(self, f)
                for f in self.__slots__
            }
        )


def policy_flag(policy: TaskPolicy | None, field: str, default: bool) -> bool:
    """One on/off policy field (``ignore_result``, ``track_started``) of a task, else the
    setting it falls back to: the single place the caller and the worker's middlewares
    resolve it, so they never disagree about whether a result (or a reply) will come."""
    value = getattr(policy, field) if policy is not None else None
    return default if value is None else bool(value)


#: Built-in defaults: 3 retries; a retry without countdown waits default_retry_delay
#: seconds, or ``retry_backoff * 2**retries`` (capped, full jitter) when backoff is on.
DEFAULT_POLICY = TaskPolicy(
    max_retries=3,
    autoretry_for=(),
    retry_backoff=0.0,
    retry_backoff_max=600.0,
    retry_jitter=True,
    default_retry_delay=3.0,
    soft_time_limit=0.0,
    time_limit=0.0,
    acks_early=False,
    rate_limit=OFF,
)


#: The longest a revocation may hold: the longest broker-side delay (48.5 days), so a task
#: revoked while it waits in the delay levels can be held until it comes out.
MAX_REVOKE_EXPIRES = float(MAX_DELAY)


@dataclass(frozen=True, slots=True)
class RevokeSettings:
    """Revocations (``amqptasks control revoke``; docs/control.md)."""

    #: Seconds a revocation holds when the revoke does not say (``--expires``).
    expires: float = 86400.0
    #: Revoked ids a worker keeps in memory at most; beyond it the soonest to expire are
    #: dropped first (counted in ``inspect stats``, logged).
    max_ids: int = 100_000


@dataclass(frozen=True, slots=True)
class ResultSettings:
    #: Default for tasks that do not say: when true no result is kept or sent.
    ignore_result: bool = False
    #: Where results live: ``rpc://`` (direct reply-to to the caller only), ``sqlite:///PATH``
    #: (one host; the default, so AsyncResult(id) and chords work with no extra service) or
    #: ``redis://HOST:PORT/DB`` (shared by workers and callers on many hosts).
    backend: str = DEFAULT_RESULT_BACKEND
    #: Seconds a stored result lives before it is removed (every store really removes it).
    expires: float = 86400.0
    #: Default for tasks that do not set ``track_started``.
    track_started: bool = False

    @property
    def has_store(self) -> bool:
        """Whether results live in a store (sqlite, redis), which a chord needs to be counted
        in; ``rpc://`` is direct reply-to only."""
        return self.backend.split(":", 1)[0].lower() != "rpc"

    def __repr__(self) -> str:
        return (
            f"ResultSettings(backend={redact_url(self.backend)!r}, expires={self.expires!r}, "
            f"ignore_result={self.ignore_result!r}, track_started={self.track_started!r})"
        )


#: Whether workers publish events unless told otherwise (docs/events.md: the measured cost).
EVENTS_BY_DEFAULT = False


@dataclass(frozen=True, slots=True)
class EventSettings:
    """Task and worker events (docs/events.md)."""

    #: Workers publish task and worker events (``-E/--events``, ``--no-events``).
    enabled: bool = EVENTS_BY_DEFAULT
    #: Publishers (``App``) publish ``task-sent`` for each task they send.
    send_sent: bool = False
    #: Seconds between two ``worker-heartbeat`` events.
    heartbeat_interval: float = 2.0


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """OpenTelemetry trace propagation (``amqptasks[otel]``; amqptasks/tracing.py)."""

    #: Callers put the current trace context in each message's headers (``traceparent``);
    #: workers continue it with a span around each task.
    enabled: bool = False


DASHBOARD_KEYS = (
    "address",
    "port",
    "basic_auth",
    "api_tokens",
    "database",
    "events_queue",
    "max_tasks",
    "retention",
    "session_ttl",
    "management_url",
    "metrics_public",
)


@dataclass(frozen=True, slots=True)
class DashboardSettings:
    """``amqptasks dashboard`` (docs/dashboard.md). Credentials are kept as given (plain or
    hashed) and never shown: the repr counts them instead."""

    address: str = "127.0.0.1"
    port: int = 5555
    #: ``USER:PASSWORD`` or ``USER:<hash>`` (``amqptasks dashboard --hash-password``).
    basic_auth: tuple[str, ...] = ()
    #: Where ``basic_auth`` came from (``$AMQPTASKS_DASHBOARD_AUTH`` or the key path).
    basic_auth_source: str = "dashboard.basic_auth"
    #: ``NAME:sha256$<hex>`` digests of API tokens (``amqptasks dashboard --new-token NAME``).
    api_tokens: tuple[str, ...] = ()
    #: The task history (SQLite, WAL).
    database: str = ".amqptasks/dashboard.sqlite3"
    #: The durable queue bound to ``amqptasks.events`` that feeds the history.
    events_queue: str = "amqptasks.dashboard"
    max_tasks: int = 1_000_000
    #: Seconds of history kept (``7d``).
    retention: float = 7 * 86400.0
    #: Seconds a browser session lasts after its login.
    session_ttl: float = 8 * 3600.0
    #: The broker's management API (default: ``http://<broker host>:15672`` with the broker
    #: URL's user and password).
    management_url: str | None = None
    #: Serve ``/metrics`` without credentials (for a Prometheus on a trusted network).
    metrics_public: bool = False

    def __repr__(self) -> str:
        return (
            f"DashboardSettings(address={self.address!r}, port={self.port!r}, "
            f"basic_auth=<{len(self.basic_auth)} credential(s)>, "
            f"api_tokens=<{len(self.api_tokens)} token digest(s)>, "
            f"database={self.database!r}, events_queue={self.events_queue!r}, "
            f"max_tasks={self.max_tasks!r}, retention={self.retention!r}, "
            f"session_ttl={self.session_ttl!r}, management_url="
            f"{redact_url(self.management_url) if self.management_url else None!r}, "
            f"metrics_public={self.metrics_public!r})"
        )


@dataclass(frozen=True)
class Settings:
    """The whole validated configuration. Build with :func:`load_config` or :meth:`from_mapping`."""

    source: str = "<defaults>"
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    imports: tuple[str, ...] = ()
    topology: Topology = field(default_factory=Topology)
    routes: Mapping[str, Route] = field(default_factory=dict)
    default_route: Route | None = None
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    results: ResultSettings = field(default_factory=ResultSettings)
    events: EventSettings = field(default_factory=EventSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    revoke: RevokeSettings = field(default_factory=RevokeSettings)
    accept: frozenset[str] = frozenset({CONTENT_TYPE_JSON})
    #: Bodies larger than this are dead-lettered unread (reason ``too-large``).
    max_body_size: int = 10 * 1024 * 1024
    #: Run Celery protocol v2 messages (``serialization.celery_ingest``, docs/migration.md);
    #: when off, a Celery message is dead-lettered (reason ``celery-unsupported``).
    celery_ingest: bool = True
    task_policies: Mapping[str, TaskPolicy] = field(default_factory=dict)
    #: Default zone of cron schedules (``timezone:``), an IANA name.
    timezone: str = "UTC"
    #: Periodic tasks (``schedules:``), run by ``amqptasks beat`` / ``worker -B``.
    schedules: tuple[Schedule, ...] = ()
    #: ``amqptasks dashboard`` (``dashboard:``).
    dashboard: DashboardSettings = field(default_factory=DashboardSettings)

    def router(self) -> Router:
        return Router(self.routes, self.default_route)

    def task_policy(self, name: str) -> TaskPolicy:
        """The YAML ``tasks`` entry for ``name``: exact match, else the first matching glob."""
        exact = self.task_policies.get(name)
        if exact is not None:
            return exact
        for pattern, policy in self.task_policies.items():
            if is_glob(pattern) and fnmatch.fnmatchcase(name, pattern):
                return policy
        return TaskPolicy()

    @classmethod
    def from_mapping(
        cls, data: Any, source: str = "<mapping>", env: Mapping[str, str] | None = None
    ) -> Settings:
        return _Parser(source).settings(data, env or {})


def load_config(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Find, read and validate the config file; see the module docstring for the lookup order."""
    env = os.environ if env is None else env
    chosen = (
        Path(path)
        if path
        else Path(env["AMQPTASKS_CONFIG"])
        if env.get("AMQPTASKS_CONFIG")
        else DEFAULT_CONFIG_PATH
    )
    source = str(chosen)
    try:
        text = chosen.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            source, "", "file not found (pass --config PATH or set AMQPTASKS_CONFIG)"
        ) from None
    except OSError as exc:
        raise ConfigError(source, "", f"cannot be read: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except _DuplicateKey as exc:
        raise ConfigError(
            source, exc.key, f"duplicate key at line {exc.line} (first at line {exc.first})"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, "", f"invalid YAML{where}: {problem}") from None
    return _Parser(source).settings(data if data is not None else {}, env)


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: str, line: int, first: int) -> None:
        super().__init__(key)
        self.key = key
        self.line = line
        self.first = first


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that refuses a key given twice in one mapping, at any depth.

    YAML loaders let the last of two equal keys win silently: a second ``worker:`` section
    would drop the first without a word. The node tree is indexed by key path once composed,
    so the error can say where (``queues.web_tasks.bindings[0].exchange``). Keys brought in by
    a ``<<`` merge are not duplicates: an explicit key after a merge is YAML's override.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._paths: dict[int, str] = {}

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        if node is not None:
            self._index(node, "")
        return node

    def _index(self, node: yaml.Node, path: str) -> None:
        if id(node) in self._paths:  # an alias: already indexed where its anchor is
            return
        self._paths[id(node)] = path
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.tag == _MERGE_TAG:
                    continue
                name = key.value if isinstance(key, yaml.ScalarNode) else "?"
                self._index(value, _join(path, str(name)))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._index(item, f"{path}[{i}]")

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = first.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it
                continue
            line = key_node.start_mark.line + 1
            if seen is not None:
                raise _DuplicateKey(_join(self._paths.get(id(node), ""), str(key)), line, seen)
            first[key] = line
        return super().construct_mapping(node, deep)


T = TypeVar("T")


class _Parser:
    """Walks the YAML tree keeping the key path, so every error says exactly where."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.source, key, problem)

    def mapping(
        self, value: Any, key: str, allowed: tuple[str, ...] | None = None
    ) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key or "<top level>", f"expected a mapping, got {_kind(value)}")
        for k in value:
            if not isinstance(k, str):
                raise self.fail(key or "<top level>", f"keys must be strings, got {k!r}")
        if allowed is not None:
            for k in value:
                if k not in allowed:
                    raise self.fail(
                        _join(key, k), f"unknown key (allowed here: {', '.join(allowed)})"
                    )
        return value

    def typed(
        self,
        value: Any,
        key: str,
        typ: type[T],
        what: str,
        check: Callable[[T], bool] | None = None,
    ) -> T:
        ok = isinstance(value, typ) and not (typ is not bool and isinstance(value, bool))
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok or (check is not None and not check(value)):
            raise self.fail(key, f"expected {what}, got {_show(value)}")
        return value  # type: ignore[no-any-return]

    def name(self, value: Any, key: str, what: str) -> str:
        text = self.typed(value, key, str, f"{what} name (letters, digits, '_', '.', ':', '-')")
        if not _NAME.match(text):
            raise self.fail(
                key, f"expected {what} name (letters, digits, '_', '.', ':', '-'), got {text!r}"
            )
        return text

    def choice(self, value: Any, key: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.fail(key, f"expected one of {', '.join(choices)}, got {_show(value)}")
        return str(value)

    # -- sections ---------------------------------------------------------------------------
    def settings(self, data: Any, env: Mapping[str, str]) -> Settings:
        top = self.mapping(
            data,
            "",
            (
                "broker",
                "imports",
                "serialization",
                "topology",
                "exchanges",
                "queues",
                "routes",
                "default_route",
                "worker",
                "results",
                "events",
                "tracing",
                "revoke",
                "tasks",
                "timezone",
                "schedules",
                "dashboard",
            ),
        )
        broker = self.broker(top.get("broker", {}), env)
        imports = tuple(
            self.typed(m, f"imports[{i}]", str, "a module name", lambda s: bool(s.strip()))
            for i, m in enumerate(self.seq(top.get("imports", []), "imports"))
        )
        default_type, replicas = self.topology(top.get("topology", {}))
        exchanges = self.exchanges(top.get("exchanges", {}))
        specs = self.queues(top.get("queues", {}), exchanges, default_type, replicas)
        topology = build_topology(
            exchanges, specs, default_queue_type=default_type, replicas=replicas
        )
        routes = {
            pattern: self.route(value, _join("routes", pattern), exchanges, topology)
            for pattern, value in self.mapping(top.get("routes", {}), "routes").items()
        }
        default_route = (
            self.route(top["default_route"], "default_route", exchanges, topology)
            if top.get("default_route") is not None
            else None
        )
        accept, max_body_size, celery_ingest = self.serialization(top.get("serialization", {}))
        return Settings(
            source=self.source,
            broker=broker,
            imports=imports,
            topology=topology,
            routes=routes,
            default_route=default_route,
            worker=self.worker(top.get("worker", {})),
            results=self.results(top.get("results", {}), env),
            events=self.events(top.get("events", {})),
            tracing=self.tracing(top.get("tracing", {})),
            revoke=self.revoke(top.get("revoke", {})),
            accept=accept,
            max_body_size=max_body_size,
            celery_ingest=celery_ingest,
            task_policies=self.tasks(top.get("tasks", {})),
            timezone=self.timezone(top.get("timezone", "UTC")),
            schedules=self.schedules(
                top.get("schedules", {}),
                self.timezone(top.get("timezone", "UTC")),
                Router(routes, default_route),
                topology,
            ),
            dashboard=self.dashboard(top.get("dashboard", {}), env),
        )

    def seq(self, value: Any, key: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(key, f"expected a list, got {_kind(value)}")
        return value

    def broker(self, value: Any, env: Mapping[str, str]) -> BrokerSettings:
        section = self.mapping(
            value,
            "broker",
            ("url", "publish_timeout", "heartbeat", "consumer_timeout", "reconnect_max_delay"),
        )
        from_env = bool(env.get("AMQPTASKS_BROKER_URL"))
        key = "$AMQPTASKS_BROKER_URL" if from_env else "broker.url"
        urls = self.broker_urls(
            env["AMQPTASKS_BROKER_URL"] if from_env else section.get("url", DEFAULT_BROKER_URL),
            key,
        )
        timeout = self.typed(
            section.get("publish_timeout", 10.0),
            "broker.publish_timeout",
            float,
            "a positive number of seconds",
            lambda v: v > 0,
        )
        return BrokerSettings(
            urls=urls,
            publish_timeout=timeout,
            heartbeat=self.positive(section, "broker", "heartbeat", 30, int),
            consumer_timeout=self.positive(section, "broker", "consumer_timeout", 1800.0, float),
            reconnect_max_delay=self.positive(
                section, "broker", "reconnect_max_delay", 30.0, float
            ),
        )

    def broker_urls(self, value: Any, key: str) -> tuple[str, ...]:
        """``broker.url``: one URL, several in one comma-separated string, or a YAML list.

        Each address is checked on its own and an error names its index (``broker.url[1]``);
        all must name the same virtual host (they are the nodes of one cluster: a second
        vhost would be a second, separate set of queues).
        """
        what = "an amqp:// or amqps:// URL"
        if isinstance(value, list):
            if not value:
                raise self.fail(key, f"expected {what} or a non-empty list of them, got []")
            items = [
                (f"{key}[{i}]", self.typed(v, f"{key}[{i}]", str, what))
                for i, v in enumerate(value)
            ]
        else:
            text = self.typed(value, key, str, f"{what} (or a list of them)")
            parts = split_urls(text)
            items = (
                [(key, parts[0])]
                if len(parts) == 1
                else [(f"{key}[{i}]", part) for i, part in enumerate(parts)]
            )
        vhosts: list[tuple[str, str]] = []
        for where, url in items:
            hint = (
                " (several addresses: separate whole URLs with commas, each with its scheme, "
                "or give a YAML list)"
                if "," in url
                else ""
            )
            try:
                parts_ = urlsplit(url)
                parts_.port  # noqa: B018 - raises ValueError for a non-numeric or out-of-range port
            except ValueError:
                raise self.fail(where, f"expected {what}, got {redact_url(url)!r}{hint}") from None
            if (
                parts_.scheme not in ("amqp", "amqps")
                or not parts_.hostname
                or "," in parts_.netloc
            ):
                raise self.fail(where, f"expected {what}, got {redact_url(url)!r}{hint}")
            path = parts_.path
            vhosts.append((where, unquote(path[1:]) if len(path) > 1 else "/"))
        first_where, first_vhost = vhosts[0]
        for where, vhost in vhosts[1:]:
            if vhost != first_vhost:
                raise self.fail(
                    where,
                    f"virtual host {vhost!r} differs from {first_where}'s {first_vhost!r}: "
                    "the addresses are failover nodes of one broker and must name the same vhost",
                )
        urls = tuple(url for _, url in items)
        dupes = sorted({u for u in urls if urls.count(u) > 1})
        if dupes:
            raise self.fail(key, f"address {redact_url(dupes[0])!r} is listed twice")
        return urls

    def positive(
        self, section: Mapping[str, Any], path: str, key: str, default: T, typ: type[T]
    ) -> T:
        what = "a positive integer" if typ is int else "a positive number"
        return self.typed(section.get(key, default), _join(path, key), typ, what, lambda v: v > 0)  # type: ignore[operator]

    def exchanges(self, value: Any) -> dict[str, str]:
        out = {}
        for name, spec in self.mapping(value, "exchanges").items():
            key = _join("exchanges", name)
            self.name(name, key, "an exchange")
            if name.startswith("amq.") or name in RESERVED_EXCHANGES:
                raise self.fail(key, f"the name {name!r} is reserved")
            spec = self.mapping(spec if spec is not None else {}, key, ("type",))
            out[name] = self.choice(spec.get("type", "topic"), _join(key, "type"), EXCHANGE_TYPES)
        return out

    def topology(self, value: Any) -> tuple[str, int | None]:
        """``topology.default_queue_type`` (the type of every queue that does not say: work
        queues and their DLQs, the delay levels, the scheduler's lock and state) and
        ``topology.replicas`` (quorum queues' ``x-quorum-initial-group-size``)."""
        section = self.mapping(value, "topology", ("default_queue_type", "replicas"))
        kind = self.choice(
            section.get("default_queue_type", "classic"),
            "topology.default_queue_type",
            QUEUE_TYPES,
        )
        replicas = None
        if section.get("replicas") is not None:
            replicas = self.positive(section, "topology", "replicas", 3, int)
        return kind, replicas

    def queues(
        self,
        value: Any,
        exchanges: Mapping[str, str],
        default_type: str = "classic",
        default_replicas: int | None = None,
    ) -> list[QueueSpec]:
        specs = []
        for name, spec in self.mapping(value, "queues").items():
            key = _join("queues", name)
            self.name(name, key, "a queue")
            if reserved_queue(name):
                raise self.fail(
                    key,
                    f"the name {name!r} is reserved ('amq.*', '*{DLQ_SUFFIX}', "
                    f"'{REVOCATIONS_QUEUE}' and '{RATE_LIMIT_PREFIX}*' are not allowed)",
                )
            spec = self.mapping(
                spec if spec is not None else {},
                key,
                (
                    "bindings",
                    "type",
                    "max_priority",
                    "delivery_limit",
                    "max_length",
                    "overflow",
                    "replicas",
                ),
            )
            bindings = []
            for i, b in enumerate(self.seq(spec.get("bindings", []), _join(key, "bindings"))):
                bkey = f"{_join(key, 'bindings')}[{i}]"
                b = self.mapping(b, bkey, ("exchange", "routing_key"))
                if "exchange" not in b:
                    raise self.fail(_join(bkey, "exchange"), "is required")
                exchange = self.typed(
                    b["exchange"], _join(bkey, "exchange"), str, "an exchange name"
                )
                if exchange not in exchanges:
                    raise self.fail(
                        _join(bkey, "exchange"),
                        f"exchange {exchange!r} is not declared under 'exchanges' "
                        f"(declared: {', '.join(exchanges) or 'none'})",
                    )
                rk = self.typed(
                    b.get("routing_key", ""),
                    _join(bkey, "routing_key"),
                    str,
                    "a routing key string",
                )
                bindings.append((exchange, rk))
            qtype = self.choice(spec.get("type", default_type), _join(key, "type"), QUEUE_TYPES)
            replicas = default_replicas if qtype == "quorum" else None
            if spec.get("replicas") is not None:
                replicas = self.positive(spec, key, "replicas", 3, int)
                if qtype != "quorum":
                    raise self.fail(
                        _join(key, "replicas"),
                        "needs 'type: quorum' (classic queues are not replicated)",
                    )
            max_priority = spec.get("max_priority")
            if max_priority is not None:
                max_priority = self.typed(
                    max_priority,
                    _join(key, "max_priority"),
                    int,
                    "an integer from 1 to 255",
                    lambda v: 1 <= v <= 255,
                )
                if qtype == "quorum":
                    inherited = (
                        ""
                        if "type" in spec
                        else " (topology.default_queue_type is quorum: "
                        "give this queue 'type: classic')"
                    )
                    raise self.fail(
                        _join(key, "max_priority"),
                        f"quorum queues do not support priorities{inherited}",
                    )
            delivery_limit = None
            if spec.get("delivery_limit") is not None:
                delivery_limit = self.positive(spec, key, "delivery_limit", 1, int)
                if qtype != "quorum":
                    raise self.fail(
                        _join(key, "delivery_limit"),
                        "needs 'type: quorum' (classic queues count no deliveries)",
                    )
            max_length = None
            if spec.get("max_length") is not None:
                max_length = self.positive(spec, key, "max_length", 1, int)
            if "overflow" in spec:
                self.choice(spec["overflow"], _join(key, "overflow"), ("reject-publish",))
                if max_length is None:
                    raise self.fail(_join(key, "overflow"), "needs 'max_length'")
            specs.append(
                QueueSpec(
                    name,
                    tuple(bindings),
                    qtype,
                    max_priority,
                    delivery_limit,
                    max_length,
                    replicas,
                )
            )
        return specs

    def route(
        self, value: Any, key: str, exchanges: Mapping[str, str], topology: Topology
    ) -> Route:
        spec = self.mapping(value, key, ("exchange", "routing_key", "queue"))
        if "queue" in spec:
            if "exchange" in spec or "routing_key" in spec:
                raise self.fail(key, "give either 'queue' or 'exchange' + 'routing_key', not both")
            queue = self.typed(spec["queue"], _join(key, "queue"), str, "a queue name")
            target = topology.queue(queue)
            if target is None:
                raise self.fail(
                    _join(key, "queue"), f"queue {queue!r} is not declared under 'queues'"
                )
            if target.role != "work":
                raise self.fail(
                    _join(key, "queue"),
                    f"queue {queue!r} is a {target.role} queue; routes must target a work queue",
                )
            return Route.to_queue(queue)
        if "exchange" not in spec:
            raise self.fail(_join(key, "exchange"), "is required (or give 'queue')")
        exchange = self.typed(spec["exchange"], _join(key, "exchange"), str, "an exchange name")
        if exchange != DEFAULT_EXCHANGE and exchange not in exchanges:
            raise self.fail(
                _join(key, "exchange"),
                f"exchange {exchange!r} is not declared under 'exchanges' "
                f"(declared: {', '.join(exchanges) or 'none'})",
            )
        if "routing_key" not in spec:
            raise self.fail(_join(key, "routing_key"), "is required")
        rk = self.typed(spec["routing_key"], _join(key, "routing_key"), str, "a routing key string")
        reached = topology.reaches(exchange, rk)
        if not reached:
            raise self.fail(
                _join(key, "routing_key"),
                f"routing key {rk!r} on exchange {exchange!r} reaches no declared queue "
                "(add a matching binding under 'queues')",
            )
        for name in reached:  # e.g. exchange '' with routing key '<queue>.dlq'
            target = topology.queue(name)
            if target is not None and target.role != "work":
                raise self.fail(
                    _join(key, "routing_key"),
                    f"routing key {rk!r} on exchange {exchange!r} reaches {name!r}, a "
                    f"{target.role} queue; routes must target a work queue",
                )
        return Route(exchange, rk)

    def worker(self, value: Any) -> WorkerSettings:
        section = self.mapping(value, "worker", ("concurrency", "prefetch_multiplier", "pool"))
        return WorkerSettings(
            concurrency=self.positive(section, "worker", "concurrency", 8, int),
            prefetch_multiplier=self.positive(section, "worker", "prefetch_multiplier", 4, int),
            pool=self.choice(section.get("pool", "threads"), "worker.pool", POOLS),
        )

    def results(self, value: Any, env: Mapping[str, str]) -> ResultSettings:
        section = self.mapping(
            value, "results", ("backend", "expires", "ignore_result", "track_started")
        )
        key = (
            "$AMQPTASKS_RESULT_BACKEND"
            if env.get("AMQPTASKS_RESULT_BACKEND")
            else "results.backend"
        )
        backend = self.typed(
            env.get("AMQPTASKS_RESULT_BACKEND") or section.get("backend", DEFAULT_RESULT_BACKEND),
            key,
            str,
            "a result store URL (rpc://, sqlite:///PATH, redis://HOST:PORT/DB)",
        )
        scheme, sep, rest = backend.partition("://")
        if not sep or scheme not in RESULT_SCHEMES:
            raise self.fail(
                key,
                f"expected rpc://, sqlite:///PATH or redis://HOST:PORT/DB, got "
                f"{redact_url(backend)!r}",
            )
        if scheme == "sqlite" and not rest.startswith("/"):
            raise self.fail(
                key,
                "a sqlite URL has three slashes before a relative path "
                f"(sqlite:///results.db) and four before an absolute one, got {backend!r}",
            )
        if scheme == "sqlite" and len(rest) < 2:
            raise self.fail(key, "a sqlite URL needs a file path (sqlite:///results.db)")
        return ResultSettings(
            ignore_result=self.typed(
                section.get("ignore_result", False), "results.ignore_result", bool, "true or false"
            ),
            backend=backend,
            expires=self.positive(section, "results", "expires", 86400.0, float),
            track_started=self.typed(
                section.get("track_started", False), "results.track_started", bool, "true or false"
            ),
        )

    def events(self, value: Any) -> EventSettings:
        section = self.mapping(value, "events", ("enabled", "send_sent", "heartbeat_interval"))
        return EventSettings(
            enabled=self.typed(
                section.get("enabled", EVENTS_BY_DEFAULT),
                "events.enabled",
                bool,
                "true or false",
            ),
            send_sent=self.typed(
                section.get("send_sent", False), "events.send_sent", bool, "true or false"
            ),
            heartbeat_interval=self.positive(section, "events", "heartbeat_interval", 2.0, float),
        )

    def tracing(self, value: Any) -> TracingSettings:
        section = self.mapping(value, "tracing", ("enabled",))
        return TracingSettings(
            enabled=self.typed(
                section.get("enabled", False), "tracing.enabled", bool, "true or false"
            )
        )

    def dashboard(self, value: Any, env: Mapping[str, str]) -> DashboardSettings:
        section = self.mapping(value, "dashboard", DASHBOARD_KEYS)
        d = DashboardSettings()
        address = self.typed(
            section.get("address", d.address),
            "dashboard.address",
            str,
            "a host name or IP address",
            lambda v: bool(v.strip()),
        )
        port = self.typed(
            section.get("port", d.port),
            "dashboard.port",
            int,
            "a TCP port (1-65535)",
            lambda v: 0 < v < 65536,
        )
        if env.get("AMQPTASKS_DASHBOARD_AUTH"):
            auth_key, raw = "$AMQPTASKS_DASHBOARD_AUTH", env["AMQPTASKS_DASHBOARD_AUTH"]
        else:
            auth_key, raw = "dashboard.basic_auth", section.get("basic_auth", [])
        basic_auth = self.credentials(raw, auth_key, "USER:PASSWORD (or USER:<hash>)")
        tokens = self.credentials(
            section.get("api_tokens", []), "dashboard.api_tokens", "NAME:sha256$<hex digest>"
        )
        for i, token in enumerate(tokens):
            if not token.partition(":")[2].startswith("sha256$"):
                raise self.fail(
                    f"dashboard.api_tokens[{i}]",
                    "expected NAME:sha256$<hex digest> (amqptasks dashboard --new-token NAME "
                    "prints one); the token itself is never stored",
                )
        retention = self.duration(section.get("retention", "7d"), "dashboard.retention")
        ttl = self.duration(section.get("session_ttl", "8h"), "dashboard.session_ttl")
        mgmt = section.get("management_url")
        if mgmt is not None:
            mgmt = self.typed(mgmt, "dashboard.management_url", str, "an http(s):// URL")
            if urlsplit(mgmt).scheme not in ("http", "https") or not urlsplit(mgmt).hostname:
                raise self.fail(
                    "dashboard.management_url",
                    f"expected an http:// or https:// URL, got {redact_url(mgmt)!r}",
                )
        return DashboardSettings(
            address=address.strip(),
            port=port,
            basic_auth=basic_auth,
            basic_auth_source=auth_key,
            api_tokens=tokens,
            database=self.typed(
                section.get("database", d.database),
                "dashboard.database",
                str,
                "a file path",
                lambda v: bool(v.strip()),
            ),
            events_queue=self.name(
                section.get("events_queue", d.events_queue), "dashboard.events_queue", "a queue"
            ),
            max_tasks=self.positive(section, "dashboard", "max_tasks", d.max_tasks, int),
            retention=retention,
            session_ttl=ttl,
            management_url=mgmt,
            metrics_public=self.typed(
                section.get("metrics_public", False),
                "dashboard.metrics_public",
                bool,
                "true or false",
            ),
        )

    def duration(self, value: Any, key: str) -> float:
        try:
            seconds = parse_duration(value).total_seconds()
        except ValueError as exc:
            raise self.fail(key, str(exc)) from None
        if seconds <= 0:
            raise self.fail(key, "must be longer than 0 seconds")
        return seconds

    def credentials(self, value: Any, key: str, what: str) -> tuple[str, ...]:
        """A list of ``NAME:SECRET`` strings (or one comma-separated string, Flower's form).
        An error names the entry but never shows it: it holds a secret."""
        if isinstance(value, str):
            items: list[Any] = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, list):
            items = value
        else:
            raise self.fail(key, f"expected a list of {what}, got {_kind(value)}")
        for i, item in enumerate(items):
            name, sep, secret = item.partition(":") if isinstance(item, str) else ("", "", "")
            if not (sep and name.strip() and secret):
                raise self.fail(
                    f"{key}[{i}]",
                    f"expected {what} (the value is not shown: it may hold a secret)",
                )
        return tuple(items)

    def revoke(self, value: Any) -> RevokeSettings:
        section = self.mapping(value, "revoke", ("expires", "max_ids"))
        return RevokeSettings(
            expires=self.typed(
                section.get("expires", 86400.0),
                "revoke.expires",
                float,
                f"seconds > 0 and at most {MAX_REVOKE_EXPIRES:.0f} (48.5 days, the longest delay)",
                lambda v: 0 < v <= MAX_REVOKE_EXPIRES,
            ),
            max_ids=self.positive(section, "revoke", "max_ids", 100_000, int),
        )

    def rate_limit(self, value: Any, key: str) -> RateLimit:
        """``"10/s"``, ``0`` (off), or ``{rate: "10/s", scope: worker|fleet, burst: N}``."""
        if isinstance(value, dict):
            spec = self.mapping(value, key, RATE_LIMIT_KEYS)
            if "rate" not in spec:
                raise self.fail(_join(key, "rate"), "is required (e.g. '10/s', '100/m', '2/h')")
            rate, rate_key = spec["rate"], _join(key, "rate")
            scope = self.choice(spec.get("scope", "worker"), _join(key, "scope"), SCOPES)
            burst = self.positive(spec, key, "burst", 1, int)
        else:
            rate, rate_key, scope, burst = value, key, "worker", 1
        try:
            return rate_limit(rate, scope, burst)
        except ValueError as exc:
            raise self.fail(rate_key, str(exc)) from None

    def serialization(self, value: Any) -> tuple[frozenset[str], int, bool]:
        section = self.mapping(value, "serialization", ("accept", "max_body_size", "celery_ingest"))
        accept = self.seq(section.get("accept", [CONTENT_TYPE_JSON]), "serialization.accept")
        if not accept:
            raise self.fail("serialization.accept", "must list at least one content type")
        types = frozenset(
            self.choice(v, f"serialization.accept[{i}]", ACCEPTABLE) for i, v in enumerate(accept)
        )
        size = self.positive(section, "serialization", "max_body_size", 10 * 1024 * 1024, int)
        celery = self.typed(
            section.get("celery_ingest", True),
            "serialization.celery_ingest",
            bool,
            "true or false",
        )
        return types, size, celery

    def timezone(self, value: Any) -> str:
        name = self.typed(value, "timezone", str, "an IANA time zone name such as 'UTC'")
        try:
            zone(name)
        except ValueError as exc:
            raise self.fail("timezone", str(exc)) from None
        return name

    def schedules(
        self, value: Any, default_tz: str, router: Router, topology: Topology
    ) -> tuple[Schedule, ...]:
        out = []
        for name, spec in self.mapping(value, "schedules").items():
            key = _join("schedules", name)
            spec = self.mapping(spec if spec is not None else {}, key, SCHEDULE_KEYS)
            try:
                s = build_schedule(name, spec, default_tz)
            except ScheduleFieldError as exc:
                raise self.fail(_join(key, exc.key) if exc.key else key, exc.problem) from None
            override = next(
                (k for k in ("queue", "routing_key", "exchange") if spec.get(k) is not None),
                "task",
            )
            try:
                route = router.route(
                    s.task, exchange=s.exchange, routing_key=s.routing_key, queue=s.queue
                )
            except RoutingError as exc:
                raise self.fail(_join(key, override), str(exc)) from None
            if not topology.reaches(route.exchange, route.routing_key):
                raise self.fail(
                    _join(key, override),
                    f"task {s.task!r} would be published to exchange {route.exchange!r} with "
                    f"routing key {route.routing_key!r}, which reaches no declared queue",
                )
            out.append(s)
        return tuple(out)

    def tasks(self, value: Any) -> dict[str, TaskPolicy]:
        out = {}
        for pattern, spec in self.mapping(value, "tasks").items():
            key = _join("tasks", pattern)
            spec = self.mapping(spec if spec is not None else {}, key, TASK_KEYS)
            values: dict[str, Any] = {}
            for name in ("max_retries",):
                if name in spec:
                    values[name] = self.typed(
                        spec[name],
                        _join(key, name),
                        int,
                        "a non-negative integer",
                        lambda v: v >= 0,
                    )
            for name in (
                "retry_backoff_max",
                "default_retry_delay",
                "soft_time_limit",
                "time_limit",
            ):
                if name in spec:
                    values[name] = self.positive(spec, key, name, 1.0, float)
            if "retry_backoff" in spec:
                raw = spec["retry_backoff"]
                # true means "1 second base", like Celery; a number is the base in seconds.
                values["retry_backoff"] = (
                    (1.0 if raw else 0.0)
                    if isinstance(raw, bool)
                    else self.positive(spec, key, "retry_backoff", 1.0, float)
                )
            for name in ("retry_jitter", "acks_early", "ignore_result", "track_started"):
                if name in spec:
                    values[name] = self.typed(spec[name], _join(key, name), bool, "true or false")
            if "autoretry_for" in spec:
                values["autoretry_for"] = tuple(
                    self.typed(
                        v,
                        f"{_join(key, 'autoretry_for')}[{i}]",
                        str,
                        "an exception class name",
                        lambda t: t.isidentifier(),
                    )
                    for i, v in enumerate(
                        self.seq(spec["autoretry_for"], _join(key, "autoretry_for"))
                    )
                )
            if "rate_limit" in spec:
                values["rate_limit"] = self.rate_limit(spec["rate_limit"], _join(key, "rate_limit"))
            policy = TaskPolicy(**values)
            if (
                policy.soft_time_limit
                and policy.time_limit
                and (policy.soft_time_limit >= policy.time_limit)
            ):
                raise self.fail(_join(key, "soft_time_limit"), "must be below time_limit")
            out[pattern] = policy
        return out


def _join(key: str, part: str) -> str:
    return f"{key}.{part}" if key else part


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
    }.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    return (
        f"{_kind(value)} {value!r}" if isinstance(value, (str, int, float, bool)) else _kind(value)
    )
