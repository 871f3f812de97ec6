"""The worker-side backstop for duplicate scheduled firings (no broker, no worker)."""

from __future__ import annotations

import asyncio
from typing import Any

from amqptasks.dedupe import ScheduledDedupe
from amqptasks.middleware import Context, Outcome
from amqptasks.protocol import Envelope
from amqptasks.schedule import SCHEDULE_HEADER


def ctx(ident: str, *, scheduled: bool = True, retries: int = 0) -> Context:
    headers = {SCHEDULE_HEADER: ident.split(":")[0]} if scheduled else {}
    env = Envelope(task="app.t", id=ident, headers=headers, retries=retries)
    task: Any = object()
    return Context(env, task, "default", "w@test")


def run(dedupe: ScheduledDedupe, c: Context, ok: bool = True) -> bool:
    async def go() -> bool:
        if not await dedupe.should_run(c):
            return False
        await dedupe.after_run(c, Outcome(ok=ok))
        return True

    return asyncio.run(go())


def test_a_second_copy_of_a_firing_is_not_run():
    d = ScheduledDedupe()
    assert run(d, ctx("tick:2026-01-01T00:00:00Z"))
    assert not run(d, ctx("tick:2026-01-01T00:00:00Z"))
    assert run(d, ctx("tick:2026-01-01T00:00:01Z"))
    assert d.skipped == 1


def test_a_copy_arriving_while_the_first_runs_is_skipped():
    d = ScheduledDedupe()
    first, copy = ctx("tick:2026-01-01T00:00:00Z"), ctx("tick:2026-01-01T00:00:00Z")

    async def go() -> list[bool]:
        started = await d.should_run(first)
        again = await d.should_run(copy)
        await d.after_run(first, Outcome(ok=True))
        return [started, again]

    assert asyncio.run(go()) == [True, False]


def test_failed_runs_retries_and_unscheduled_messages_are_left_alone():
    d = ScheduledDedupe()
    assert run(d, ctx("tick:2026-01-01T00:00:00Z"), ok=False)
    assert run(d, ctx("tick:2026-01-01T00:00:00Z"))  # e.g. replayed from the DLQ
    assert run(d, ctx("tick:2026-01-01T00:00:00Z", retries=1))
    assert run(d, ctx("plain-id", scheduled=False))
    assert run(d, ctx("plain-id", scheduled=False))


def test_memory_is_bounded():
    d = ScheduledDedupe(capacity=2)
    for second in range(3):
        assert run(d, ctx(f"tick:2026-01-01T00:00:0{second}Z"))
    assert run(d, ctx("tick:2026-01-01T00:00:00Z"))  # forgotten: the oldest went first
    assert not run(d, ctx("tick:2026-01-01T00:00:02Z"))
