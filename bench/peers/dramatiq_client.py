"""Dramatiq client for the benchmarks: ``python -m bench.peers.dramatiq_client MODE [options]``.

Modes: ``seed``, ``publish`` (``actor.send()`` in a loop; ``--confirm`` = ``confirm_delivery``),
``latency``, ``countdown`` (``send_with_options(delay=ms)``). No ``rpc``: Dramatiq's results
need Redis or Memcached.
"""

from __future__ import annotations

import os
import time

from bench.peers.common import PLACEHOLDER_ID, arg_parser, emit, latency_loop, timed


def main() -> None:
    args = arg_parser(__doc__).parse_args()
    if args.confirm:
        os.environ["BENCH_CONFIRM"] = "1"
    from bench.peers import dramatiq_tasks as t

    if args.mode == "seed":
        message = t.noop.message().copy(message_id=PLACEHOLDER_ID)
        t.broker.enqueue(message)
        emit(ok=True)
    elif args.mode == "publish":
        emit(rate=timed(args.n, args.warmup, lambda _i: t.noop.send()))
    elif args.mode == "latency":
        latency_loop(
            args.n, args.warmup, args.interval, lambda sent, keep: t.stamp.send(sent, keep)
        )
        emit(ok=True)
    elif args.mode == "countdown":
        delay = int(args.countdown * 1000)
        t0 = time.perf_counter()
        for _ in range(args.n):
            t.later.send_with_options(delay=delay)
        emit(rate=args.n / (time.perf_counter() - t0))
    else:
        raise SystemExit(f"unknown mode {args.mode!r}")
    t.broker.close()


if __name__ == "__main__":
    main()
