"""The ack window never acks a delivery that is not settled (batched multiple=True acks)."""

from __future__ import annotations

import random

from amqptasks.transport.pika_consumer import AckWindow


def test_in_order_completion_acks_the_prefix():
    w = AckWindow()
    for t in (1, 2, 3):
        w.delivered(t)
    w.settle(1, acked=True)
    w.settle(2, acked=True)
    assert w.ackable() == 2


def test_a_running_delivery_holds_back_later_acks():
    w = AckWindow()
    for t in (1, 2, 3, 4):
        w.delivered(t)
    for t in (1, 3, 4):
        w.settle(t, acked=True)
    assert w.ackable() == 1  # 2 still runs: 3 and 4 must wait
    w.last_acked = 1
    w.settle(2, acked=True)
    assert w.ackable() == 4


def test_rejected_deliveries_do_not_block_and_are_not_acked_alone():
    w = AckWindow()
    for t in (1, 2, 3):
        w.delivered(t)
    w.settle(2, acked=False)  # rejected individually
    assert w.ackable() == 0  # nothing acked yet: 1 still runs
    w.settle(1, acked=True)
    assert w.ackable() == 1
    w.last_acked = 1
    w.settle(3, acked=True)
    assert w.ackable() == 3


def test_random_orders_never_ack_an_unsettled_tag():
    rng = random.Random(5)
    for _ in range(200):
        w = AckWindow()
        tags = list(range(1, 30))
        for t in tags:
            w.delivered(t)
        order = tags[:]
        rng.shuffle(order)
        settled: set[int] = set()
        for t in order:
            w.settle(t, acked=True)
            settled.add(t)
            target = w.ackable()
            if target:
                assert all(x in settled for x in range(1, target + 1))
                w.last_acked = target
        assert w.last_acked == 29 or w.ackable() == 29
