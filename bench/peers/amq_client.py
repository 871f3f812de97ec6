"""amqptasks client for the benchmarks: ``python -m bench.peers.amq_client MODE [options]``.

Modes: ``seed`` (one message with the placeholder id), ``publish`` (``--style loop``: one caller,
``App.send_task`` confirmed each time; ``--style pipelined``: ``App.prepare`` +
``publisher.publish_nowait`` with at most ``--window`` unconfirmed), ``latency``, ``rpc``,
``countdown``, ``workflows`` (``group(rnoop.s() ...)().get()`` and ``chord(...)(size.s())
.get()`` of ``--n`` members), ``read`` (``app.AsyncResult(id).get()`` of every id in
``--ids``). Config from ``$AMQPTASKS_CONFIG`` (and ``$AMQPTASKS_RESULT_BACKEND``) like any
amqptasks program.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from amqptasks import chord, group
from bench.peers.amq_tasks import app, rnoop, size
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
        # ignore_result=True here only keeps reply_to off the template (copies of it must not
        # answer this gone process); whether the worker stores a result is the task's choice.
        app.send_task(f"bench.{args.task}", task_id=PLACEHOLDER_ID, ignore_result=True)
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
    elif args.mode == "workflows":
        emit(**workflows(args.n, args.warmup, run_group, run_chord, args.ids))
    elif args.mode == "read":
        emit(**reads(args.ids, lambda task_id: app.AsyncResult(task_id).get(timeout=10)))
    else:
        raise SystemExit(f"unknown mode {args.mode!r} / style {args.style!r}")
    app.close()


if __name__ == "__main__":
    main()
