"""Fixtures for tests that need the real RabbitMQ started by ``deploy/broker.sh``.

Each test gets its own vhost (created and deleted through the management API), so tests never
see each other's queues and leave nothing behind. No broker is mocked anywhere.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SUPPORT = Path(__file__).resolve().parent
AMQP_PORT = int(os.environ.get("AMQPTASKS_BROKER_PORT", "5672"))
MGMT_PORT = int(os.environ.get("AMQPTASKS_MGMT_PORT", "15672"))
MGMT = f"http://127.0.0.1:{MGMT_PORT}/api"
_AUTH = "Basic " + base64.b64encode(b"guest:guest").decode()


def mgmt(method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200, 201, 204)) -> Any:
    """Call the management HTTP API as guest (loopback only)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        MGMT + path,
        data=data,
        method=method,
        headers={"Authorization": _AUTH, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            return json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        if exc.code in ok:
            return None
        raise


def broker_available() -> bool:
    try:
        mgmt("GET", "/overview")
        return True
    except OSError:
        return False


@dataclass
class Broker:
    """One test's private vhost on the shared local broker."""

    vhost: str
    url: str
    connections: list[pika.BlockingConnection] = field(default_factory=list)

    def connect(self) -> pika.BlockingConnection:
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        self.connections.append(conn)
        return conn

    def channel(self) -> Any:
        return self.connect().channel()

    def queue_info(self, queue: str) -> dict[str, Any]:
        vh = urllib.parse.quote(self.vhost, safe="")
        return mgmt("GET", f"/queues/{vh}/{urllib.parse.quote(queue, safe='')}")  # type: ignore[no-any-return]

    def depth(self, queue: str) -> int:
        """Messages ready in ``queue`` (passive declare: exact, not the stats sample)."""
        ch = self.channel()
        try:
            return ch.queue_declare(queue, passive=True).method.message_count  # type: ignore[no-any-return]
        finally:
            ch.close()

    def get_all(self, queue: str, limit: int = 1000) -> list[tuple[Any, bytes]]:
        """Take every ready message from ``queue`` (acked): [(properties, body)]."""
        ch = self.channel()
        out = []
        for _ in range(limit):
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                break
            out.append((props, body))
        ch.close()
        return out

    def publish_raw(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: pika.BasicProperties | None = None,
    ) -> None:
        """Publish like a foreign client would: plain pika, no amqptasks code."""
        ch = self.channel()
        ch.confirm_delivery()
        ch.basic_publish(
            exchange, routing_key, body, properties or pika.BasicProperties(), mandatory=True
        )
        ch.close()

    def close(self) -> None:
        for c in self.connections:
            if c.is_open:
                c.close()


@pytest.fixture(scope="session")
def broker_up() -> None:
    if not broker_available():
        pytest.fail(
            "RabbitMQ is not running: start it with `deploy/broker.sh start` "
            "(`make test` does this for you)"
        )


@pytest.fixture
def broker(broker_up: None, request: pytest.FixtureRequest) -> Iterator[Broker]:
    name = f"test.{request.node.name[:40]}.{uuid.uuid4().hex[:8]}"
    vh = urllib.parse.quote(name, safe="")
    mgmt("PUT", f"/vhosts/{vh}", {})
    mgmt("PUT", f"/permissions/{vh}/guest", {"configure": ".*", "write": ".*", "read": ".*"})
    b = Broker(vhost=name, url=f"amqp://guest:guest@localhost:{AMQP_PORT}/{vh}")
    try:
        yield b
    finally:
        b.close()
        mgmt("DELETE", f"/vhosts/{vh}", ok=(200, 204, 404))


BASE_CONFIG: dict[str, Any] = yaml.safe_load((ROOT / "config" / "amqptasks.yaml").read_text())


def write_config(tmp_path: Path, broker: Broker, /, **overrides: Any) -> Path:
    """The shipped config pointed at the test's vhost, with top-level keys overridden."""
    data = json.loads(json.dumps(BASE_CONFIG))
    data["broker"] = {"url": broker.url, "publish_timeout": 10}
    data["imports"] = ["examples.tasks", "examples.web", "testtasks"]
    # Each test its own result store, as it has its own vhost (ids like "a" recur in tests).
    data["results"] = {**data.get("results", {}), "backend": f"sqlite:///{tmp_path}/results.db"}
    data.update(overrides)
    path = tmp_path / "amqptasks.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_config_default_queue(
    tmp_path: Path,
    broker: Broker,
    /,
    *,
    others: tuple[str, ...] = ("web_tasks",),
    routes: dict[str, Any] | None = None,
    **default_options: Any,
) -> Path:
    """The shipped config with queue options (``type``, ``max_priority``...) on ``default``
    (its shipped bindings kept), only the shipped queues named in ``others`` beside it, and
    ``routes`` (none by default: everything takes the shipped default route)."""
    shipped = BASE_CONFIG["queues"]
    queues = {"default": {**default_options, **shipped["default"]}}
    queues.update({name: shipped[name] for name in others})
    return write_config(tmp_path, broker, queues=queues, routes=routes or {})


def cli_env(config: Path, ledger: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["AMQPTASKS_CONFIG"] = str(config)
    env.pop("AMQPTASKS_BROKER_URL", None)
    env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), str(ROOT)])
    env["PYTHONUNBUFFERED"] = "1"
    if ledger is not None:
        env["TESTTASKS_LEDGER"] = str(ledger)
    return env


def amqptasks_exe() -> str:
    exe = Path(sys.executable).with_name("amqptasks")
    return str(exe) if exe.exists() else (shutil.which("amqptasks") or "amqptasks")


def run_cli(
    config: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    config_flag: bool = True,
) -> subprocess.CompletedProcess[str]:
    """``amqptasks ARGS --config CONFIG`` in a subprocess, as a user runs it from the project
    root (``$AMQPTASKS_CONFIG`` names the file too; ``config_flag=False`` leaves the flag out,
    for tests that place it themselves or test the variable alone). ``env`` adds to
    :func:`cli_env`."""
    return subprocess.run(
        [amqptasks_exe(), *args, *(["--config", str(config)] if config_flag else [])],
        cwd=ROOT,
        env={**cli_env(config), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class WorkerProcess:
    """``amqptasks worker`` as a subprocess, the way a user runs it."""

    def __init__(
        self,
        config: Path,
        *args: str,
        ledger: Path | None = None,
        log: Path | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.log_path = log or config.with_name(f"worker-{uuid.uuid4().hex[:6]}.log")
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [amqptasks_exe(), "worker", "--config", str(config), *args],
            cwd=ROOT,
            env={**cli_env(config, ledger), **(extra_env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "ready: consuming" in self.output():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"worker not ready after {timeout}s:\n{self.output()}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@pytest.fixture
def worker_factory() -> Iterator[Any]:
    started: list[WorkerProcess] = []

    def start(
        config: Path,
        *args: str,
        ledger: Path | None = None,
        ready: bool = True,
        extra_env: dict[str, str] | None = None,
    ) -> WorkerProcess:
        w = WorkerProcess(config, *args, ledger=ledger, extra_env=extra_env)
        started.append(w)
        if ready:
            w.wait_ready()
        return w

    yield start
    for w in reversed(started):  # LIFO, like the resources they depend on
        w.stop()


def wait_for(
    predicate: Any, timeout: float = 20, interval: float = 0.05, message: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


def ledger_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []
