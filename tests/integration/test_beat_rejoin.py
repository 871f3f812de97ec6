"""A scheduler that gets the lock but cannot fire rejoins with a growing pause.

On a cluster, the node hosting the leader of the beat state queue dies: until the survivors'
new leader is known, every ``basic.get`` on it makes the broker close the connection
(``541 INTERNAL_ERROR ... nodedown``). Two schedulers that rejoined at once handed the lock
back and forth in a tight loop, each turn a new connection, and loaded the very nodes that
were electing the leader. Here that broker answer is injected into one scheduler's state
reads, on the real broker; the scheduler must pause longer each time and then fire.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import pika.exceptions
from broker_fixtures import write_config

from amqptasks import load_config
from amqptasks.scheduler import Scheduler, collect_schedules
from amqptasks.transport.beat_lock import BeatLink

FAILURES = 3


def test_a_scheduler_that_holds_the_lock_but_cannot_fire_backs_off_then_fires(
    tmp_path, broker, monkeypatch, caplog
):
    cfg = write_config(
        tmp_path,
        broker,
        schedules={"tick": {"task": "testtasks.record", "args": ["t"], "every": "1s"}},
    )
    settings = load_config(cfg, env={})
    reads: list[float] = []
    real_read = BeatLink._read_state

    def read_state(self: BeatLink) -> bytes | None:
        reads.append(time.monotonic())
        if len(reads) <= FAILURES:
            raise pika.exceptions.ConnectionClosedByBroker(
                541, "INTERNAL_ERROR - Cannot get a message from queue: nodedown"
            )
        return real_read(self)

    monkeypatch.setattr(BeatLink, "_read_state", read_state)
    caplog.set_level(logging.INFO, logger="amqptasks.beat")

    async def main() -> int:
        scheduler = Scheduler(settings, collect_schedules(settings, modules=[]), hostname="t")
        run = asyncio.create_task(scheduler.run(handle_signals=False))
        deadline = time.monotonic() + 60
        while scheduler.fired < 2 and not run.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        fired = scheduler.fired
        scheduler.stop()
        assert await asyncio.wait_for(run, 30) == 0
        return fired

    fired = asyncio.run(main())

    assert fired >= 2, caplog.text
    assert len(reads) == FAILURES + 1
    pauses = [b - a for a, b in itertools.pairwise(reads)]
    # Lower bounds only: a slow machine makes the pauses longer, never shorter.
    assert [p >= want for p, want in zip(pauses, (0.5, 1.0, 2.0), strict=True)] == [True] * 3, (
        pauses
    )
    rejoins = [r.getMessage() for r in caplog.records if "could not fire" in r.getMessage()]
    assert rejoins == [
        f"beat t: held the lock but could not fire; rejoining in {d}s"
        for d in ("0.5", "1.0", "2.0")
    ]
    assert broker.depth("default") >= 2  # the firings after the pauses reached the work queue
