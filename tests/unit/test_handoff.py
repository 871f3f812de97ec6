"""The one-wake-per-batch handoff used by the worker and the sync publisher (no broker)."""

from __future__ import annotations

import threading

from amqptasks.handoff import Handoff


def test_only_the_first_item_of_a_batch_asks_for_a_wake():
    h: Handoff[int] = Handoff()
    assert h.put(1) is True
    assert h.put(2) is False and h.put(3) is False
    assert h.take() == [1, 2, 3]
    assert h.take() == []
    assert h.put(4) is True  # a new batch wakes again


def test_no_item_is_lost_or_left_without_a_wake_across_threads():
    h: Handoff[int] = Handoff()
    wakes = threading.Semaphore(0)
    taken: list[int] = []

    def producer(base: int) -> None:
        for i in range(5_000):
            if h.put(base + i):
                wakes.release()

    threads = [threading.Thread(target=producer, args=(k * 10_000,)) for k in range(4)]
    for t in threads:
        t.start()
    while len(taken) < 20_000:  # the consumer: one take per wake, as a loop would do
        assert wakes.acquire(timeout=10), f"an item waits without a wake ({len(taken)} taken)"
        taken.extend(h.take())
    for t in threads:
        t.join()
    assert sorted(taken) == sorted(k * 10_000 + i for k in range(4) for i in range(5_000))
