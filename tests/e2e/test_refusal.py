"""A broker that refuses the login, the virtual host or the permission is reported at once,
with the broker's own reason and without the password — on every path that connects
(``send``/``.delay()``, ``delay_async``, ``dlq``, ``topology apply``, ``beat``). A broker that
is down is still retried within the bound (``beat``: until stopped)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from broker_fixtures import (
    AMQP_PORT,
    ROOT,
    Broker,
    amqptasks_exe,
    cli_env,
    mgmt,
    run_cli,
    write_config,
)

from amqptasks import App, BrokerRefused, load_config

#: "At once": connecting and being refused takes milliseconds; the publish timeout is 10 s.
QUICK = 2.5
SECRET = "s3cret-not-to-print"
SCHEDULES = {"tick": {"task": "testtasks.record", "args": ["t"], "every": "1s"}}


@dataclass
class Refusal:
    url: str
    reason: str  # what the broker says, as it must appear in our error


@pytest.fixture(params=["wrong-password", "missing-vhost", "no-permission"])
def refusal(request: pytest.FixtureRequest, broker: Broker) -> Iterator[Refusal]:
    vh = urllib.parse.quote(broker.vhost, safe="")
    if request.param == "wrong-password":
        yield Refusal(
            f"amqp://guest:{SECRET}@localhost:{AMQP_PORT}/{vh}",
            "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN",
        )
    elif request.param == "missing-vhost":
        missing = f"test.missing.{uuid.uuid4().hex[:8]}"
        yield Refusal(
            f"amqp://guest:guest@localhost:{AMQP_PORT}/{missing}",
            f"NOT_ALLOWED - vhost {missing} not found",
        )
    else:
        user = f"test-noperm-{uuid.uuid4().hex[:8]}"
        mgmt("PUT", f"/users/{user}", {"password": SECRET, "tags": ""})
        try:  # a valid login with no permission on the test's vhost
            yield Refusal(
                f"amqp://{user}:{SECRET}@localhost:{AMQP_PORT}/{vh}",
                f"NOT_ALLOWED - access to vhost '{broker.vhost}' refused for user '{user}'",
            )
        finally:
            mgmt("DELETE", f"/users/{user}", ok=(200, 204, 404))


def _config(tmp_path: Path, broker: Broker, url: str) -> Path:
    return write_config(
        tmp_path, broker, broker={"url": url, "publish_timeout": 10}, schedules=SCHEDULES
    )


def _run(
    cfg: Path, *args: str, timeout: float = 30
) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    out = run_cli(cfg, *args, timeout=timeout)
    return out, time.monotonic() - start


def _assert_refused(text: str, refusal: Refusal) -> None:
    assert "refused the connection" in text, text
    assert refusal.reason in text, text
    assert SECRET not in text and ":***@" in text, text


@pytest.mark.parametrize(
    "command",
    [
        ("send", "examples.tasks.add", "--args", "[1, 2]"),
        ("dlq", "list", "default"),
        ("topology", "apply"),
        ("beat",),
    ],
    ids=["send", "dlq-list", "topology-apply", "beat"],
)
def test_cli_exits_1_at_once_with_the_brokers_reason(
    tmp_path: Path, broker: Broker, refusal: Refusal, command: tuple[str, ...]
) -> None:
    cfg = _config(tmp_path, broker, refusal.url)
    out, took = _run(cfg, *command)
    assert out.returncode == 1, out.stdout + out.stderr
    _assert_refused(out.stderr, refusal)
    assert "Traceback" not in out.stderr
    # beat starts a Python interpreter and prints its banner first; still no retry loop.
    assert took < QUICK + (1.5 if command == ("beat",) else 0), took


def test_delay_raises_broker_refused_at_once(
    tmp_path: Path, broker: Broker, refusal: Refusal
) -> None:
    app = App(load_config(_config(tmp_path, broker, refusal.url), env={}))
    try:
        for _ in range(2):  # and again: the refusal is not cached into a hang
            start = time.monotonic()
            with pytest.raises(BrokerRefused) as err:
                app.send_task("examples.tasks.add", (1, 2))
            assert time.monotonic() - start < QUICK
            _assert_refused(str(err.value), refusal)
            assert err.value.reason.startswith(refusal.reason)
    finally:
        app.close()


def test_delay_async_raises_broker_refused_at_once(
    tmp_path: Path, broker: Broker, refusal: Refusal
) -> None:
    app = App(load_config(_config(tmp_path, broker, refusal.url), env={}))

    async def main() -> None:
        try:
            start = time.monotonic()
            with pytest.raises(BrokerRefused) as err:
                await app.send_task_async("examples.tasks.add", (1, 2))
            assert time.monotonic() - start < QUICK
            _assert_refused(str(err.value), refusal)
        finally:
            await app.aclose()

    asyncio.run(main())


def test_beat_keeps_retrying_while_the_broker_is_down(tmp_path: Path, broker: Broker) -> None:
    cfg = _config(tmp_path, broker, f"amqp://guest:{SECRET}@127.0.0.1:1/%2F")
    log = tmp_path / "beat.log"
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [amqptasks_exe(), "beat", "--config", str(cfg)],
            cwd=ROOT,
            env=cli_env(cfg),
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while log.read_text().count("retrying in") < 2:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(20)
    assert rc == 0
    assert SECRET not in log.read_text()
