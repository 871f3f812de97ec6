"""Figures → median [min–max] per configuration, the best configuration per contender, ratios,
targets, and the markdown written to docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

GROUPS = ("amqptasks", "celery", "dramatiq", "raw")


@dataclass(frozen=True)
class Figure:
    key: str
    title: str
    unit: str
    higher_is_better: bool
    fmt: str = "{:,.0f}"
    #: The figure the peers' values come from when they have no configuration of this one
    #: (amqptasks' SQLite store is compared with Celery's redis backend).
    versus: str = ""
    #: The figure this one is a cost against, per contender (a result store vs no results).
    baseline: str = ""


FIGURES = [
    Figure("consume1", "Consume no-op, 1 worker process", "tasks/s", True),
    Figure("consume2", "Consume no-op, 2 worker processes", "tasks/s", True),
    Figure("pub_loop_confirmed", "Publish, confirmed, one caller in a loop", "msg/s", True),
    Figure("pub_pipelined", "Publish, confirmed, pipelined / bulk API", "msg/s", True),
    Figure("pub_loop_unconfirmed", "Publish, unconfirmed, one caller in a loop", "msg/s", True),
    Figure("lat_p50", "Publish→start latency p50 (light load)", "ms", False, "{:.2f}"),
    Figure("lat_p99", "Publish→start latency p99 (light load)", "ms", False, "{:.2f}"),
    Figure("rpc_p50", "delay().get() round trip p50", "ms", False, "{:.2f}"),
    Figure("rpc_p99", "delay().get() round trip p99", "ms", False, "{:.2f}"),
    Figure("rpc_rate", "delay().get() sequential round trips", "1/s", True),
    Figure("rss_idle", "Worker RSS, idle", "MiB", False, "{:.1f}"),
    Figure("rss_after", "Worker RSS after N tasks", "MiB", False, "{:.1f}"),
    Figure("cd_rss", "Pending countdowns: worker RSS", "MiB", False, "{:.1f}"),
    Figure("cd_unacked", "Pending countdowns: unacked deliveries", "msgs", False),
    Figure("cd_rate", "Pending countdowns: publish rate", "msg/s", True),
    Figure(
        "cluster_publish", "Publish, confirmed, pipelined: single node vs cluster", "msg/s", True
    ),
    Figure("cluster_consume", "Consume no-op, 2 workers: single node vs cluster", "tasks/s", True),
    Figure("rc_none", "Consume no-op with results: none (ignore_result)", "tasks/s", True),
    Figure(
        "rc_rpc",
        "Consume no-op with results: rpc://, no reply wanted",
        "tasks/s",
        True,
        baseline="rc_none",
    ),
    Figure(
        "rc_sqlite",
        "Consume no-op with results: SQLite store (Celery: its Redis backend)",
        "tasks/s",
        True,
        versus="rc_redis",
        baseline="rc_none",
    ),
    Figure(
        "rc_redis",
        "Consume no-op with results: Redis store",
        "tasks/s",
        True,
        baseline="rc_none",
    ),
    Figure("wf_group_redis", "Group of N no-ops → all results, Redis store", "s", False, "{:.2f}"),
    Figure(
        "wf_group_sqlite",
        "Group of N no-ops → all results, SQLite store (Celery: Redis)",
        "s",
        False,
        "{:.2f}",
        versus="wf_group_redis",
    ),
    Figure("wf_chord_redis", "Chord of N no-ops → body result, Redis store", "s", False, "{:.2f}"),
    Figure(
        "wf_chord_sqlite",
        "Chord of N no-ops → body result, SQLite store (Celery: Redis)",
        "s",
        False,
        "{:.2f}",
        versus="wf_chord_redis",
    ),
    Figure(
        "read_p50_redis",
        "AsyncResult(id).get() by id, other process, p50, Redis",
        "ms",
        False,
        "{:.3f}",
    ),
    Figure(
        "read_p99_redis",
        "AsyncResult(id).get() by id, other process, p99, Redis",
        "ms",
        False,
        "{:.3f}",
    ),
    Figure(
        "read_p50_sqlite",
        "AsyncResult(id).get() by id, other process, p50, SQLite (Celery: Redis)",
        "ms",
        False,
        "{:.3f}",
        versus="read_p50_redis",
    ),
    Figure(
        "read_p99_sqlite",
        "AsyncResult(id).get() by id, other process, p99, SQLite (Celery: Redis)",
        "ms",
        False,
        "{:.3f}",
        versus="read_p99_redis",
    ),
]
BY_KEY = {f.key: f for f in FIGURES}


@dataclass
class Series:
    figure: str
    framework: str
    group: str
    config: str
    values: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    def cell(self) -> str:
        f = BY_KEY[self.figure]
        if not self.values:
            return "failed" if self.errors else "n/a"
        med = f.fmt.format(self.median)
        if len(self.values) == 1:
            return f"{med} (1 run)"
        return f"{med} [{f.fmt.format(min(self.values))}–{f.fmt.format(max(self.values))}]"


class Results:
    def __init__(self) -> None:
        self.series: dict[tuple[str, str, str], Series] = {}
        self.params: dict[str, Any] = {}

    def _get(self, figure: str, framework: str, group: str, config: str, note: str) -> Series:
        key = (figure, framework, config)
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = Series(figure, framework, group, config, note=note)
        return s

    def add(
        self, figure: str, framework: str, group: str, config: str, value: float, note: str = ""
    ) -> None:
        self._get(figure, framework, group, config, note).values.append(value)

    def fail(
        self, figure: str, framework: str, group: str, config: str, error: str, note: str = ""
    ) -> None:
        self._get(figure, framework, group, config, note).errors.append(error)

    def best(
        self, figure: str, group: str, framework: str | None = None, plain: bool = False
    ) -> Series | None:
        """The best configuration of ``group`` (or of one ``framework``; ``plain``: leaving
        out configurations labelled "batched") by median."""
        f = BY_KEY[figure]
        cands = [
            s
            for s in self.series.values()
            if s.figure == figure
            and s.group == group
            and s.values
            and (framework is None or s.framework == framework)
            and not (plain and "batched" in s.config)
        ]
        if not cands:
            return None
        key = (lambda s: s.median) if f.higher_is_better else (lambda s: -s.median)
        return max(cands, key=key)

    def peer_best(
        self, figure: str, group: str, framework: str | None = None, plain: bool = False
    ) -> Series | None:
        """A peer's best for ``figure``, or for the figure it is compared with (``versus``)
        when the peer has no configuration of this one."""
        found = self.best(figure, group, framework, plain)
        versus = BY_KEY[figure].versus
        if found is None and versus and group != "amqptasks":
            found = self.best(versus, group, framework, plain)
        return found

    def ratio(
        self, figure: str, group: str, framework: str | None = None, plain: bool = False
    ) -> float | None:
        a = self.best(figure, "amqptasks")
        b = self.peer_best(figure, group, framework, plain)
        if a is None or b is None or not b.median:
            return None
        assert a.median is not None
        return a.median / b.median

    def to_json(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "series": [
                {
                    "figure": s.figure,
                    "framework": s.framework,
                    "group": s.group,
                    "config": s.config,
                    "values": s.values,
                    "errors": s.errors,
                    "note": s.note,
                }
                for s in self.series.values()
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Results:
        res = cls()
        res.params = dict(data.get("params", {}))
        for d in data["series"]:
            s = Series(d["figure"], d["framework"], d["group"], d["config"], note=d["note"])
            s.values = list(d["values"])
            s.errors = list(d["errors"])
            res.series[(s.figure, s.framework, s.config)] = s
        return res

    def errors(self) -> list[str]:
        return [
            f"{s.framework} {s.figure} [{s.config}]: {e.splitlines()[0] if e else e}"
            for s in self.series.values()
            for e in s.errors
        ]


def _ratio_text(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}×"


def summary_rows(res: Results) -> list[list[str]]:
    rows = []
    for f in FIGURES:
        if not any(s.figure == f.key for s in res.series.values()):
            continue
        cells = [f"{f.title} ({f.unit}, {'higher' if f.higher_is_better else 'lower'} is better)"]
        for g in GROUPS:
            b = res.best(f.key, g) if g == "amqptasks" else res.peer_best(f.key, g)
            cells.append(b.cell() if b else "n/a")
        cells += [_ratio_text(res.ratio(f.key, g)) for g in ("celery", "dramatiq", "raw")]
        rows.append(cells)
    # The publish target: amqptasks' confirmed pipelined vs the peers' unconfirmed loop.
    a = res.best("pub_pipelined", "amqptasks")
    if a is not None and a.median:
        cells = ["amqptasks pipelined (confirmed) vs peers' unconfirmed loop (msg/s)", a.cell()]
        ratios = []
        for g in ("celery", "dramatiq"):
            b = res.best("pub_loop_unconfirmed", g)
            cells.append(b.cell() if b else "n/a")
            ratios.append(_ratio_text(a.median / b.median) if b and b.median else "n/a")
        r = res.best("pub_pipelined", "raw")
        cells.append(r.cell() if r else "n/a")
        cells += [*ratios, _ratio_text(a.median / r.median) if r and r.median else "n/a"]
        rows.append(cells)
    return rows


SUMMARY_HEADER = [
    "figure",
    "amqptasks (best)",
    "Celery (best)",
    "Dramatiq (best)",
    "raw ceiling (best)",
    "amq / Celery",
    "amq / Dramatiq",
    "amq / raw",
]


def detail_rows(res: Results) -> list[list[str]]:
    order = {f.key: i for i, f in enumerate(FIGURES)}
    gorder = {g: i for i, g in enumerate(GROUPS)}
    rows = []
    for s in sorted(
        res.series.values(), key=lambda s: (order[s.figure], gorder[s.group], s.framework)
    ):
        f = BY_KEY[s.figure]
        best = res.best(s.figure, s.group)
        mark = " *" if best is s else ""
        rows.append(
            [
                f"{f.title} ({f.unit})",
                s.framework,
                s.config + (f" — {s.note}" if s.note else ""),
                s.cell() + mark,
            ]
        )
    return rows


def cost_rows(res: Results) -> list[list[str]]:
    """Each contender's figure with a ``baseline`` against its own baseline: what a result
    store costs in no-op throughput (best configuration of each, by median)."""
    rows = []
    for f in FIGURES:
        if not f.baseline:
            continue
        for g in GROUPS:
            s = res.best(f.key, g)
            base = res.best(f.baseline, g)
            if s is None or base is None or not base.median or s.median is None:
                continue
            r = s.median / base.median
            rows.append(
                [
                    f.title,
                    s.framework,
                    s.cell(),
                    base.cell(),
                    _ratio_text(r),
                    f"{(1 - r) * 100:.0f} %" if f.higher_is_better else "n/a",
                ]
            )
    return rows


COST_HEADER = [
    "figure",
    "contender",
    "median [min–max]",
    "without results",
    "ratio",
    "throughput lost",
]


def targets(res: Results) -> list[tuple[str, str, str]]:
    """(target, measured, met?) — informational; benchmarks never fail a run."""
    out = []

    def check(name: str, value: float | None, ok: Any, fmt: str = "{:.2f}×") -> None:
        if value is None:
            out.append((name, "n/a", "n/a"))
        else:
            out.append((name, fmt.format(value), "yes" if ok(value) else "NO"))

    for fig, procs in (("consume1", 1), ("consume2", 2)):
        check(
            f"consume ({procs} proc) ≥ 3× Celery best", res.ratio(fig, "celery"), lambda r: r >= 3
        )
        check(
            f"consume ({procs} proc) ≥ 1.5× Dramatiq best",
            res.ratio(fig, "dramatiq"),
            lambda r: r >= 1.5,
        )
        check(
            f"consume ({procs} proc) ≥ 0.8× raw pika (one ack per message)",
            res.ratio(fig, "raw", "raw-pika", plain=True),
            lambda r: r >= 0.8,
        )
    a = res.best("consume1", "amqptasks")
    check(
        "consume (1 proc) ≥ 8,000 tasks/s",
        a.median if a else None,
        lambda v: v >= 8000,
        "{:,.0f} tasks/s",
    )
    a = res.best("pub_pipelined", "amqptasks")
    c = res.best("pub_loop_unconfirmed", "celery")
    check(
        "confirmed pipelined publish ≥ 2.4× Celery unconfirmed",
        a.median / c.median if a and c and a.median and c.median else None,
        lambda r: r >= 2.4,
    )
    check(
        "publish→start p50 ≤ Dramatiq's (ratio ≤ 1)",
        res.ratio("lat_p50", "dramatiq"),
        lambda r: r <= 1,
    )
    # Issue 10: workflows ≥ 2× Celery (its redis backend); a store costs ≤ 30 % of the no-op
    # consume rate. Times: Celery's time ÷ ours is how many times faster we are.
    for fig, what in (
        ("wf_group_redis", "group of N (Redis store)"),
        ("wf_group_sqlite", "group of N (SQLite store)"),
        ("wf_chord_redis", "chord of N (Redis store)"),
        ("wf_chord_sqlite", "chord of N (SQLite store)"),
    ):
        r = res.ratio(fig, "celery")
        check(f"{what} ≥ 2× as fast as Celery's redis backend", 1 / r if r else None, _ge(2))
    for fig, what in (("rc_sqlite", "SQLite"), ("rc_redis", "Redis")):
        s = res.best(fig, "amqptasks")
        base = res.best("rc_none", "amqptasks")
        lost = (
            1 - s.median / base.median
            if s is not None and base is not None and s.median and base.median
            else None
        )
        check(
            f"the {what} store costs ≤ 30 % of no-op consume throughput",
            lost,
            lambda v: v <= 0.30,
            "{:.0%} lost",
        )
    return out


def _ge(limit: float) -> Any:
    return lambda v: v >= limit


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(c: str) -> str:
        return str(c).replace("|", "\\|")

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def machine(overview: dict[str, Any], versions: dict[str, dict[str, str]]) -> dict[str, str]:
    cpu = "?"
    mem = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                    break
    except OSError:
        pass
    try:
        ncpu = len(os.sched_getaffinity(0))
    except AttributeError:
        ncpu = os.cpu_count() or 0
    libs = "; ".join(
        f"{fw}: " + ", ".join(f"{k} {v}" for k, v in vs.items()) for fw, vs in versions.items()
    )
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": f"{ncpu} (nproc)",
        "cpu": cpu,
        "memory": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "rabbitmq": f"{overview.get('rabbitmq_version', '?')} "
        f"(Erlang {overview.get('erlang_version', '?')})",
        "libraries": libs,
    }


METHOD = """\
## How to run

```sh
./dev bench            # full run (tens of minutes): writes this file
./dev bench --quick    # small N, main configurations, 3 repeats, no 1M-task RSS: minutes
python -m bench --help # --only, --repeats, --out, --no-peers, --frameworks, sizes
python -m bench --only results,workflows   # results and workflows vs Celery (Redis)
python -m bench.profile worker --pool asyncio   # py-spy profile of a worker draining 200k
```

The harness creates the peers' virtualenvs itself (`.amqptasks/bench/venv-celery`,
`.amqptasks/bench/venv-dramatiq`: `python3 -m venv` + `pip install 'celery[redis]'` /
`pip install 'dramatiq[rabbitmq]'`, the latest releases; reused when present) and runs
everything against the project's local RabbitMQ (and, for the results and workflows
groups, its local Redis; `./dev bench` starts both), each measurement group in its own
vhost, created and deleted through the management API.

## Method

* **Same settings for all**: one durable queue, persistent messages (delivery mode 2), JSON
  bodies, worker logging at WARNING, prefetch 256 per worker process unless a configuration
  says otherwise, acks after the task ran unless a configuration says "early ack".
* **Consume**: N messages are pre-filled — copies of one message published through the
  framework's own API (its id replaced per copy), so every worker reads exactly what its
  framework would have sent — then the worker is started and the queue depth is sampled by
  passive `queue.declare` every 10 ms. Throughput is measured between two depth marks
  (after `max(10 %, 2 × prefetch)` messages are gone, until 10 % remain; crossing times
  interpolated between samples), which excludes start-up, warm-up and the tail. When that
  window is shorter than the target (3 s; 0.6 s with `--quick`), the first run only
  calibrates N for the counted runs. The no-op task counts its executions (a locked increment,
  flushed to a file by a thread every 0.2 s) and the run is only accepted when exactly N
  ran and the dead-letter queue is empty.
* **Raw ceiling**: raw pika (`BlockingConnection`, one `basic_ack` per message — the issue's
  reference consumer, used for the "≥ 80 % of raw pika" target) and, as the honest ceiling
  for a worker that batches its acks, raw pika acking with `multiple=True`; raw aio-pika too.
* **Publish**: one client process per run, the framework's own API, warm-up calls excluded.
  "Confirmed" waits for the broker's `basic.ack`; amqptasks' pipelined publish keeps up to
  1,000 confirms outstanding (`App.prepare` + `publisher.publish_nowait`) and waits for all.
* **Publish→start latency**: one message every 5 ms through the framework's API, carrying
  `time.time()` at the call; the task records `time.time() - sent` first thing. 50 warm-up
  messages excluded.
* **`delay().get()`**: sequential round trips (amqptasks: direct reply-to; Celery: the
  `rpc://` backend; Dramatiq: n/a, its results need Redis or Memcached).
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
  its SQLite store (compared with Celery's Redis backend). Then a **fresh process** reads
  the group's N results back by id, one `AsyncResult(id).get()` at a time (p50/p99). Redis
  is the project's local one (`deploy/redis.sh`): database 14 for amqptasks, 15 for Celery,
  flushed before and after every run.
* **RSS**: VmRSS from `/proc` of the worker process and all its descendants (Celery prefork,
  Dramatiq's supervisor and worker processes are summed), idle = 2 s after it is consuming.
* **Pending countdowns**: N tasks published with a 600 s countdown/delay while the worker
  runs; then, once the management stats settle, the worker's RSS and the unacked count
  over every queue of the vhost. amqptasks keeps them in the broker's delay queues; Celery
  holds ETA tasks unacked in the worker; Dramatiq holds up to its delay prefetch.
* Each figure is repeated (`--repeats`, default 3) and shown as median [min–max]; a
  contender's "best" is its best configuration by median (marked `*` in the details). Every
  process the harness starts is stopped by its PID (SIGTERM, then SIGKILL after a grace
  period: 20 s, but 3 s for Celery, whose solo worker reacts to SIGTERM only ~9 s later and
  has settled everything by then); every wait is bounded.
* Before each group the harness waits (at most 90 s) until the local RabbitMQ node uses
  less than 15 % of a CPU: after a heavy group the node keeps compacting and collecting,
  and latency measured meanwhile measures that.
* Benchmarks are not tests: nothing here asserts a speed. On a 2-core machine the broker,
  the worker and the harness compete for the CPUs: keep other load off for real figures.
  The test suite (`tests/bench`) runs a one-repeat `--quick` pass of amqptasks and raw pika,
  and one of the results and workflows groups (amqptasks, every store), to keep the harness
  working: it checks that every figure was measured and reported and that nothing was left
  running (nor in the harness's Redis database), never a speed.
"""


def markdown(res: Results, info: dict[str, str], params: dict[str, Any], summary: str = "") -> str:
    lines = [
        "# Benchmarks",
        "",
        "amqptasks against Celery and Dramatiq (and raw pika / aio-pika clients as the ceiling),",
        "all on the same local RabbitMQ in one run. This file is rewritten by `./dev bench`.",
        "",
        METHOD,
        "## Latest run",
        "",
    ]
    if params.get("quick"):
        lines += [
            "> **Quick run** (`--quick`: small N, main configurations only, no RSS after 1M"
            " tasks) — it checks the harness; its figures are orientation, not the claim.",
            "",
        ]
    lines += [f"* **{k}**: {v}" for k, v in info.items()]
    lines += [
        "* **parameters**: " + ", ".join(f"{k}={v}" for k, v in params.items()),
        "",
    ]
    if summary:
        lines += [summary, ""]
    lines += [
        "### Summary (best configuration of each; ratios are amqptasks ÷ peer)",
        "",
        md_table(SUMMARY_HEADER, summary_rows(res)),
        "",
        "### Targets (informational)",
        "",
        md_table(["target", "measured", "met"], [list(t) for t in targets(res)]),
        "",
    ]
    costs = cost_rows(res)
    if costs:
        lines += [
            "### What results cost (consume no-op, 1 worker process; best configuration of each)",
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
