"""amqptasks client for the benchmarks: ``python -m bench.peers.amq_client MODE [options]``.

Modes: ``seed`` (one message with the placeholder id), ``publish`` (``--style loop``: one caller,
``App.send_task`` confirmed each time; ``--style pipelined``: ``App.prepare`` +
``publisher.publish_nowait`` with at most ``--window`` unconfirmed), ``latency``, ``rpc``,
``countdown``. Config from ``$AMQPTASKS_CONFIG`` like any amqptasks program.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from bench.peers.amq_tasks import app
from bench.peers.common import (
    PLACEHOLDER_ID,
    arg_parser,
    emit,
    latency_loop,
    round_trips,
    timed,
)


def pipelined(name: str, n: int, window: int, **options: Any) -> None:
    """Publish ``n`` tasks keeping up to ``window`` confirms outstanding; all confirmed on
    return (a failed publish raises)."""
    publisher = app.publisher
    pending: collections.deque[Any] = collections.deque()
    for _ in range(n):
        p = app.prepare(name, reply_to=None, **options)
        for exchange, key in p.destinations:
            pending.append(publisher.publish_nowait(exchange, key, p.body, p.props))
        while len(pending) >= window:
            pending.popleft().result(publisher.timeout)
    while pending:
        pending.popleft().result(publisher.timeout)


def main() -> None:
    args = arg_parser(__doc__).parse_args()
    if args.mode == "seed":
        app.send_task("bench.noop", task_id=PLACEHOLDER_ID)
        emit(ok=True)
    elif args.mode == "publish" and args.style == "loop":
        rate = timed(args.n, args.warmup, lambda _i: app.send_task("bench.noop"))
        emit(rate=rate)
    elif args.mode == "publish" and args.style == "pipelined":
        pipelined("bench.noop", args.warmup, args.window)
        t0 = time.perf_counter()
        pipelined("bench.noop", args.n, args.window)
        emit(rate=args.n / (time.perf_counter() - t0))
    elif args.mode == "latency":
        latency_loop(
            args.n,
            args.warmup,
            args.interval,
            lambda sent, keep: app.send_task("bench.stamp", (sent, keep)),
        )
        emit(ok=True)
    elif args.mode == "rpc":
        emit(
            **round_trips(args.n, args.warmup, lambda i: app.send_task("bench.echo", (i,)).get(10))
        )
    elif args.mode == "countdown":
        t0 = time.perf_counter()
        pipelined("bench.later", args.n, args.window, countdown=args.countdown)
        emit(rate=args.n / (time.perf_counter() - t0))
    else:
        raise SystemExit(f"unknown mode {args.mode!r} / style {args.style!r}")
    app.close()


if __name__ == "__main__":
    main()
