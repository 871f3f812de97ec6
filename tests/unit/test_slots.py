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


def test_grow_hands_the_new_slots_to_waiters_at_once():
    async def main() -> tuple[int, int, list[bool]]:
        s = Slots(1)
        stop = asyncio.Event()
        assert s.try_take()
        waiting = [asyncio.ensure_future(s.take(stop)) for _ in range(3)]
        await asyncio.sleep(0)
        assert s.waiting == 3
        s.resize(3)  # two more slots: the first two waiters run now, the third still waits
        busy, left = s.busy, s.waiting
        granted = list(await asyncio.gather(*waiting[:2]))
        stop.set()
        return busy, left, [*granted, await waiting[2]]

    assert asyncio.run(main()) == (3, 1, [True, True, False])


def test_shrink_interrupts_nothing_and_takes_slots_back_as_they_are_released():
    async def main() -> list[tuple[int, int, bool]]:
        s = Slots(4)
        stop = asyncio.Event()
        for _ in range(4):
            assert s.try_take()
        s.resize(2)  # four still run: none is interrupted
        seen = [(s.busy, s.size, s.try_take())]
        waiter = asyncio.ensure_future(s.take(stop))
        await asyncio.sleep(0)
        s.release()  # 3 busy > 2: the waiter does not get it
        await asyncio.sleep(0)
        seen.append((s.busy, s.waiting, waiter.done()))
        s.release()  # 2 busy: still at the size
        await asyncio.sleep(0)
        seen.append((s.busy, s.waiting, waiter.done()))
        s.release()  # 1 busy: now the waiter runs
        seen.append((s.busy, s.waiting, await waiter))
        return seen

    assert asyncio.run(main()) == [(4, 2, False), (3, 1, False), (2, 1, False), (2, 0, True)]


def test_a_pool_keeps_at_least_one_slot():
    import pytest

    with pytest.raises(ValueError, match="at least one slot"):
        Slots(2).resize(0)


def test_a_waiter_calls_on_wait_the_fast_path_never_does():
    async def main() -> int:
        calls: list[int] = []
        s = Slots(1)
        s.on_wait = lambda: calls.append(1)
        stop = asyncio.Event()
        assert s.try_take()
        assert not s.try_take()
        waiting = asyncio.ensure_future(s.take(stop))
        await asyncio.sleep(0)
        stop.set()
        await waiting
        return len(calls)

    assert asyncio.run(main()) == 1


def test_fast_path_waiters_queue_in_arrival_order_with_awaiting_ones():
    from amqptasks.worker.slots import SyncWaiter

    async def main() -> list[str]:
        s = Slots(1)
        stop = asyncio.Event()
        assert s.try_take()
        order: list[str] = []
        s.enqueue(SyncWaiter(lambda: order.append("sync1")))

        async def want(name: str) -> None:
            assert await s.take(stop)
            order.append(name)

        a = asyncio.ensure_future(want("async"))
        await asyncio.sleep(0)
        s.enqueue(SyncWaiter(lambda: order.append("sync2")))
        assert s.waiting == 3 and not s.try_take()
        s.release()  # -> sync1, synchronously, holding the slot
        assert order == ["sync1"] and s.busy == 1
        s.release()  # -> the awaiting one
        await a
        s.release()  # -> sync2
        assert s.busy == 1 and s.waiting == 0
        return order

    assert asyncio.run(main()) == ["sync1", "async", "sync2"]


def test_a_fast_path_waiter_that_left_neither_runs_nor_holds_the_queue():
    from amqptasks.worker.slots import SyncWaiter

    s = Slots(1)
    assert s.try_take()
    ran: list[str] = []
    gone = SyncWaiter(lambda: ran.append("gone"))
    s.enqueue(gone)
    assert gone.cancel() and s.waiting == 0
    s.release()
    assert ran == [] and s.busy == 0
    assert s.try_take()  # the left waiter does not block the next taker
    s.release()
    s.enqueue(SyncWaiter(lambda: ran.append("now")))  # a slot is free: granted at once
    assert ran == ["now"] and s.busy == 1
