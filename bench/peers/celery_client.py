"""Celery client for the benchmarks: ``python -m bench.peers.celery_client MODE [options]``.

Modes: ``seed``, ``publish`` (``apply_async`` in a loop; ``--confirm`` = publisher confirms via
``broker_transport_options``), ``latency``, ``rpc`` (``delay().get()``, rpc:// backend),
``countdown`` (``apply_async(countdown=...)``), ``workflows`` (``group(...)().get()`` and
``chord(...)(size.s()).get()`` with the redis backend of ``$BENCH_CELERY_BACKEND``), ``read``
(``AsyncResult(id).get()`` of every id in ``--ids``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from bench.peers.common import (
    LAST_IDS,
    PLACEHOLDER_ID,
    arg_parser,
    emit,
    latency_loop,
    reads,
    round_trips,
    timed,
    workflows,
)

WORKFLOW_TIMEOUT = 600.0


def main() -> None:
    args = arg_parser(__doc__).parse_args()
    if args.confirm:
        os.environ["BENCH_CONFIRM"] = "1"
    from celery import chord, group
    from celery.result import AsyncResult

    from bench.peers import celery_tasks as t

    def run_group(n: int) -> list[Any]:
        result = group(t.rnoop.s() for _ in range(n))()
        LAST_IDS[:] = [r.id for r in result.results]
        values: list[Any] = result.get(timeout=WORKFLOW_TIMEOUT)
        return values

    def run_chord(n: int) -> Any:
        return chord(t.rnoop.s() for _ in range(n))(t.size.s()).get(timeout=WORKFLOW_TIMEOUT)

    if args.mode == "seed":
        getattr(t, args.task).apply_async(task_id=PLACEHOLDER_ID)
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
        emit(
            **round_trips(
                args.n, args.warmup, lambda i: t.echo.delay(i).get(timeout=10), args.min_seconds
            )
        )
    elif args.mode == "countdown":
        t0 = time.perf_counter()
        for _ in range(args.n):
            t.later.apply_async(countdown=args.countdown)
        emit(rate=args.n / (time.perf_counter() - t0))
    elif args.mode == "workflows":
        emit(**workflows(args.n, args.warmup, run_group, run_chord, args.ids))
    elif args.mode == "read":
        emit(**reads(args.ids, lambda task_id: AsyncResult(task_id, app=t.app).get(timeout=10)))
    else:
        raise SystemExit(f"unknown mode {args.mode!r}")


if __name__ == "__main__":
    main()
