"""``amqptasks dashboard`` as a subprocess, the way a user runs it, and a small HTTP client.

The broker user of a dashboard test has a password of its own (made per test), so a test
can search every page, answer and log line for it."""

from __future__ import annotations

import base64
import json
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
from pathlib import Path
from typing import Any

import pytest
from broker_fixtures import AMQP_PORT, ROOT, Broker, amqptasks_exe, cli_env, mgmt

USER, PASSWORD = "ops", "dash-pw-" + uuid.uuid4().hex[:10]


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
