"""The metrics module's pure parts: loopback detection, credentials, the runtime histogram
of the observer (real observer calls, real exposition text)."""

from __future__ import annotations

import pytest

from amqptasks.errors import TaskExpired
from amqptasks.protocol import Envelope
from amqptasks.worker.metrics import BUCKETS, MetricsObserver, is_loopback, parse_auth
from amqptasks.worker.middleware import Outcome


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("metrics.example.com", False),
    ],
)
def test_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_credentials_are_user_colon_password_and_errors_never_show_them() -> None:
    assert parse_auth("prom:a:b", "--metrics-auth") == ("prom", "a:b")
    for bad in ("prom", "prom:", ":secret"):
        with pytest.raises(ValueError) as err:
            parse_auth(bad, "$AMQPTASKS_METRICS_AUTH")
        assert str(err.value) == (
            "$AMQPTASKS_METRICS_AUTH: expected USER:PASS with a non-empty user and password"
        )
        assert "secret" not in str(err.value)


def test_the_observer_buckets_runtimes_of_tasks_that_ran_and_counts_dead_letters() -> None:
    o = MetricsObserver()
    env = Envelope(task="t.a", id="1")
    o.began(env, "q")
    o.succeeded(env, "q", 0.0004, None)
    o.finished(env, "q", Outcome(True, runtime=0.2))
    o.finished(env, "q", Outcome(False, exc=ValueError("x"), runtime=7.0))
    o.finished(env, "q", Outcome(True, runtime=99.0, preset=True))  # a duplicate: not run
    o.finished(env, "q", Outcome(False, exc=TaskExpired("late"), runtime=0.0))  # not run
    o.dead_lettered("q", "task-failed", env)
    o.dead_lettered("q", "unknown-task", None)
    counts = o.runtime_buckets["t.a"]
    assert sum(counts) == 3
    assert counts[BUCKETS.index(0.001)] == 1  # 0.4 ms
    assert counts[BUCKETS.index(0.25)] == 1  # 0.2 s
    assert counts[BUCKETS.index(10.0)] == 1  # 7 s
    assert o.runtime_sums["t.a"] == pytest.approx(7.2004)
    assert dict(o.dead_letters) == {("q", "task-failed"): 1, ("q", "unknown-task"): 1}


# -- the scrape server's bounds (a real socket server on loopback; no broker) ------------------
def test_the_metrics_http_server_caps_connections_and_cuts_idle_ones(monkeypatch):
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler

    from amqptasks.worker import metrics

    monkeypatch.setattr(metrics, "MAX_CONNECTIONS", 2)

    class Hello(BaseHTTPRequestHandler):
        timeout = 0.5  # what REQUEST_TIMEOUT is to the real handler, shortened

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = metrics.BoundedHTTPServer(("127.0.0.1", 0), Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    address = server.server_address
    idle = [socket.create_connection(address, timeout=5) for _ in range(2)]
    try:
        # Both slots are held by clients that say nothing: a third is closed at once.
        extra = socket.create_connection(address, timeout=5)
        assert extra.recv(1) == b""
        extra.close()
        # The idle ones are cut off after the handler's timeout (the recv returns b"").
        assert [s.recv(1) for s in idle] == [b"", b""]
        with socket.create_connection(address, timeout=5) as ok:  # the slots are free again
            ok.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            reply = b""
            while chunk := ok.recv(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.0 200") and reply.endswith(b"ok")
    finally:
        for s in idle:
            s.close()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("host", "served"),
    [
        ("127.0.0.1:9808", True),
        ("[::1]:9808", True),
        ("localhost:9808", True),
        ("LocalHost", True),
        ("rebound.example:9808", False),
        ("10.0.0.5:9808", False),
        ("", False),
        (None, False),
    ],
)
def test_without_credentials_only_a_loopback_host_header_is_served(host, served):
    """DNS rebinding: a page whose name now resolves to 127.0.0.1 sends its own name."""
    from amqptasks.worker.metrics import loopback_host

    assert loopback_host(host) is served
