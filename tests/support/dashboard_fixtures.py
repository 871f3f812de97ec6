"""``amqptasks dashboard`` as a subprocess, the way a user runs it, and a small HTTP client.

The broker user of a dashboard test has a password of its own (made per test), so a test
can search every page, answer and log line for it."""

from __future__ import annotations

import base64
import json
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from broker_fixtures import AMQP_PORT, ROOT, Broker, amqptasks_exe, cli_env, mgmt

USER, PASSWORD = "ops", "dash-pw-" + uuid.uuid4().hex[:10]
#: A line Python's warnings module prints: ``path:line: SomeWarning: message``.
PYTHON_WARNING = re.compile(r"^\S+:\d+: (\w*Warning): (.*)$", re.MULTILINE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def http(
    base: str,
    method: str,
    path: str,
    *,
    auth: tuple[str, str] | None = None,
    body: Any = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
    timeout: float = 30,
) -> Answer:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = dict(headers or {})
    if auth is not None:
        h["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    req = urllib.request.Request(base + path, data=data, method=method, headers=h)
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return Answer(resp.status, dict(resp.headers), resp.read())
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, dict(exc.headers), exc.read())


class DashboardProcess:
    def __init__(self, config: Path, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.config = config
        self.args = args
        self.log_path = config.with_name(f"dashboard-{uuid.uuid4().hex[:6]}.log")
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                amqptasks_exe(),
                "dashboard",
                "--config",
                str(config),
                "--port",
                str(self.port),
                *args,
            ],
            cwd=ROOT,
            env=cli_env(config),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30) -> DashboardProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "ready: reading events" in self.output():
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"dashboard exited {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"dashboard not ready after {timeout}s:\n{self.output()}")

    def get(self, path: str, **kw: Any) -> Answer:
        kw.setdefault("auth", (USER, PASSWORD))
        return http(self.base, "GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Answer:
        kw.setdefault("auth", (USER, PASSWORD))
        return http(self.base, "POST", path, body=body, **kw)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def dashboard_factory() -> Iterator[Any]:
    started: list[DashboardProcess] = []

    def start(config: Path, *args: str, ready: bool = True, port: int | None = None) -> Any:
        d = DashboardProcess(config, *args, port=port)
        started.append(d)
        return d.wait_ready() if ready else d

    yield start
    for d in reversed(started):
        d.stop()
    # A Python warning in a dashboard's output is a defect a user would see on stderr
    # (aiohttp 3.14's NotAppKeyWarning for a str request key was one).
    for d in started:
        warned = PYTHON_WARNING.findall(d.output())
        assert not warned, f"the dashboard printed Python warnings: {warned}"


@pytest.fixture
def broker_user(broker: Broker) -> Iterator[tuple[str, str, str]]:
    """A broker user with a password made for this test (and the management 'monitoring'
    tag the dashboard's queue pages need); yields (user, password, amqp URL)."""
    name = "dash-" + uuid.uuid4().hex[:8]
    password = "broker-pw-" + uuid.uuid4().hex[:12]
    vh = urllib.parse.quote(broker.vhost, safe="")
    mgmt("PUT", f"/users/{name}", {"password": password, "tags": "monitoring"})
    mgmt("PUT", f"/permissions/{vh}/{name}", {"configure": ".*", "write": ".*", "read": ".*"})
    try:
        yield name, password, f"amqp://{name}:{password}@localhost:{AMQP_PORT}/{vh}"
    finally:
        mgmt("DELETE", f"/users/{name}", ok=(200, 204, 404))


def put_dead_letters(
    broker: Broker, queue: str, tags: list[str], routing_key: str = "task.default"
) -> list[str]:
    """Dead letters of ``testtasks.record(tag)`` in ``queue``'s DLQ, as a worker writes them
    (routed by ``amqptasks.dlx`` with the work queue's name; reason, exception and the
    original route ``tasks``/``routing_key`` in the headers), published with confirms; a
    replayed one runs and records ``done <tag>`` in the worker's ledger.
    Returns their message ids."""
    import pika

    ch = broker.channel()
    ch.confirm_delivery()
    ids = []
    for tag in tags:
        message_id = f"dead-{tag}-{uuid.uuid4().hex[:6]}"
        body = json.dumps({"task": "testtasks.record", "args": [tag]}).encode()
        ch.basic_publish(
            "amqptasks.dlx",
            queue,
            body,
            pika.BasicProperties(
                message_id=message_id,
                content_type="application/json",
                headers={
                    "x-amqptasks-reason": "task-failed",
                    "x-amqptasks-exception": f"ValueError: {tag} failed once",
                    "x-amqptasks-original-exchange": "tasks",
                    "x-amqptasks-original-routing-key": routing_key,
                },
            ),
            mandatory=True,
        )
        ids.append(message_id)
    ch.close()
    return ids


#: Beat schedules of the schedules tests: an interval with a start, a cron in a zone with a
#: 5:45 offset, and a plain UTC cron.
SCHEDULES = {
    "every7m": {"task": "examples.tasks.add", "args": [1, 2], "every": "7m",
                "start": "2026-01-01T00:00:03Z"},
    "kathmandu": {"task": "examples.tasks.add", "args": [2, 3], "cron": "7 9 * * *",
                  "timezone": "Asia/Kathmandu"},
    "quarter": {"task": "examples.web.sendmail", "args": ["a@b"], "cron": "*/15 * * * *"},
}  # fmt: skip


def expected_fires(name: str, now: datetime) -> list[str]:
    """The next three fire times of ``SCHEDULES[name]`` after ``now``, by the arithmetic of
    the config itself (interval: start + k x every; cron: croniter on the zone's wall
    clock), as UTC text."""
    from croniter import croniter

    spec = SCHEDULES[name]
    if "every" in spec:
        start = datetime.fromisoformat(spec["start"].replace("Z", "+00:00"))
        every = timedelta(minutes=int(spec["every"].rstrip("m")))
        k = (now - start) // every + 1
        fires = [start + (k + i) * every for i in range(3)]
    else:
        zone = ZoneInfo(spec.get("timezone", "UTC"))
        it = croniter(spec["cron"], now.astimezone(zone).replace(tzinfo=None))
        fires = [it.get_next(datetime).replace(tzinfo=zone) for _ in range(3)]
    return [f.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") for f in fires]
