"""amqptasks client for the benchmarks: ``python -m bench.peers.amq_client MODE [options]``.

Modes: ``seed`` (one message with the placeholder id), ``publish`` (``--style loop``: one caller,
``noop.delay()`` confirmed each time; ``--style bulk``: ``App.send_many`` — the public bulk
API, ``task.delay_many`` is the same call — with at most ``--window`` unconfirmed),
``latency``, ``rpc``, ``countdown``, ``workflows`` (``group(rnoop.s() ...)().get()`` and
``chord(...)(size.s()).get()`` of ``--n`` members), ``read`` (``app.AsyncResult(id).get()`` of
every id in ``--ids``), ``scale-publish`` (``send_many`` of ``--n`` no-ops spread round-robin
over ``--queues``, started at ``--start-at`` so several publisher processes overlap). Config
from ``$AMQPTASKS_CONFIG`` (and ``$AMQPTASKS_RESULT_BACKEND``) like any amqptasks program.
Only the public API is timed: what a user's code would call.
"""

from __future__ import annotations

import time
from typing import Any

from amqptasks import chord, group
from bench.peers.amq_tasks import app, echo, noop, rnoop, size
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

#: Seconds a workflow may take before the client gives up (10,000 members: well under).
WORKFLOW_TIMEOUT = 600.0


def run_group(n: int) -> list[Any]:
    result = group(rnoop.s() for _ in range(n))()
    LAST_IDS[:] = [r.id for r in result.results]
    values: list[Any] = result.get(timeout=WORKFLOW_TIMEOUT)
    return values


def run_chord(n: int) -> Any:
    return chord(rnoop.s() for _ in range(n))(size.s()).get(timeout=WORKFLOW_TIMEOUT)


NOOP_CALL = ("bench.noop", (), None)


def bulk(n: int, window: int, **options: Any) -> None:
    """``n`` no-ops through ``App.send_many`` (every one confirmed on return)."""
    app.send_many([NOOP_CALL] * n, window=window, **options)


def scale_publish(n: int, queues: list[str], window: int, warmup: int, start_at: float) -> None:
    """Warm up (``warmup`` no-ops to the first queue), wait for the barrier, then publish
    ``n`` no-ops in chunks, round-robin over ``queues``; reports the wall-clock span so the
    harness can time several publisher processes together, and how many it published."""
    bulk(warmup, window, queue=queues[0])
    chunk = max(1, min(window, n // len(queues)))
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    t0 = time.time()
    sent = 0
    i = 0
    while sent < n:
        k = min(chunk, n - sent)
        bulk(k, window, queue=queues[i % len(queues)])
        sent += k
        i += 1
    emit(t_start=t0, t_end=time.time(), published=sent + warmup)


def main() -> None:
    args = arg_parser(__doc__).parse_args()
    if args.mode == "seed":
        # ignore_result=True here only keeps reply_to off the template (copies of it must not
        # answer this gone process); whether the worker stores a result is the task's choice.
        app.send_task(f"bench.{args.task}", task_id=PLACEHOLDER_ID, ignore_result=True)
        emit(ok=True)
    elif args.mode == "publish" and args.style == "loop":
        emit(rate=timed(args.n, args.warmup, lambda _i: noop.delay()))
    elif args.mode == "publish" and args.style == "bulk":
        bulk(args.warmup, args.window)
        t0 = time.perf_counter()
        bulk(args.n, args.window)
        emit(rate=args.n / (time.perf_counter() - t0))
    elif args.mode == "scale-publish":
        queues = [q for q in args.queues.split(",") if q]
        scale_publish(args.n, queues, args.window, args.warmup, args.start_at)
    elif args.mode == "latency":
        latency_loop(
            args.n,
            args.warmup,
            args.interval,
            lambda sent, keep: app.send_task("bench.stamp", (sent, keep)),
        )
        emit(ok=True)
    elif args.mode == "rpc":
        emit(**round_trips(args.n, args.warmup, lambda i: echo.delay(i).get(10), args.min_seconds))
    elif args.mode == "countdown":
        t0 = time.perf_counter()
        app.send_many([("bench.later", (), None)] * args.n, countdown=args.countdown)
        emit(rate=args.n / (time.perf_counter() - t0))
    elif args.mode == "workflows":
        emit(**workflows(args.n, args.warmup, run_group, run_chord, args.ids))
    elif args.mode == "read":
        emit(**reads(args.ids, lambda task_id: app.AsyncResult(task_id).get(timeout=10)))
    else:
        raise SystemExit(f"unknown mode {args.mode!r} / style {args.style!r}")
    app.close()


if __name__ == "__main__":
    main()
