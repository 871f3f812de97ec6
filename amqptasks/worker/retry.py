"""Retry decisions: pure functions from (policy, failure, retries) to "retry in N s" or "fail".

The worker asks :func:`decide` after a task failed. A retry is a new message (one more
``retries``, a broker-side delay) that the broker confirms before the original is acked; the
decision itself needs no I/O, so it is tested without a broker.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..config import TaskPolicy
from ..errors import MaxRetriesExceeded, Retry, WorkerLost

__all__ = ["Decision", "backoff", "decide"]


@dataclass(frozen=True, slots=True)
class Decision:
    """Retry after ``countdown`` seconds, or fail for good with ``exc``."""

    retry: bool
    countdown: float = 0.0
    exc: BaseException | None = None


def backoff(policy: TaskPolicy, retries: int, rng: random.Random | None = None) -> float:
    """Seconds before retry number ``retries + 1``.

    With ``retry_backoff`` (a base in seconds) the delay is ``base * 2**retries`` capped at
    ``retry_backoff_max``; with ``retry_jitter`` it is drawn uniformly from [0, that] ("full
    jitter", which spreads a thundering herd best). Without backoff it is
    ``default_retry_delay``.
    """
    base = policy.retry_backoff or 0.0
    if base <= 0:
        return float(policy.default_retry_delay or 0.0)
    delay: float = min(float(policy.retry_backoff_max or 600.0), base * (2.0**retries))
    if policy.retry_jitter:
        delay = (rng or random).uniform(0, delay)
    return delay


def _autoretry(
    exc: BaseException, classes: tuple[type[BaseException], ...], names: tuple[str, ...]
) -> bool:
    if classes and isinstance(exc, classes):
        return True
    mro = {c.__name__ for c in type(exc).__mro__}
    remote = getattr(exc, "exc_mro", None)  # failures reported by a child process
    if remote:
        mro |= set(remote)
    return any(name in mro for name in names)


def decide(
    policy: TaskPolicy,
    exc: BaseException,
    retries: int,
    autoretry_for: tuple[type[BaseException], ...] = (),
    rng: random.Random | None = None,
) -> Decision:
    """Retry or fail after ``exc``; ``retries`` is how many retries already happened."""
    max_retries = policy.max_retries if policy.max_retries is not None else 3
    if isinstance(exc, Retry):
        limit = exc.max_retries if exc.max_retries is not None else max_retries
        if retries >= limit:
            return Decision(
                False,
                exc=exc.exc
                or MaxRetriesExceeded(
                    f"retry requested with no retries left ({retries} of {limit} used)"
                ),
            )
        countdown = exc.countdown if exc.countdown is not None else backoff(policy, retries, rng)
        return Decision(True, countdown=countdown)
    if isinstance(exc, WorkerLost) or _autoretry(exc, autoretry_for, policy.autoretry_for or ()):
        if retries >= max_retries:
            return Decision(False, exc=exc)
        return Decision(True, countdown=backoff(policy, retries, rng))
    return Decision(False, exc=exc)
