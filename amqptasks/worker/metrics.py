"""Prometheus metrics of one worker: ``amqptasks worker --metrics-port P`` (docs/metrics.md).

The only module that imports prometheus-client. Counting costs the delivery path almost
nothing: what the worker counts anyway (outcomes per task in :class:`~.stats.Stats`, running
and reserved deliveries in the :class:`~.tracker.Tracker`, unsettled deliveries in the
consumer's ack window, reconnects, the pool's size) is read when Prometheus scrapes, and the
:class:`MetricsObserver` — an :class:`~.observer.Observer`, so both paths feed it without a
branch — only adds a task's runtime to its histogram buckets (one bisect, two additions) and
counts dead letters by queue and reason. Scrapes are served from a thread of their own and
read the loop's counters by copying them (a copy of a dict or list is one step under the GIL).

* ``--metrics-address`` is 127.0.0.1 unless told otherwise; any address that is not
  loopback needs credentials (``--metrics-auth USER:PASS`` or ``$AMQPTASKS_METRICS_AUTH``),
  checked with HTTP basic auth in constant time, or the worker refuses to start.
* The password is never logged or shown: the banner names the user only.
"""

from __future__ import annotations

import bisect
import hmac
import ipaddress
import logging
import math
import socket
import threading
from base64 import b64encode
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from ..errors import TaskExpired
from ..protocol import Envelope
from .middleware import Outcome
from .observer import Observer

if TYPE_CHECKING:
    from .core import Worker

__all__ = [
    "BUCKETS",
    "MetricsObserver",
    "MetricsServer",
    "is_loopback",
    "parse_auth",
]

log = logging.getLogger("amqptasks.metrics")

#: Upper bounds (seconds) of the runtime histogram's buckets: from a no-op task to the
#: broker's default consumer_timeout.
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
           120.0, 300.0, 600.0, 1800.0)  # fmt: skip


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``: nobody off this host can connect."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def loopback_host(header: str | None) -> bool:
    """Whether an HTTP ``Host`` header names this machine (``127.0.0.1:9808``, ``[::1]:9808``,
    ``localhost``). A server without credentials answers only those: a web page whose name
    was rebound to 127.0.0.1 sends its own name, and must not read the worker's metrics."""
    host = (header or "").strip()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return is_loopback(host.lower())


def parse_auth(text: str, where: str) -> tuple[str, str]:
    """``USER:PASS`` -> (user, password); ``ValueError`` naming ``where`` (never the
    password) when it is not that."""
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError(f"{where}: expected USER:PASS with a non-empty user and password")
    return user, password


class MetricsObserver(Observer):
    """What the worker does not count already: runtimes per task, dead letters per reason."""

    def __init__(self) -> None:
        #: task -> [count per bucket of BUCKETS, then the +Inf bucket]; and the runtimes' sum.
        self.runtime_buckets: dict[str, list[int]] = {}
        self.runtime_sums: dict[str, float] = {}
        #: (queue, reason) -> dead letters.
        self.dead_letters: Counter[tuple[str, str]] = Counter()

    def _observe(self, task: str, runtime: float) -> None:
        buckets = self.runtime_buckets.get(task)
        if buckets is None:
            buckets = self.runtime_buckets[task] = [0] * (len(BUCKETS) + 1)
            self.runtime_sums[task] = 0.0
        buckets[bisect.bisect_left(BUCKETS, runtime)] += 1
        self.runtime_sums[task] += runtime

    def finished(self, env: Envelope, queue: str, outcome: Outcome) -> None:
        if not outcome.preset:  # a preset outcome (a duplicate's stored one) did not run
            super().finished(env, queue, outcome)

    def succeeded(self, env: Envelope, queue: str, runtime: float, result: Any) -> None:
        self._observe(env.task, runtime)

    def failed(self, env: Envelope, queue: str, outcome: Outcome) -> None:
        if not isinstance(outcome.exc, TaskExpired):  # expired waiting for a child: not run
            self._observe(env.task, outcome.runtime)

    def dead_lettered(self, queue: str, reason: str, env: Envelope | None) -> None:
        self.dead_letters[queue, reason] += 1


class WorkerCollector(Collector):
    """Builds the metric families from one worker's state at scrape time."""

    def __init__(self, worker: Worker, observer: MetricsObserver) -> None:
        self.worker = worker
        self.observer = observer

    def collect(self) -> Iterator[Any]:
        w, o = self.worker, self.observer
        outcomes = dict(w.stats.outcomes)
        tasks = CounterMetricFamily(
            "amqptasks_tasks",
            "Deliveries taken by this worker, by task and outcome (succeeded, failed, "
            "retried, rejected, expired, revoked).",
            labels=("task", "outcome"),
        )
        retries = CounterMetricFamily(
            "amqptasks_task_retries", "Retries scheduled, by task.", labels=("task",)
        )
        for (task, outcome), n in sorted(outcomes.items()):
            tasks.add_metric((task, outcome), n)
            if outcome == "retried":
                retries.add_metric((task,), n)
        yield tasks
        yield retries
        runtime = HistogramMetricFamily(
            "amqptasks_task_runtime_seconds",
            "How long tasks ran (succeeded, failed or retried), by task.",
            labels=("task",),
        )
        sums = dict(o.runtime_sums)
        for task, counts in sorted(dict(o.runtime_buckets).items()):
            counts = list(counts)
            cumulative, total = [], 0
            for bound, n in zip((*BUCKETS, math.inf), counts, strict=True):
                total += n
                cumulative.append(("+Inf" if bound == math.inf else repr(bound), total))
            runtime.add_metric((task,), cumulative, sums.get(task, 0.0))
        yield runtime
        dead = CounterMetricFamily(
            "amqptasks_dead_lettered",
            "Deliveries sent to their dead-letter queue, by work queue and reason.",
            labels=("queue", "reason"),
        )
        for (queue, reason), n in sorted(dict(o.dead_letters).items()):
            dead.add_metric((queue, reason), n)
        yield dead
        yield CounterMetricFamily(
            "amqptasks_reconnects",
            "Times the consuming connection was established again after a loss.",
            value=w.stats.reconnects,
        )
        gauges = (
            ("amqptasks_tasks_running", "Tasks running now (in flight).", len(w.tracker.active)),
            (
                "amqptasks_tasks_reserved",
                "Deliveries taken and waiting for a slot.",
                len(w.tracker.reserved),
            ),
            (
                "amqptasks_prefetch_in_use",
                "Deliveries received and not settled yet (every queue).",
                w.consuming.held,
            ),
            ("amqptasks_prefetch", "The prefetch limit per consumer.", w.pool.prefetch),
            ("amqptasks_pool_size", "Tasks that may run at once now.", w.pool.size),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)


#: Seconds a scrape connection may take to send its request (then it is closed).
REQUEST_TIMEOUT = 10.0
#: Connections served at once; more are closed at once (a scraper needs one).
MAX_CONNECTIONS = 16


class BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, as ThreadingHTTPServer, but at most MAX_CONNECTIONS of them:
    idle sockets opened by anyone who can reach the port cannot pile up threads in the
    worker's process before the credentials are even read."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: closed, the scraper retries next interval
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # ThreadingMixIn's, with the slot given back *before* the socket is closed: a client
        # that saw its connection end can connect again at once.
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self._slots.release()
            self.shutdown_request(request)


class MetricsServer:
    """Serves ``/metrics`` over HTTP on ``address:port`` from a daemon thread."""

    def __init__(
        self,
        worker: Worker,
        observer: MetricsObserver,
        *,
        port: int,
        address: str = "127.0.0.1",
        auth: tuple[str, str] | None = None,
    ) -> None:
        if auth is None and not is_loopback(address):
            raise ValueError(
                f"--metrics-address {address} is not loopback: give credentials with "
                "--metrics-auth USER:PASS or $AMQPTASKS_METRICS_AUTH (basic auth), or listen "
                "on 127.0.0.1"
            )
        self.address, self.port, self.auth_user = address, port, auth[0] if auth else None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(WorkerCollector(worker, observer))
        self._expected = (
            ("Basic " + b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()).encode()
            if auth
            else None
        )
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/metrics"

    def describe(self) -> str:
        """For the banner: where, and the user (never the password)."""
        auth = f" (basic auth, user {self.auth_user})" if self.auth_user else ""
        return self.url + auth

    def authorized(self, header: str | None) -> bool:
        if self._expected is None:
            return True
        return hmac.compare_digest((header or "").encode(), self._expected)

    def start(self) -> None:
        """Listen now (``OSError`` when the address cannot be bound) and serve in a thread."""
        server = self

        class Handler(BaseHTTPRequestHandler):
            # A client that sends nothing (or dribbles) is cut off: each connection holds a
            # thread of the worker's process until then.
            timeout = REQUEST_TIMEOUT

            def do_GET(self) -> None:
                if server._expected is None and not loopback_host(self.headers.get("Host")):
                    self.send_error(403, "no credentials here: only a loopback Host is served")
                    return
                if not server.authorized(self.headers.get("Authorization")):
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="amqptasks metrics"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = generate_latest(server.registry)
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metrics %s: " + format, self.client_address[0], *args)

        kind: type[ThreadingHTTPServer] = BoundedHTTPServer
        if ":" in self.address:

            class V6(BoundedHTTPServer):
                address_family = socket.AF_INET6

            kind = V6
        self._server = kind((self.address, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]  # the chosen one when port 0 was asked
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="amqptasks-metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
