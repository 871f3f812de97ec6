"""What a worker holds (reserved, active) and what became of it, as both paths tell it through
the observer interface; a broken observer never breaks the others."""

from __future__ import annotations

import logging

import pytest

from amqptasks.errors import TaskExpired
from amqptasks.protocol import Envelope, Properties
from amqptasks.worker.middleware import Outcome, Rejection
from amqptasks.worker.observer import Observer, Observers
from amqptasks.worker.stats import Stats
from amqptasks.worker.tracker import Tracker


def test_full_pipeline_story_moves_a_delivery_from_reserved_to_active_to_gone() -> None:
    stats = Stats()
    t = Tracker(stats)
    env = Envelope(task="t.add", id="a", args=(1, 2))
    t.received(env, "default")
    assert t.state_of("a")[0] == "reserved" and not t.active
    [held] = t.reserved.values()
    assert held.describe()["args"] == "[1,2]" and "started" not in held.describe()
    t.started(env, "default")
    assert t.state_of("a")[0] == "active" and not t.reserved
    assert t.active[id(env)].describe()["runtime"] >= 0
    t.succeeded(env, "default", 0.1, 3)
    assert t.state_of("a") == ("unknown", []) and not t.active
    assert stats.by_task() == {"t.add": {"succeeded": 1}}


def test_two_copies_of_one_id_are_two_deliveries() -> None:
    t = Tracker(Stats())
    first, second = Envelope(task="t", id="same"), Envelope(task="t", id="same")
    t.began(first, "q")
    t.received(second, "q")
    state, held = t.state_of("same")
    assert state == "active" and len(held) == 1
    t.succeeded(first, "q", 0.0, None)
    assert t.state_of("same")[0] == "reserved"
    t.returned(second, "q")  # warm shutdown: back to its queue
    assert t.state_of("same")[0] == "unknown"


def test_outcomes_are_counted_per_task() -> None:
    stats = Stats()
    t = Tracker(stats)
    env = Envelope(task="t", id="x")
    for outcome in (
        Outcome(False, exc=ValueError("x"), retry_countdown=1.0),
        Outcome(False, exc=ValueError("x")),
        Outcome(False, exc=TaskExpired("late")),
    ):
        t.began(env, "q")
        t.finished(env, "q", outcome)
    t.received(env, "q")
    t.skipped(env, "q", "duplicate")
    t.received(env, "q")
    t.rejected(Rejection("x", "expired", "expired", "q", "w", Properties(), env))
    t.rejected(Rejection("y", "unknown-task", "no", "q", "w", Properties(), Envelope(task="u")))
    t.rejected(Rejection("<no id>", "decode-error", "no", "q", "w", Properties()))
    assert not t.active and not t.reserved
    assert stats.by_task() == {
        "(undecodable)": {"rejected": 1},
        "t": {"expired": 2, "failed": 1, "retried": 1, "revoked": 1},
        "u": {"rejected": 1},
    }


def test_an_observer_that_raises_is_logged_and_the_others_still_hear(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(Observer):
        def began(self, env: Envelope, queue: str) -> None:
            raise RuntimeError("bug in a listener")

    stats = Stats()
    t = Tracker(stats)
    both = Observers([Broken(), t])
    env = Envelope(task="t", id="a")
    with caplog.at_level(logging.ERROR, logger="amqptasks.worker"):
        both.began(env, "q")
    assert t.state_of("a")[0] == "active"
    assert "observer Broken.began failed" in caplog.text


def test_the_base_observer_is_a_no_op_that_routes_finished() -> None:
    heard: list[str] = []

    class Listening(Observer):
        def succeeded(self, env: Envelope, queue: str, runtime: float, result: object) -> None:
            heard.append(f"ok {result}")

        def failed(self, env: Envelope, queue: str, outcome: Outcome) -> None:
            heard.append(f"failed {outcome.exc}")

        def received(self, env: Envelope, queue: str) -> None:
            heard.append("received")

        def started(self, env: Envelope, queue: str) -> None:
            heard.append("started")

    o = Listening()
    env = Envelope(task="t")
    o.began(env, "q")
    o.finished(env, "q", Outcome(True, result=5))
    o.finished(env, "q", Outcome(False, exc=ValueError("v")))
    assert heard == ["received", "started", "ok 5", "failed v"]
    Observer().rejected(Rejection("x", "r", "d", "q", "w", Properties()))  # no-op, no error
