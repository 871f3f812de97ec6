"""Dramatiq actor module for the benchmarks (runs in the Dramatiq virtualenv).

RabbitMQ broker with default middleware; queues are durable and messages persistent (Dramatiq's
own choices), JSON encoder (its default). ``$BENCH_CONFIRM=1`` turns on publisher confirms.
Threads and processes come from the ``dramatiq`` command line, prefetch from
``$dramatiq_queue_prefetch``.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from bench.peers.common import QUEUE, URL, count, record_latency

broker = RabbitmqBroker(url=URL, confirm_delivery=os.environ.get("BENCH_CONFIRM") == "1")
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, actor_name="bench_noop", max_retries=0)
def noop() -> None:
    count()


@dramatiq.actor(queue_name=QUEUE, actor_name="bench_stamp", max_retries=0)
def stamp(sent: float, keep: bool = True) -> None:
    if keep:
        record_latency(sent)


@dramatiq.actor(queue_name=QUEUE, actor_name="bench_later", max_retries=0)
def later() -> None:
    count()
