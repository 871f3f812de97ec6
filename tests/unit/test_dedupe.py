"""The worker-side backstop for duplicate scheduled firings and replayed dead letters (no
broker, no worker)."""

from __future__ import annotations

import asyncio
from typing import Any

from amqptasks.dlq import REPLAY_HEADER
from amqptasks.protocol import Envelope
from amqptasks.schedule import SCHEDULE_HEADER
from amqptasks.worker.dedupe import Dedupe
from amqptasks.worker.middleware import Context, Outcome


def ctx(ident: str, *, scheduled: bool = True, retries: int = 0) -> Context:
    headers = {SCHEDULE_HEADER: ident.split(":")[0]} if scheduled else {}
    env = Envelope(task="app.t", id=ident, headers=headers, retries=retries)
    task: Any = object()
    return Context(env, task, "default", "w@test")


def run(dedupe: Dedupe, c: Context, ok: bool = True) -> bool:
    async def go() -> bool:
        if not await dedupe.should_run(c):
            return False
        await dedupe.after_run(c, Outcome(ok=ok))
        return True

    return asyncio.run(go())


def test_a_second_copy_of_a_firing_is_not_run():
    d = Dedupe()
    assert run(d, ctx("tick:2026-01-01T00:00:00Z"))
    assert not run(d, ctx("tick:2026-01-01T00:00:00Z"))
    assert run(d, ctx("tick:2026-01-01T00:00:01Z"))
    assert d.skipped == 1


def test_a_copy_arriving_while_the_first_runs_waits_for_its_outcome():
    """Acking the copy at once would lose the task if the process died before the first
    finished; the copy waits, then is skipped (first succeeded) or runs (first failed)."""

    async def go(first_ok: bool) -> list[Any]:
        d = Dedupe()
        first = ctx("tick:2026-01-01T00:00:00Z")
        copy = ctx("tick:2026-01-01T00:00:00Z")
        assert await d.should_run(first)
        waiting = asyncio.ensure_future(d.should_run(copy))
        await asyncio.sleep(0.05)
        pending = not waiting.done()
        await d.after_run(first, Outcome(ok=first_ok))
        return [pending, await asyncio.wait_for(waiting, 1)]

    assert asyncio.run(go(True)) == [True, False]
    assert asyncio.run(go(False)) == [True, True]


def test_failed_runs_retries_and_unscheduled_messages_are_left_alone():
    d = Dedupe()
    assert run(d, ctx("tick:2026-01-01T00:00:00Z"), ok=False)
    assert run(d, ctx("tick:2026-01-01T00:00:00Z"))  # e.g. replayed from the DLQ
    assert run(d, ctx("tick:2026-01-01T00:00:00Z", retries=1))
    assert run(d, ctx("plain-id", scheduled=False))
    assert run(d, ctx("plain-id", scheduled=False))


def test_memory_is_bounded():
    d = Dedupe(capacity=2)
    for second in range(3):
        assert run(d, ctx(f"tick:2026-01-01T00:00:0{second}Z"))
    assert run(d, ctx("tick:2026-01-01T00:00:00Z"))  # forgotten: the oldest went first
    assert not run(d, ctx("tick:2026-01-01T00:00:02Z"))


def replayed(marker: str, ident: str = "task-1", retries: int = 0) -> Context:
    env = Envelope(task="app.t", id=ident, headers={REPLAY_HEADER: marker}, retries=retries)
    task: Any = object()
    return Context(env, task, "default", "w@test")


def test_a_second_copy_of_a_replayed_dead_letter_is_not_run():
    d = Dedupe()
    assert d.wants(replayed("abc").envelope)
    assert run(d, replayed("abc"))
    assert not run(d, replayed("abc"))
    # The same task id replayed from a later dead-lettering has a new marker: it runs.
    assert run(d, replayed("def"))
    # A retry of a replayed copy is an ordinary retry.
    assert run(d, replayed("abc", retries=1))
    assert d.skipped == 1


def test_a_replay_that_failed_runs_again_when_replayed_again():
    d = Dedupe()
    assert run(d, replayed("abc"), ok=False)
    assert run(d, replayed("abc"))


def test_ordinary_messages_are_not_wanted():
    d = Dedupe()
    assert not d.wants(ctx("plain", scheduled=False).envelope)


def test_replay_message_marks_the_copy_and_drops_an_earlier_mark():
    from amqptasks.dlq import replay_message
    from amqptasks.protocol import Properties

    props = Properties(message_id="m1", headers={REPLAY_HEADER: "old", "x-amqptasks-reason": "r"})
    _, copy = replay_message(b'{"task": "t", "retries": 3}', props, "new")
    assert copy.headers == {REPLAY_HEADER: "new"}
    _, plain = replay_message(b'{"task": "t"}', props)
    assert plain.headers is None
