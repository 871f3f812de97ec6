"""Retry decisions and backoff: pure, seeded randomness."""

from __future__ import annotations

import random

import pytest

from amqptasks.config import DEFAULT_POLICY, TaskPolicy
from amqptasks.errors import MaxRetriesExceeded, Retry, WorkerLost
from amqptasks.worker.retry import backoff, decide


def policy(**kw) -> TaskPolicy:
    return TaskPolicy(**kw).merged(DEFAULT_POLICY)


def test_explicit_retry_uses_its_countdown_until_max_retries():
    p = policy(max_retries=2)
    assert decide(p, Retry(countdown=7), 0).countdown == 7
    assert decide(p, Retry(countdown=7), 1).retry
    final = decide(p, Retry(exc=ValueError("x"), countdown=7), 2)
    assert not final.retry and isinstance(final.exc, ValueError)


def test_retry_without_exc_and_no_retries_left_is_max_retries_exceeded():
    final = decide(policy(max_retries=0), Retry(), 0)
    assert isinstance(final.exc, MaxRetriesExceeded)


def test_retry_max_retries_argument_overrides_policy():
    assert decide(policy(max_retries=1), Retry(max_retries=5), 3).retry
    assert not decide(policy(max_retries=9), Retry(max_retries=1), 1).retry


def test_plain_failure_is_final():
    d = decide(policy(), KeyError("k"), 0)
    assert not d.retry and isinstance(d.exc, KeyError)


def test_autoretry_by_class_and_by_name_in_the_mro():
    p = policy(autoretry_for=("OSError",), max_retries=1)
    assert decide(p, ConnectionResetError(), 0).retry  # OSError is a base by name
    assert decide(policy(), TimeoutError(), 0, autoretry_for=(TimeoutError,)).retry
    assert not decide(p, ValueError(), 0).retry
    assert not decide(p, ConnectionResetError(), 1).retry


def test_worker_lost_follows_the_retry_policy():
    assert decide(policy(max_retries=1), WorkerLost("x"), 0).retry
    assert not decide(policy(max_retries=1), WorkerLost("x"), 1).retry


@pytest.mark.parametrize(("retries", "expected"), [(0, 2.0), (1, 4.0), (3, 16.0), (10, 60.0)])
def test_exponential_backoff_is_capped(retries, expected):
    p = policy(retry_backoff=2.0, retry_backoff_max=60.0, retry_jitter=False)
    assert backoff(p, retries) == expected


def test_full_jitter_stays_within_zero_and_the_backoff():
    p = policy(retry_backoff=1.0, retry_backoff_max=600.0, retry_jitter=True)
    rng = random.Random(1)
    values = [backoff(p, 4, rng) for _ in range(500)]
    assert all(0 <= v <= 16 for v in values)
    assert max(values) > 12 and min(values) < 4  # spread, not a constant


def test_without_backoff_the_default_delay_applies():
    assert backoff(policy(default_retry_delay=9.0), 5) == 9.0


def test_policy_merge_keeps_explicit_values():
    explicit = TaskPolicy(max_retries=0)
    assert explicit.merged(TaskPolicy(max_retries=5, time_limit=3)).max_retries == 0
    assert explicit.merged(TaskPolicy(max_retries=5, time_limit=3)).time_limit == 3
