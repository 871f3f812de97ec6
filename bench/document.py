"""The markdown report (docs/benchmarks.md on a full run): the targets table first, then how
the figures were taken, the run's facts, the summary, the scale and RSS tables, the plots
and every configuration."""

from __future__ import annotations

from typing import Any

from . import targets as tg
from .plots import Plot
from .report import (
    COST_HEADER,
    SUMMARY_HEADER,
    Results,
    cost_rows,
    detail_rows,
    md_table,
    summary_rows,
)

METHOD = """\
## How to run

```sh
./dev bench            # full run (about an hour): writes this file and its plots
./dev bench --quick    # small N, main configurations, 3 repeats, no 1M-task RSS: minutes
python -m bench --help # --only, --repeats, --out, --no-peers, --frameworks, sizes
python -m bench --only results,workflows   # results and workflows vs Celery (Redis)
python -m bench --only scale               # amqptasks: 1/2/4 processes × 1/10/100 queues
python -m bench.profile worker --pool asyncio   # py-spy profile of a worker draining 200k
```

The harness creates the peers' virtualenvs itself (`.amqptasks/bench/venv-celery`,
`.amqptasks/bench/venv-dramatiq`: `python3 -m venv` + `pip install 'celery[redis]'` /
`pip install 'dramatiq[rabbitmq]'`, the latest releases; reused when present) and runs
everything against the project's local RabbitMQ (and, for the results and workflows
groups, its local Redis; `./dev bench` starts both), each measurement group in its own
vhost, created and deleted through the management API. Plots need matplotlib (the `dev`
extra); without it the report says "plots skipped: matplotlib missing".

## Method

* **Same settings for all**: one durable queue, persistent messages (delivery mode 2), JSON
  bodies, worker logging at WARNING, prefetch 256 per worker process unless a configuration
  says otherwise, acks after the task ran unless a configuration says "early ack".
* **Fairness rules** (from an independent rerun that found where the harness favoured us):
  every contender's best is picked the same way — the best median over the configurations
  it ran — and every group that compares contenders runs all of their configurations:
  latency, `delay().get()` and idle memory run **every** plain configuration of the
  one-process consume group (Dramatiq's `--threads 1`, its lowest-latency one, included;
  `--quick` runs the ones marked quick). A configuration that is another one under a second
  name is not drawn twice (the asyncio pool runs a sync no-op inline, so its `-c 256` was
  its `-c 8` again). Bulk is compared with bulk and a single-call loop with a single-call
  loop; amqptasks is timed through its public API only. Memory is PSS, and every throughput
  figure is measured over at least 5 s (shortest window of the run: see its parameters).
* **Consume**: N messages are pre-filled — copies of one message published through the
  framework's own API (its id replaced per copy), so every worker reads exactly what its
  framework would have sent — then the worker is started and the queue depth is sampled by
  passive `queue.declare` every 10 ms. Throughput is measured between two depth marks
  (after `max(10 %, 2 × prefetch)` messages are gone, until 10 % remain; crossing times
  interpolated between samples), which excludes start-up, warm-up and the tail. A run whose
  window is shorter than 5 s (1 s with `--quick`) only raises N and is run again, not
  counted (N is capped at 400,000). The no-op task counts its executions (a locked
  increment, flushed to a file by a thread every 0.2 s) and the run is only accepted when
  exactly N ran and the dead-letter queue is empty. "Events on" and "metrics on" are
  amqptasks' configurations with `--events` / `--metrics-port`, figures of their own
  (their cost is set against the same worker without them).
* **Raw ceiling**: raw pika with batched acks is the consume ceiling the target is set
  against (the best of two, by median): pika's `AsyncioConnection` acking
  `basic.ack multiple=True` once per event-loop turn — amqptasks' worker's own pattern — and
  a `BlockingConnection` acking `multiple=True` every 64 deliveries (whatever is left every
  20 ms). Raw pika with one ack per message and raw aio-pika are shown beside them.
  Each reads its own minimal message (a 62-byte body, 57 bytes of properties). A second
  ceiling, `consume1_same`, is the same `AsyncioConnection` consumer reading amqptasks'
  messages from amqptasks' queue, with its own target row. Why both: RabbitMQ keeps a
  body or a properties block of at most 64 bytes as an Erlang heap binary and a larger
  one as a reference-counted binary, and the larger kind costs the broker about twice the
  CPU per message (measured on this machine with one raw pika consumer: 13 µs per message
  with raw pika's message, 23 µs with 13 more body bytes or a correlation id, 28 µs with
  amqptasks' message). Any real task message (amqptasks' or Celery's) is past that line,
  so on a 2-core machine a consumer of one is broker-bound below raw pika's own rate;
  the second row says how close the worker comes to a raw client given the same bytes.
* **Publish**: one client process per run, warm-up calls excluded, N raised until the timed
  part lasts 5 s. "Confirmed" waits for the broker's `basic.ack`. A loop is one call at a
  time (amqptasks: `noop.delay()`; raw pika: `basic_publish` on a confirm channel). Bulk is
  amqptasks' public bulk API, `App.send_many` (what `task.delay_many` calls; up to 1,000
  confirms outstanding, all confirmed on return), against raw pipelined-confirm publishers
  with the same window: pika's `SelectConnection` and aio-pika.
* **Publish→start latency**: one message every 5 ms through the framework's API, carrying
  `time.time()` at the call; the task records `time.time() - sent` first thing. 50 warm-up
  messages excluded. The CDF plot pools the samples of each contender's best configuration.
* **`delay().get()`**: sequential round trips, at least N and for at least 5 s (amqptasks:
  `echo.delay(i).get()`, each configuration with the default SQLite store (the worker
  writes the result durably, then replies) and one with the `rpc://` store (a reply,
  nothing kept: the like-for-like row); Celery: the `rpc://` backend; raw pika: direct
  reply-to, unconfirmed (the target's figure) and with the caller's publish confirmed as
  `delay()` always does; Dramatiq: n/a, its results need Redis or Memcached).
* **Consume with results** (`results`): the consume measurement (one worker process) with
  each result configuration, every run on a fresh store — amqptasks: `ignore_result`
  (today's consume figure: a store configured, the task keeps nothing), `rpc://` with no
  reply wanted (the task keeps its result, the message has no `reply_to`), the SQLite store
  (a new file per run, on the project's disk), the Redis store; Celery: `ignore_result` and
  its redis backend (`result_extended` off, its default). "What results cost" sets each
  figure against the same contender's no-results figure.
* **Workflows** (`workflows`): with the worker consuming, one client applies
  `group(noop.s() for _ in range(N))` and waits for every result, then
  `chord(noop.s() for _ in range(N))(size.s())` and waits for the body's result (N = 10,000;
  each timed from the call to the last result, the results checked, after an untimed
  warm-up of 100). Celery uses its redis backend, whose chord is joined in Redis (each
  member's result appended and counted by one Lua script; the member that completes it
  calls the body) rather than by the polling `celery.chord_unlock` task; its group is
  published unconfirmed (its default). amqptasks uses its Redis store and, as a second row,
  its SQLite store (compared with Celery's Redis backend). The Redis rows run again with
  n = 1,000 members (a worker start of their own): Celery's group and chord of 10,000 gave
  no result within their 310 s here, so the "≥ 2× Celery" targets are read at both sizes.
  Then a **fresh process** reads the group's N results back by id, one
  `AsyncResult(id).get()` at a time (p50/p99). Redis is the project's local one
  (`deploy/redis.sh`): database 14 for amqptasks, 15 for Celery, flushed before and after
  every run.
* **Scale** (`scale`, amqptasks only): for 1, 2 and 4 processes × 1, 10 and 100 queues, on a
  fresh vhost: P publisher processes `send_many` N/P no-ops round-robin over the queues,
  started together at a barrier (rate: every timed message over the span from the first
  start to the last end); then P workers (asyncio pool, -c 8, prefetch 256, each consuming
  every queue) drain them, timed between 10 % and 90 % executed from the execution counts
  (flushed every 50 ms: 100 queues' depths would take 100 declares per sample). One run per
  cell (`--scale-repeats`), N = 200,000.
* **Memory**: PSS (`Pss:` of `/proc/PID/smaps_rollup`) summed over the worker process and
  all its descendants — a page shared by a prefork parent and its children counts once,
  where summed RSS counted it once per process — idle = 2 s after it is consuming.
* **RSS over N tasks** (`rss`; N = 1,000,000, skipped by `--quick`): one worker per
  amqptasks pool (threads, asyncio, processes with 2 children) and each peer's first
  configuration is fed N no-ops while its tree's summed VmRSS is sampled about once a
  second; reported: RSS after warm-up (the first sample once N/10 ran), final RSS (all ran,
  1 s later), the growth between them (flat: ≤ 1 MiB), and PSS at the end.
* **Pending countdowns**: N tasks published with a 600 s countdown/delay while the worker
  runs (amqptasks: `send_many(..., countdown=600)`; the peers: a loop of their call, so
  the publish rate is not a like-for-like ratio); then, once the management stats settle,
  the worker's memory (PSS) and the unacked count over every queue of the vhost. amqptasks
  keeps them in the broker's delay queues; Celery holds ETA tasks unacked in the worker;
  Dramatiq holds up to its delay prefetch.
* Each figure is repeated (`--repeats`, default 3) and shown as median [min–max]; repeats
  run round-robin over the contenders and configurations, so a drift in background load
  does not favour anyone. A contender's "best" is its best configuration by median (marked
  `*` in the details). Every process the harness starts is stopped by its PID (SIGTERM,
  then SIGKILL after a grace period: 20 s, but 3 s for Celery, whose solo worker reacts to
  SIGTERM only ~9 s later and has settled everything by then); every wait is bounded.
* Before each group the harness waits (at most 90 s) until the local RabbitMQ node uses
  less than 15 % of a CPU: after a heavy group the node keeps compacting and collecting,
  and latency measured meanwhile measures that.
* Benchmarks are not tests: nothing here asserts a speed. On a 2-core machine the broker,
  the worker and the harness compete for the CPUs: keep other load off for real figures.
  The test suite (`tests/bench`) runs one-repeat `--quick` passes of amqptasks and raw pika
  (every group at tiny sizes, the scale group on a smaller grid) to keep the harness
  working: it checks that every figure was measured and reported, that the targets table
  says "not measured" for what was not, and that nothing was left running (nor in the
  harness's Redis database), never a speed.
"""


def _plot_lines(plots: list[Plot] | str | None, kind: str) -> list[str]:
    if not isinstance(plots, list):
        return []
    return [f"![{p.title}]({p.file})" for p in plots if p.file.endswith(f"-{kind}.png")] + [""]


def scale_rows(res: Results, figure: str) -> tuple[list[str], list[list[str]]]:
    """A processes × queues table of ``figure`` (median [min–max] per cell)."""
    header = ["processes", *(f"{q} queue(s)" for q in tg.SCALE_QUEUES)]
    rows = []
    for p in tg.SCALE_PROCESSES:
        row = [str(p)]
        for q in tg.SCALE_QUEUES:
            s = res.best(figure, "amqptasks", having=tg.scale_label(p, q))
            row.append(s.cell() if s else "not measured")
        rows.append(row)
    return header, rows


def rss_rows(res: Results) -> list[list[str]]:
    """One row per configuration of the N-task run: warm-up RSS, final, growth, PSS."""
    rows = []
    for s in sorted(
        (s for s in res.series.values() if s.figure == "rss_growth"),
        key=lambda s: (s.group != "amqptasks", s.framework, s.config),
    ):
        cells = [s.framework, s.config]
        for fig in ("rss_warm", "rss_final", "rss_growth", "rss_after"):
            other = res.series.get((fig, s.framework, s.config))
            cells.append(other.cell() if other else "n/a")
        rows.append(cells)
    return rows


def markdown(
    res: Results,
    info: dict[str, str],
    params: dict[str, Any],
    summary: str = "",
    plots: list[Plot] | str | None = None,
) -> str:
    quick = bool(params.get("quick"))
    when = info.get("date", "?")
    lines = [
        "# Benchmarks",
        "",
        "amqptasks against Celery and Dramatiq (and raw pika / aio-pika clients as the ceiling),",
        "all on the same local RabbitMQ in one run. This file is rewritten by `./dev bench`.",
        "",
        f"## Targets (run of {when}{', a quick run: orientation, not the claim' if quick else ''})",
        "",
        'Computed from the figures below; a figure that was not measured is "not measured",',
        "never met. Ratios are amqptasks ÷ reference (for group and chord times: reference ÷",
        "amqptasks, how many times as fast).",
        "",
        md_table(tg.HEADER, [t.row() for t in tg.targets(res)]),
        "",
    ]
    if isinstance(plots, str):
        lines += [plots, ""]
    lines += [METHOD, "## Latest run", ""]
    if quick:
        lines += [
            "> **Quick run** (`--quick`: small N, main configurations only, no RSS after 1M"
            " tasks) — it checks the harness; its figures are orientation, not the claim.",
            "",
        ]
    lines += [f"* **{k}**: {v}" for k, v in info.items()]
    shortest = res.shortest_window()
    lines += [
        "* **parameters**: " + ", ".join(f"{k}={v}" for k, v in params.items()),
        "* **shortest throughput window**: "
        + (f"{shortest:.2f} s" if shortest is not None else "n/a"),
        "",
    ]
    if summary:
        lines += [summary, ""]
    lines += [
        "### Summary (best configuration of each; ratios are amqptasks ÷ peer)",
        "",
        md_table(SUMMARY_HEADER, summary_rows(res)),
        "",
        *_plot_lines(plots, "latency"),
    ]
    if any(s.figure.startswith("scale_") for s in res.series.values()):
        lines += ["### Scale (amqptasks: processes × queues)", ""]
        for fig, what in (
            ("scale_consume", "Consume no-op (tasks/s)"),
            ("scale_publish", "Publish, send_many from P processes (msg/s)"),
        ):
            header, rows = scale_rows(res, fig)
            lines += [f"{what}:", "", md_table(header, rows), ""]
        lines += _plot_lines(plots, "scale")
    rss = rss_rows(res)
    if rss:
        n = params.get("RSS after tasks", "N")
        lines += [
            f"### Worker RSS over {n:,} tasks" if isinstance(n, int) else "### Worker RSS",
            "",
            md_table(
                [
                    "contender",
                    "configuration",
                    "RSS after warm-up (MiB)",
                    "final RSS (MiB)",
                    "growth (MiB)",
                    "final PSS (MiB)",
                ],
                rss,
            ),
            "",
            *_plot_lines(plots, "rss"),
        ]
    lines += [
        "### Earlier targets",
        "",
        md_table(["target", "measured", "status"], tg.earlier(res)),
        "",
    ]
    costs = cost_rows(res)
    if costs:
        lines += [
            "### What a feature costs (consume no-op, 1 worker process; best configuration of "
            "each against the same contender without it)",
            "",
            md_table(COST_HEADER, costs),
            "",
        ]
    lines += [
        "### Every configuration (`*` = that contender's best for the figure)",
        "",
        md_table(["figure", "contender", "configuration", "median [min–max]"], detail_rows(res)),
        "",
    ]
    errs = res.errors()
    if errs:
        lines += ["### Failed measurements", ""] + [f"* {e}" for e in errs] + [""]
    return "\n".join(lines)
