"""Figures → median [min–max] per configuration, the best configuration per contender, ratios,
and the tables of the report (bench/document.py puts them into docs/benchmarks.md,
bench/targets.py reads the targets off them)."""

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
    #: Whether the summary sets peers against it (False: amqptasks-only figures, or ones
    #: whose contenders do different things, e.g. bulk against a loop).
    compare: bool = True


FIGURES = [
    Figure("consume1", "Consume no-op, 1 worker process", "tasks/s", True),
    Figure("consume2", "Consume no-op, 2 worker processes", "tasks/s", True),
    Figure(
        "consume1_events",
        "Consume no-op, 1 worker process, events on",
        "tasks/s",
        True,
        baseline="consume1",
        compare=False,
    ),
    Figure(
        "consume1_metrics",
        "Consume no-op, 1 worker process, metrics on",
        "tasks/s",
        True,
        baseline="consume1",
        compare=False,
    ),
    Figure(
        "consume1_same",
        "Consume no-op, 1 process, amqptasks' messages (raw pika ceiling)",
        "tasks/s",
        True,
        compare=False,
    ),
    Figure("pub_loop_confirmed", "Publish, confirmed, one caller in a loop", "msg/s", True),
    Figure(
        "pub_bulk",
        "Publish, confirmed, bulk (amqptasks: send_many; raw: pipelined confirms)",
        "msg/s",
        True,
    ),
    Figure("pub_loop_unconfirmed", "Publish, unconfirmed, one caller in a loop", "msg/s", True),
    Figure("lat_p50", "Publish→start latency p50 (light load)", "ms", False, "{:.2f}"),
    Figure("lat_p99", "Publish→start latency p99 (light load)", "ms", False, "{:.2f}"),
    Figure("rpc_p50", "delay().get() round trip p50", "ms", False, "{:.2f}"),
    Figure("rpc_p99", "delay().get() round trip p99", "ms", False, "{:.2f}"),
    Figure("rpc_rate", "delay().get() sequential round trips", "1/s", True),
    Figure("rss_idle", "Worker memory, idle (PSS, all its processes)", "MiB", False, "{:.1f}"),
    Figure(
        "rss_after",
        "Worker memory after N tasks (PSS, all its processes)",
        "MiB",
        False,
        "{:.1f}",
    ),
    # Summed VmRSS: for the growth of one worker over the run; PSS is what compares.
    Figure(
        "rss_warm",
        "Worker RSS after warm-up (N/10 tasks)",
        "MiB",
        False,
        "{:.1f}",
        compare=False,
    ),
    Figure("rss_final", "Worker RSS after N tasks", "MiB", False, "{:.1f}", compare=False),
    Figure("rss_growth", "Worker RSS growth after warm-up", "MiB", False, "{:+.1f}", compare=False),
    Figure("cd_rss", "Pending countdowns: worker memory (PSS)", "MiB", False, "{:.1f}"),
    Figure("cd_unacked", "Pending countdowns: unacked deliveries", "msgs", False),
    Figure(
        "cd_rate",
        "Pending countdowns: publish rate (amqptasks: send_many; peers: a loop)",
        "msg/s",
        True,
        compare=False,
    ),
    Figure("scale_consume", "Scale: consume no-op", "tasks/s", True, compare=False),
    Figure("scale_publish", "Scale: publish, send_many", "msg/s", True, compare=False),
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
        "wf_group_redis_small",
        "Group of n no-ops → all results, Redis store (n: where Celery finishes)",
        "s",
        False,
        "{:.2f}",
    ),
    Figure(
        "wf_chord_redis_small",
        "Chord of n no-ops → body result, Redis store (n: where Celery finishes)",
        "s",
        False,
        "{:.2f}",
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
    #: Seconds each counted value was measured over (throughput figures).
    windows: list[float] = field(default_factory=list)

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
        #: Raw samples for the plots, by kind ("lat": latencies in ms; "rss": [tasks, MiB]
        #: pairs), then "framework | configuration"; saved with the run so --render replots.
        self.samples: dict[str, dict[str, list[Any]]] = {}

    def _get(self, figure: str, framework: str, group: str, config: str, note: str) -> Series:
        key = (figure, framework, config)
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = Series(figure, framework, group, config, note=note)
        return s

    def add(
        self,
        figure: str,
        framework: str,
        group: str,
        config: str,
        value: float,
        note: str = "",
        *,
        window: float | None = None,
    ) -> None:
        s = self._get(figure, framework, group, config, note)
        s.values.append(value)
        if window is not None:
            s.windows.append(window)

    def add_samples(self, kind: str, framework: str, config: str, values: list[Any]) -> None:
        self.samples.setdefault(kind, {}).setdefault(f"{framework} | {config}", []).extend(values)

    def shortest_window(self) -> float | None:
        """The shortest window any counted throughput value was measured over."""
        found = [w for s in self.series.values() for w in s.windows]
        return min(found) if found else None

    def fail(
        self, figure: str, framework: str, group: str, config: str, error: str, note: str = ""
    ) -> None:
        self._get(figure, framework, group, config, note).errors.append(error)

    def best(
        self,
        figure: str,
        group: str,
        framework: str | None = None,
        plain: bool = False,
        having: str = "",
    ) -> Series | None:
        """The best configuration of ``group`` (or of one ``framework``; ``plain``: leaving
        out configurations labelled "batched"; ``having``: only configurations whose label
        contains it) by median."""
        f = BY_KEY[figure]
        cands = [
            s
            for s in self.series.values()
            if s.figure == figure
            and s.group == group
            and s.values
            and (framework is None or s.framework == framework)
            and not (plain and "batched" in s.config)
            and having in s.config
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
                    "windows": s.windows,
                }
                for s in self.series.values()
            ],
            "samples": self.samples,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Results:
        res = cls()
        res.params = dict(data.get("params", {}))
        for d in data["series"]:
            if d["figure"] not in BY_KEY:  # a figure an older harness had (pub_pipelined)
                continue
            s = Series(d["figure"], d["framework"], d["group"], d["config"], note=d["note"])
            s.values = list(d["values"])
            s.errors = list(d["errors"])
            s.windows = list(d.get("windows", []))
            res.series[(s.figure, s.framework, s.config)] = s
        res.samples = dict(data.get("samples", {}))
        return res

    def errors(self) -> list[str]:
        return [
            f"{s.framework} {s.figure} [{s.config}]: {e.splitlines()[0] if e else e}"
            for s in self.series.values()
            for e in s.errors
        ]


def _ratio_text(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}×"


#: Figures with a table of their own (bench/scale.py), not rows of the summary.
OWN_TABLE = ("scale_consume", "scale_publish")


def summary_rows(res: Results) -> list[list[str]]:
    """Best of each contender per figure, and amqptasks ÷ peer where the figure compares
    like with like (bulk with bulk, a loop with a loop)."""
    rows = []
    for f in FIGURES:
        if f.key in OWN_TABLE or not any(s.figure == f.key for s in res.series.values()):
            continue
        cells = [f"{f.title} ({f.unit}, {'higher' if f.higher_is_better else 'lower'} is better)"]
        for g in GROUPS:
            b = res.best(f.key, g) if g == "amqptasks" else res.peer_best(f.key, g)
            cells.append(b.cell() if b else "n/a")
        cells += [
            _ratio_text(res.ratio(f.key, g)) if f.compare else "—"
            for g in ("celery", "dramatiq", "raw")
        ]
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
    "without it",
    "ratio",
    "throughput lost",
]


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
