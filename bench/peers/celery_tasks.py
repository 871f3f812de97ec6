"""Celery task module for the benchmarks (runs in the Celery virtualenv).

Settings every framework shares: durable queue, persistent messages, JSON only. The worker's
options (pool, concurrency, acks_late, prefetch multiplier) come from the command line and
``$BENCH_ACKS_LATE`` / ``$BENCH_PREFETCH_MULTIPLIER``; ``$BENCH_CONFIRM=1`` turns on publisher
confirms for clients. Results: the ``rpc://`` backend (AMQP, like amqptasks), only for echo;
``$BENCH_CELERY_BACKEND`` (a ``redis://`` URL) for the results and workflows group, whose tasks
(``rnoop``, ``size``) keep their results. ``result_extended`` stays off (Celery's default: no
task name, args or worker in the stored record).
"""

from __future__ import annotations

import os

from celery import Celery

from bench.peers.common import QUEUE, URL, count, record_latency

app = Celery("bench", broker=URL, backend=os.environ.get("BENCH_CELERY_BACKEND", "rpc://"))
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_default_queue=QUEUE,
    task_default_exchange=QUEUE,
    task_default_routing_key=QUEUE,
    task_default_delivery_mode="persistent",
    task_acks_late=os.environ.get("BENCH_ACKS_LATE", "1") == "1",
    worker_prefetch_multiplier=int(os.environ.get("BENCH_PREFETCH_MULTIPLIER", "256")),
    task_ignore_result=True,
    result_persistent=False,
    worker_disable_rate_limits=True,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"confirm_publish": os.environ.get("BENCH_CONFIRM") == "1"},
    worker_hijack_root_logger=True,
    result_extended=False,
)


@app.task(name="bench.noop")
def noop() -> None:
    count()


@app.task(name="bench.stamp")
def stamp(sent: float, keep: bool = True) -> None:
    if keep:
        record_latency(sent)


@app.task(name="bench.echo", ignore_result=False)
def echo(value: int) -> int:
    return value


@app.task(name="bench.later")
def later() -> None:
    count()


@app.task(name="bench.rnoop", ignore_result=False)
def rnoop() -> None:
    count()


@app.task(name="bench.size", ignore_result=False)
def size(results: list[object]) -> int:
    return len(results)
