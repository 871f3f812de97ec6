"""Concurrency slots: synchronous fast take, FIFO waiters, shutdown and cancellation."""

from __future__ import annotations

import asyncio

from amqptasks.worker.slots import Slots


def test_try_take_until_full_then_release_frees_one():
    s = Slots(2)
    assert s.try_take() and s.try_take()
    assert not s.try_take()
    assert s.busy == 2
    s.release()
    assert s.busy == 1 and s.try_take()


def test_waiters_are_served_in_arrival_order_and_block_try_take():
    async def main() -> list[str]:
        s = Slots(1)
        stop = asyncio.Event()
        assert s.try_take()
        order: list[str] = []

        async def want(name: str) -> None:
            assert await s.take(stop)
            order.append(name)

        a = asyncio.ensure_future(want("a"))
        await asyncio.sleep(0)
        b = asyncio.ensure_future(want("b"))
        await asyncio.sleep(0)
        assert not s.try_take()  # someone waits: no overtaking
        s.release()
        await a
        s.release()
        await b
        return order

    assert asyncio.run(main()) == ["a", "b"]


def test_stopping_ends_the_wait_without_holding_a_slot():
    async def main() -> tuple[bool, int]:
        s = Slots(1)
        stop = asyncio.Event()
        s.try_take()
        waiting = asyncio.ensure_future(s.take(stop))
        await asyncio.sleep(0)
        stop.set()
        got = await waiting
        s.release()
        return got, s.busy

    assert asyncio.run(main()) == (False, 0)


def test_a_cancelled_waiter_does_not_swallow_a_slot():
    async def main() -> int:
        s = Slots(1)
        stop = asyncio.Event()
        s.try_take()
        waiting = asyncio.ensure_future(s.take(stop))
        await asyncio.sleep(0)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        s.release()
        return s.busy

    assert asyncio.run(main()) == 0
