"""The autoscaler's decisions, on real slots and a recorded clock: grow with the backlog,
shrink after an idle window to what was used, stay within the bounds."""

from __future__ import annotations

import asyncio

import pytest

from amqptasks.worker.autoscale import Autoscaler
from amqptasks.worker.slots import Slots


async def _resized_to(size: int) -> int:
    return size


def scaler(slots: Slots, maximum: int = 6, minimum: int = 1, idle: float = 30.0) -> Autoscaler:
    a = Autoscaler(slots, _resized_to, maximum, minimum, idle=idle)
    a.reset(now=0.0)
    return a


def test_a_backlog_grows_the_pool_by_what_waits_up_to_the_maximum():
    async def main() -> list[int | None]:
        slots = Slots(1)
        stop = asyncio.Event()
        assert slots.try_take()
        waiting = [asyncio.ensure_future(slots.take(stop)) for _ in range(3)]
        await asyncio.sleep(0)
        a = scaler(slots, maximum=6)
        first = a.target(1.0)  # 3 wait: 1 + 3
        slots.resize(4)
        more = [asyncio.ensure_future(slots.take(stop)) for _ in range(5)]
        await asyncio.sleep(0)
        second = a.target(2.0)  # 5 wait, but at most 6
        slots.resize(6)
        third = a.target(3.0)  # 3 still wait, already at the maximum
        stop.set()
        await asyncio.gather(*waiting, *more)
        return [first, second, third]

    assert asyncio.run(main()) == [4, 6, None]


def test_an_idle_window_shrinks_to_the_most_used_at_least_the_minimum():
    slots = Slots(6)
    a = scaler(slots, minimum=2, idle=30.0)
    for _ in range(3):
        slots.try_take()
    assert a.target(10.0) is None  # three busy, nothing waits: not yet
    for _ in range(3):
        slots.release()
    assert a.target(29.0) is None  # the window is not over
    assert a.target(31.0) == 3  # at most three were busy in it
    slots.resize(3)
    a.reset(now=31.0)
    assert a.target(62.0) == 2  # nothing was busy: down to the minimum
    slots.resize(2)
    a.reset(now=62.0)
    assert a.target(100.0) is None  # at the minimum


def test_a_size_outside_new_bounds_moves_into_them_at_once():
    a = scaler(Slots(8), maximum=6, minimum=2)
    assert a.target(0.0) == 6
    b = scaler(Slots(1), maximum=6, minimum=2)
    assert b.target(0.0) == 2


def test_bounds_must_be_ordered():
    with pytest.raises(ValueError, match="1 <= MIN <= MAX, got MAX 2, MIN 3"):
        Autoscaler(Slots(1), _resized_to, 2, 3)
