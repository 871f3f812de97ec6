"""The scale group (``--only scale``): amqptasks with 1, 2 and 4 processes and 1, 10 and 100
queues, each cell on a fresh vhost with the queues declared by ``topology apply``.

A cell is two phases on the same messages:

1. **publish**: P publisher processes, each ``App.send_many`` of N/P no-ops in chunks
   round-robin over the Q queues (after a small warm-up, all started together at a
   wall-clock barrier); the rate is every timed message over the span from the first start
   to the last end, so a late publisher counts against us;
2. **consume**: P worker processes (asyncio pool, -c 8, prefetch 256), each consuming all Q
   queues, drain what was published. The drain is timed from the executed counts (flushed
   every 50 ms), not from queue depths (100 queues would take 100 passive declares per
   sample): between 10 % and 90 % executed, interpolated, so start-up and tail are out. A
   cell counts only when every message ran exactly once and no dead-letter queue holds one.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .broker import drain_marks
from .frameworks import AmqpTasks, Framework
from .measure import Ctx, _count_total, _died, _start, _stop, _try
from .procs import BenchError, Invalid
from .targets import scale_label

__all__ = ["scale", "scale_queues"]


def scale_queues(n: int) -> list[str]:
    """The ``n`` queues of a scale cell."""
    return [f"bench.s{i:03d}" for i in range(n)]


def scale(ctx: Ctx, frameworks: list[Framework]) -> None:
    fw = next((f for f in frameworks if isinstance(f, AmqpTasks)), None)
    if fw is None:
        ctx.log("    scale: measures amqptasks only, which is not selected")
        return
    for r in range(ctx.sizes.scale_repeats):
        for processes in ctx.sizes.scale_processes:
            for nq in ctx.sizes.scale_queues:
                label = scale_label(processes, nq)
                got = _try(ctx, "scale_consume", fw, label, _cell, ctx, fw, processes, nq)
                if got is None:
                    continue
                (pub, pub_s), (con, con_s) = got
                ctx.results.add("scale_publish", fw.name, fw.group, label, pub, window=pub_s)
                ctx.results.add("scale_consume", fw.name, fw.group, label, con, window=con_s)
                ctx.log(
                    f"    {label} #{r + 1}: publish {pub:,.0f} msg/s over {pub_s:.1f} s, "
                    f"consume {con:,.0f} tasks/s over {con_s:.1f} s"
                )


def _cell(
    ctx: Ctx, fw: AmqpTasks, processes: int, nq: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    """One cell: ((publish rate, its seconds), (consume rate, its window seconds))."""
    queues = scale_queues(nq)
    with ctx.vhost(f"scale-{processes}x{nq}") as vh:
        env = fw.setup(ctx.procs, vh, ctx.workdir, queues)
        pub, pub_s, total = _publish(ctx, fw, env, processes, queues)
        count_dir = Path(tempfile.mkdtemp(prefix="count-", dir=ctx.workdir))
        spec = fw.scale_spec(processes, queues)
        extra = {"BENCH_COUNT_DIR": str(count_dir), "BENCH_COUNT_INTERVAL": "0.05"}
        workers = _start(ctx, spec, env, extra)
        try:
            samples: list[tuple[float, int]] = []
            deadline = time.monotonic() + 120 + total / 500
            while True:
                done = _count_total(count_dir)
                samples.append((time.perf_counter(), total - done))
                if done >= total:
                    break
                problem = _died(workers)
                if problem:
                    raise BenchError(problem)
                if time.monotonic() > deadline:
                    raise BenchError(f"only {done} of {total} executed in time")
                time.sleep(0.02)
            time.sleep(0.3)
            done = _count_total(count_dir)
            if done != total:
                raise Invalid(f"{done} executions for {total} messages")
        finally:
            _stop(ctx, workers, spec.stop_grace)
        marks = drain_marks(samples, total, total // 10)
        if marks is None:
            raise Invalid(f"drained too fast to time ({len(samples)} samples): raise --scale-n")
        t_hi, t_lo, count = marks
        for q in queues:
            dead = vh.depth(f"{q}.dlq")[0]
            if dead:
                raise Invalid(f"{dead} messages dead-lettered into {q}.dlq")
        return (pub, pub_s), (count / (t_lo - t_hi), t_lo - t_hi)


def _publish(
    ctx: Ctx, fw: AmqpTasks, env: dict[str, str], processes: int, queues: list[str]
) -> tuple[float, float, int]:
    """P publisher processes at once; (rate, seconds, messages now in the queues)."""
    n = ctx.sizes.scale // processes
    start_at = time.time() + 4 + processes  # after every client imported and warmed up
    clients = [
        ctx.procs.start(
            f"amqptasks-scale-publish{i}",
            fw.client_argv(
                "scale-publish",
                "--n",
                str(n),
                "--warmup",
                "200",
                "--queues",
                ",".join(queues),
                "--start-at",
                f"{start_at:.3f}",
            ),
            env,
        )
        for i in range(processes)
    ]
    try:
        results = [ctx.procs.finish(c, 60 + ctx.sizes.scale / 500) for c in clients]
    finally:  # one failed: the others are not left running until the end of the run
        for c in clients:
            ctx.procs.stop(c, 5)
    span = max(float(r["t_end"]) for r in results) - min(float(r["t_start"]) for r in results)
    total = sum(int(r["published"]) for r in results)
    return n * processes / span, span, total
