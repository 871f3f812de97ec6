"""Celery client for the benchmarks: ``python -m bench.peers.celery_client MODE [options]``.

Modes: ``seed``, ``publish`` (``apply_async`` in a loop; ``--confirm`` = publisher confirms via
``broker_transport_options``), ``latency``, ``rpc`` (``delay().get()``, rpc:// backend),
``countdown`` (``apply_async(countdown=...)``).
"""

from __future__ import annotations

import os
import time

from bench.peers.common import (
    PLACEHOLDER_ID,
    arg_parser,
    emit,
    latency_loop,
    round_trips,
    timed,
)


def main() -> None:
    args = arg_parser(__doc__).parse_args()
    if args.confirm:
        os.environ["BENCH_CONFIRM"] = "1"
    from bench.peers import celery_tasks as t

    if args.mode == "seed":
        t.noop.apply_async(task_id=PLACEHOLDER_ID)
        emit(ok=True)
    elif args.mode == "publish":
        emit(rate=timed(args.n, args.warmup, lambda _i: t.noop.apply_async()))
    elif args.mode == "latency":
        latency_loop(
            args.n,
            args.warmup,
            args.interval,
            lambda sent, keep: t.stamp.apply_async((sent, keep)),
        )
        emit(ok=True)
    elif args.mode == "rpc":
        emit(**round_trips(args.n, args.warmup, lambda i: t.echo.delay(i).get(timeout=10)))
    elif args.mode == "countdown":
        t0 = time.perf_counter()
        for _ in range(args.n):
            t.later.apply_async(countdown=args.countdown)
        emit(rate=args.n / (time.perf_counter() - t0))
    else:
        raise SystemExit(f"unknown mode {args.mode!r}")


if __name__ == "__main__":
    main()
