"""Rate limits as values (amqptasks.rate) and the worker's token bucket: pure, the clock
passed in."""

from __future__ import annotations

import pytest

from amqptasks import App
from amqptasks.config import Settings
from amqptasks.rate import OFF, RateLimit, parse_rate, rate_limit
from amqptasks.worker.throttle import TokenBucket


@pytest.mark.parametrize(
    ("text", "per_second"),
    [
        ("10/s", 10.0),
        ("100/m", 100 / 60),
        ("2/h", 2 / 3600),
        (" 5 / s ", 5.0),
        ("1.5/s", 1.5),
        ("7", 7.0),
        (3, 3.0),
        (0.5, 0.5),
        ("0", 0.0),
        (0, 0.0),
        ("off", 0.0),
        ("None", 0.0),
    ],
)
def test_celery_spellings_are_read(text: object, per_second: float) -> None:
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("10/sec", "expected a rate such as '10/s', '100/m' or '2/h'"),
        ("10/d", "expected a rate"),
        ("-1/s", "expected a rate"),
        ("fast", "expected a rate"),
        ("", "expected a rate"),
        (True, "expected a rate"),
        (float("nan"), "finite number >= 0"),
        (-3, "finite number >= 0"),
        ("2000000/s", "is not a limit"),
        ([10], "got list"),
    ],
)
def test_bad_rates_say_what_was_expected(value: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        parse_rate(value)


def test_a_rate_limit_shows_itself_in_celery_spelling() -> None:
    assert RateLimit(10.0).text == "10/s"
    assert RateLimit(100 / 60).text == "100/m"
    assert RateLimit(2 / 3600).text == "2/h"
    assert RateLimit(0.3).text == "18/m"
    assert str(RateLimit(10.0, "fleet", 3)) == "10/s per fleet, burst 3"
    assert str(OFF) == "off" and not OFF.active
    assert rate_limit("10/s", "fleet").describe() == {
        "rate": "10/s",
        "per_second": 10.0,
        "scope": "fleet",
        "burst": 1,
    }
    with pytest.raises(ValueError, match="scope of worker or fleet"):
        rate_limit("10/s", "cluster")
    with pytest.raises(ValueError, match="burst of at least 1"):
        rate_limit("10/s", None, 0)


def test_the_decorator_takes_a_rate_limit_and_refuses_a_bad_one_naming_the_task() -> None:
    app = App(Settings())

    @app.task(name="t.limited", rate_limit="100/m", rate_limit_scope="fleet")
    def limited() -> None: ...

    assert limited.policy.rate_limit == RateLimit(100 / 60, "fleet")
    with pytest.raises(ValueError, match=r"task t.bad: rate_limit='10/sec': expected a rate"):
        app.task(name="t.bad", rate_limit="10/sec")(lambda: None)
    with pytest.raises(ValueError, match="rate_limit_scope/rate_limit_burst need rate_limit="):
        app.task(name="t.scope", rate_limit_scope="fleet")(lambda: None)


def test_a_token_bucket_lets_burst_through_then_the_rate() -> None:
    bucket = TokenBucket(rate=10.0, capacity=2, now=100.0)
    assert bucket.take(100.0) and bucket.take(100.0)  # the burst
    assert not bucket.take(100.0)
    assert bucket.wait(100.0) == pytest.approx(0.1)
    assert bucket.wait(100.05) == pytest.approx(0.05)
    assert bucket.take(100.1) and not bucket.take(100.1)
    assert bucket.take(100.2125) and bucket.wait(100.2125) == pytest.approx(0.0875)  # late
    # A quiet spell refills up to the capacity, no more.
    assert bucket.take(200.0) and bucket.take(200.0) and not bucket.take(200.0)


def test_a_token_bucket_follows_a_new_rate_at_once() -> None:
    bucket = TokenBucket(rate=1.0, capacity=1, now=0.0)
    assert bucket.take(0.0)
    assert bucket.wait(0.0) == pytest.approx(1.0)
    bucket.configure(rate=10.0, capacity=1, now=0.05)
    assert bucket.wait(0.05) == pytest.approx(0.095)  # what was earned at 1/s is kept
    bucket.configure(rate=10.0, capacity=1, now=1.0)
    assert bucket.take(1.0) and not bucket.take(1.0)
    # A quarter token of slack above the capacity: a late timer does not lose pace.
    assert bucket.wait(1.0) == pytest.approx(0.075)
