"""The local broker as the harness sees it: a private vhost per measurement group (created and
deleted through the management API), exact queue depths by passive declare, fast pre-filling.
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions

from .peers.common import PLACEHOLDER_ID
from .procs import BenchError, proc_stats

HOST = "127.0.0.1"
AMQP_PORT = int(os.environ.get("AMQPTASKS_BROKER_PORT", "5672"))
MGMT_PORT = int(os.environ.get("AMQPTASKS_MGMT_PORT", "15672"))
MGMT = f"http://{HOST}:{MGMT_PORT}/api"
_AUTH = "Basic " + base64.b64encode(b"guest:guest").decode()


def mgmt(method: str, path: str, body: Any = None, ok: tuple[int, ...] = ()) -> Any:
    """Call the management HTTP API as guest (loopback only); ``ok`` lists tolerated errors."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        MGMT + path,
        data=data,
        method=method,
        headers={"Authorization": _AUTH, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            return json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        if exc.code in ok:
            return None
        raise


def _beam_cpu_seconds() -> float | None:
    """CPU seconds used so far by the local RabbitMQ node(s) (``beam.smp``), or None if no
    node runs on this machine (a remote broker)."""
    tick = os.sysconf("SC_CLK_TCK")
    used = [
        (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        for _pid, name, fields in proc_stats()
        if name == "beam.smp"
    ]
    return sum(used) if used else None


def wait_until_broker_idle(
    limit: float = 0.15, timeout: float = 90.0, interval: float = 1.0
) -> float | None:
    """Wait (bounded) until the local node uses less than ``limit`` of a CPU over ``interval``.

    After a heavy group (hundreds of thousands of persistent messages, vhosts deleted) the
    node keeps compacting and collecting for a while; a latency measured meanwhile measures
    that. Returns the seconds waited, or None when no local node was found.
    """
    start = time.monotonic()
    before = _beam_cpu_seconds()
    if before is None:
        return None
    while time.monotonic() - start < timeout:
        time.sleep(interval)
        now = _beam_cpu_seconds()
        if now is None:
            return None
        if (now - before) / interval < limit:
            break
        before = now
    return time.monotonic() - start


def overview() -> dict[str, Any]:
    result: dict[str, Any] = mgmt("GET", "/overview")
    return result


def wait_for_broker(timeout: float = 180) -> bool:
    """True once the management API and the AMQP port answer (False after ``timeout`` s): other
    people's tests may stop the local node for a while."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            overview()
            params = pika.URLParameters(f"amqp://guest:guest@{HOST}:{AMQP_PORT}/%2F")
            params.connection_attempts = 1
            params.socket_timeout = 5
            pika.BlockingConnection(params).close()
            return True
        except (OSError, pika.exceptions.AMQPError):
            if time.monotonic() > deadline:
                return False
            time.sleep(1)


@dataclass(frozen=True)
class Template:
    """One message exactly as a framework published it, with :data:`PLACEHOLDER_ID` where
    its id goes; :meth:`make` stamps a fresh id into a copy — made the framework's own way
    (``new_id``): a store that indexes results by id pays for random ids, so every worker
    must meet the ids its framework would have sent."""

    body: bytes
    props: dict[str, Any]
    new_id: Callable[[], str] = field(default=lambda: str(uuid.uuid4()))

    def make(self) -> tuple[bytes, pika.BasicProperties]:
        uid = self.new_id()
        body = self.body.replace(PLACEHOLDER_ID.encode(), uid.encode())
        props = {k: _stamp(v, uid) for k, v in self.props.items()}
        return body, pika.BasicProperties(**props)


def _stamp(value: Any, uid: str) -> Any:
    if isinstance(value, str):
        return value.replace(PLACEHOLDER_ID, uid)
    if isinstance(value, dict):
        return {k: _stamp(v, uid) for k, v in value.items()}
    if isinstance(value, list):
        return [_stamp(v, uid) for v in value]
    return value


_PROPS = (
    "content_type",
    "content_encoding",
    "headers",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
)


#: Every vhost of this run starts with this prefix (see :func:`delete_run_vhosts`).
RUN_PREFIX = f"bench-{uuid.uuid4().hex[:6]}-"


def delete_run_vhosts() -> list[str]:
    """Delete whatever vhost of this run is still there (the safety net at exit)."""
    gone = []
    for v in mgmt("GET", "/vhosts") or []:
        name = v.get("name", "")
        if name.startswith(RUN_PREFIX):
            mgmt("DELETE", f"/vhosts/{urllib.parse.quote(name, safe='')}", ok=(404,))
            gone.append(name)
    return gone


class VHost:
    """A private vhost on the local broker, with one blocking AMQP connection for the harness."""

    def __init__(self, label: str) -> None:
        self.name = f"{RUN_PREFIX}{label}-{uuid.uuid4().hex[:6]}"
        self.url = f"amqp://guest:guest@{HOST}:{AMQP_PORT}/{urllib.parse.quote(self.name, safe='')}"
        self._q = urllib.parse.quote(self.name, safe="")
        mgmt("PUT", f"/vhosts/{self._q}", {})
        mgmt(
            "PUT", f"/permissions/{self._q}/guest", {"configure": ".*", "write": ".*", "read": ".*"}
        )
        self._conn: pika.BlockingConnection | None = None
        self._ch: Any = None

    # -- AMQP -------------------------------------------------------------------------------
    def channel(self) -> Any:
        if self._ch is None or not self._ch.is_open:
            if self._conn is None or not self._conn.is_open:
                params = pika.URLParameters(self.url)
                params.heartbeat = 0
                self._conn = pika.BlockingConnection(params)
            self._ch = self._conn.channel()
        return self._ch

    def declare(self, queue: str) -> None:
        self.channel().queue_declare(queue, durable=True)

    def depth(self, queue: str) -> tuple[int, int]:
        """(ready messages, consumers) by passive declare: exact, not the stats sample."""
        try:
            ok = self.channel().queue_declare(queue, passive=True).method
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._ch = None
            if exc.reply_code == 404:
                return 0, 0
            raise
        return int(ok.message_count), int(ok.consumer_count)

    def purge(self, queue: str) -> None:
        if self.depth(queue)[0]:
            self.channel().queue_purge(queue)

    def take_template(self, queue: str, new_id: Callable[[], str], timeout: float = 10) -> Template:
        """basic.get the seed message a framework client published, as a :class:`Template`
        whose copies get ids from ``new_id``."""
        deadline = time.monotonic() + timeout
        ch = self.channel()
        while True:
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is not None:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"the seed message never reached queue {queue!r}")
            time.sleep(0.05)
        if PLACEHOLDER_ID.encode() not in body and PLACEHOLDER_ID not in repr(props):
            raise BenchError(f"seed message in {queue!r} does not carry the placeholder id")
        fields = {k: getattr(props, k) for k in _PROPS if getattr(props, k) is not None}
        return Template(body, fields, new_id)

    def peek(self, queue: str, n: int) -> list[str]:
        """What up to ``n`` messages at the head of ``queue`` are (id, task, redelivered),
        put back afterwards: for an error message about messages that should not be there."""
        ch = self.channel()
        out, tags = [], []
        for _ in range(n):
            method, props, body = ch.basic_get(queue, auto_ack=False)
            if method is None:
                break
            tags.append(method.delivery_tag)
            headers = props.headers or {}
            task = headers.get("task") or body[:80].decode(errors="replace")
            out.append(
                f"id={props.message_id or headers.get('id')} task={task} "
                f"redelivered={method.redelivered}"
            )
        for tag in tags:
            ch.basic_nack(tag, requeue=True)
        return out

    def publish_copies(self, queue: str, template: Template, n: int) -> None:
        """Publish ``n`` fresh copies of ``template`` (unconfirmed, through the default
        exchange)."""
        ch = self.channel()
        for _ in range(n):
            body, props = template.make()
            ch.basic_publish("", queue, body, props)

    def prefill(self, queue: str, template: Template, n: int, timeout: float) -> None:
        """Publish ``n`` fresh copies of ``template`` to ``queue`` and wait until all are
        enqueued (unconfirmed publishes, then an exact depth check: fast and still exact)."""
        before = self.depth(queue)[0]
        self.publish_copies(queue, template, n)
        deadline = time.monotonic() + timeout
        while self.depth(queue)[0] < before + n:
            if time.monotonic() > deadline:
                raise BenchError(
                    f"prefill: only {self.depth(queue)[0]} of {before + n} messages enqueued"
                )
            time.sleep(0.05)

    # -- management API ---------------------------------------------------------------------
    def queues(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = mgmt("GET", f"/queues/{self._q}") or []
        return result

    def totals(self) -> tuple[int, int]:
        """(messages, unacknowledged) over every queue of the vhost (stats: ~5 s old)."""
        qs = self.queues()
        return (
            sum(int(q.get("messages", 0) or 0) for q in qs),
            sum(int(q.get("messages_unacknowledged", 0) or 0) for q in qs),
        )

    def delete(self) -> None:
        """Delete the vhost and everything in it (retried once after the broker is back)."""
        try:
            if self._conn is not None and self._conn.is_open:
                self._conn.close()
        except Exception:
            pass
        self._conn = self._ch = None
        try:
            mgmt("DELETE", f"/vhosts/{self._q}", ok=(404,))
        except OSError:
            wait_for_broker(60)
            mgmt("DELETE", f"/vhosts/{self._q}", ok=(404,))


def drain_marks(
    samples: list[tuple[float, int]], n: int, skip: int
) -> tuple[float, float, int] | None:
    """Throughput window from (time, ready-depth) samples of a queue that started at ``n``:
    the times the depth crossed ``n - skip`` and ``n // 10`` (linear interpolation between
    polls) and the number of messages between them. None if the marks were not crossed."""
    hi = n - skip
    lo = n // 10
    if hi <= lo:
        return None

    def crossing(mark: int) -> float | None:
        prev: tuple[float, int] | None = None
        for t, d in samples:
            if d <= mark:
                if prev is None or prev[1] == d:
                    return t
                pt, pd = prev
                return pt + (t - pt) * (pd - mark) / (pd - d)
            prev = (t, d)
        return None

    t_hi, t_lo = crossing(hi), crossing(lo)
    if t_hi is None or t_lo is None or t_lo <= t_hi:
        return None
    return t_hi, t_lo, hi - lo


def poll_depth(
    vh: VHost,
    queue: str,
    until_empty_timeout: float,
    interval: float,
    healthy: Callable[[], str | None],
) -> list[tuple[float, int]]:
    """Sample the ready depth every ``interval`` s until it is 0 (bounded; ``healthy()``
    returns an error text when a worker died)."""
    samples: list[tuple[float, int]] = []
    deadline = time.monotonic() + until_empty_timeout
    while True:
        t = time.perf_counter()
        depth = vh.depth(queue)[0]
        samples.append((t, depth))
        if depth == 0:
            return samples
        problem = healthy()
        if problem:
            raise BenchError(problem)
        if time.monotonic() > deadline:
            raise BenchError(
                f"queue {queue!r} not drained within {until_empty_timeout:.0f}s ({depth} left)"
            )
        time.sleep(interval)
