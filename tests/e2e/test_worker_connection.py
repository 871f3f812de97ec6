"""The worker and its broker connection: waiting for a broker that is not up yet, giving up
when told to, refusing at once what waiting cannot fix, and reconnecting on the documented
backoff after the broker went away or froze.

"The network" is a loopback TCP proxy in front of the real broker (tests/support/tcpproxy.py),
so the shared broker itself is never stopped.
"""

from __future__ import annotations

import signal
import time

import pytest
from broker_fixtures import AMQP_PORT, ledger_lines, wait_for, write_config
from tcpproxy import TcpProxy


@pytest.fixture
def proxy():
    p = TcpProxy(AMQP_PORT)
    yield p
    p.close()


def _vhost_path(broker) -> str:
    return broker.url.rsplit("/", 1)[1]


def _proxied_config(tmp_path, broker, proxy, **broker_settings):
    settings = {"url": proxy.url(_vhost_path(broker)), "publish_timeout": 10}
    settings.update(broker_settings)
    return write_config(tmp_path, broker, broker=settings)


def _run_one(broker, ledger, tag: str, timeout: float = 15) -> None:
    """Publish ``testtasks.record(tag)`` straight to the broker; wait until it ran."""
    body = f'{{"task": "testtasks.record", "args": ["{tag}"]}}'.encode()
    broker.publish_raw("tasks", "task.x", body)
    wait_for(lambda: f"done {tag}" in ledger_lines(ledger), timeout=timeout, message=tag)


def test_worker_started_before_its_broker_waits_then_consumes(
    tmp_path, broker, worker_factory, proxy
):
    proxy.down()
    cfg = _proxied_config(tmp_path, broker, proxy, reconnect_max_delay=1)
    ledger = tmp_path / "ledger"
    w = worker_factory(cfg, "-Q", "default", ledger=ledger, ready=False)
    wait_for(
        lambda: w.output().count("broker not reachable") >= 3,
        timeout=15,
        message="three logged connection attempts",
    )
    assert w.proc.poll() is None, w.output()
    assert "next attempt in" in w.output()
    proxy.up()
    up = time.monotonic()
    w.wait_ready(timeout=10)
    assert time.monotonic() - up <= 1 + 2  # reconnect_max_delay + 2 s
    _run_one(broker, ledger, "after-wait")


def test_sigterm_while_waiting_for_the_broker_exits_at_once(
    tmp_path, broker, worker_factory, proxy
):
    proxy.down()
    cfg = _proxied_config(tmp_path, broker, proxy, reconnect_max_delay=30)
    w = worker_factory(cfg, "-Q", "default", ready=False)
    wait_for(lambda: "broker not reachable" in w.output(), timeout=15, message="first attempt")
    sent = time.monotonic()
    w.signal(signal.SIGTERM)
    assert w.wait(10) == 0, w.output()
    assert time.monotonic() - sent < 3


def test_connect_timeout_gives_up_with_the_reason(tmp_path, broker, worker_factory, proxy):
    proxy.down()
    cfg = _proxied_config(tmp_path, broker, proxy, reconnect_max_delay=1)
    start = time.monotonic()
    w = worker_factory(cfg, "-Q", "default", "--connect-timeout", "2", ready=False)
    assert w.wait(20) == 1
    assert time.monotonic() - start < 10
    out = w.output()
    assert "--connect-timeout 2" in out and "no broker at" in out, out
    assert "guest:guest" not in out


@pytest.mark.parametrize(
    ("credentials", "path", "reason"),
    [
        ("guest:wrong", None, "ACCESS_REFUSED"),
        ("guest:guest", "no-such-vhost", "NOT_ALLOWED"),
    ],
)
def test_refused_login_or_vhost_exits_at_once_with_the_broker_reason(
    tmp_path, broker, worker_factory, credentials, path, reason
):
    url = f"amqp://{credentials}@localhost:{AMQP_PORT}/{path or _vhost_path(broker)}"
    cfg = write_config(tmp_path, broker, broker={"url": url, "publish_timeout": 10})
    start = time.monotonic()
    w = worker_factory(cfg, "-Q", "default", ready=False)
    assert w.wait(20) == 1, w.output()
    assert time.monotonic() - start < 10
    out = w.output()
    assert reason in out, out
    assert "InvalidFrameError" not in out
    assert "wrong" not in out  # the password is never printed


def test_reconnects_within_the_backoff_after_the_broker_was_gone(
    tmp_path, broker, worker_factory, proxy
):
    cfg = _proxied_config(tmp_path, broker, proxy, reconnect_max_delay=2)
    ledger = tmp_path / "ledger"
    w = worker_factory(cfg, "-Q", "default", ledger=ledger)
    proxy.down()
    wait_for(lambda: "connection to the broker lost" in w.output(), timeout=10, message="loss")
    time.sleep(4)  # the outage itself: several failed attempts must not slow the recovery
    proxy.up()
    up = time.monotonic()
    wait_for(lambda: "consuming again" in w.output(), timeout=10, message="consuming again")
    assert time.monotonic() - up <= 2 + 2  # reconnect_max_delay + 2 s
    _run_one(broker, ledger, "after-outage")


def test_resumes_after_a_frozen_broker_thaws(tmp_path, broker, worker_factory, proxy):
    """A frozen peer is noticed by heartbeats (worst case 2 x (heartbeat + 5) s with pika);
    attempts against a frozen broker hang in the handshake and complete once it thaws."""
    cfg = _proxied_config(tmp_path, broker, proxy, reconnect_max_delay=2, heartbeat=1)
    ledger = tmp_path / "ledger"
    w = worker_factory(cfg, "-Q", "default", ledger=ledger)
    proxy.freeze()
    wait_for(
        lambda: "connection to the broker lost" in w.output(),
        timeout=2 * (1 + 5) + 3,
        message="the heartbeat noticing the frozen broker",
    )
    proxy.thaw()
    thawed = time.monotonic()
    wait_for(lambda: "consuming again" in w.output(), timeout=15, message="consuming again")
    assert time.monotonic() - thawed <= 2 + 2, w.output()
    _run_one(broker, ledger, "after-thaw")
