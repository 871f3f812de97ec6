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
