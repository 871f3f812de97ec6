"""The targets a benchmark run is read against, computed from the measured figures.

Each target is a row: what it asks, amqptasks' figure, the reference it is set against, the
ratio, and its status — ``met`` / ``not met`` when both figures were measured, ``reported``
for a figure the target asks to print without a threshold, and ``not measured`` whenever a
figure it needs is missing (a missing figure is never a pass). Benchmarks never fail a run:
this is informational, the run's exit status only says whether every measurement was taken.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .report import BY_KEY, Results, Series

MET = "met"
NOT_MET = "not met"
NOT_MEASURED = "not measured"
REPORTED = "reported"

#: RSS "flat" after warm-up: growth within this many MiB (allocator and page-cache jitter of
#: a Python process; a leak of one object per task grows by tens of MiB over 1M tasks).
FLAT_MIB = 1.0
#: The pools the RSS-over-N-tasks target is asked for.
POOLS = ("threads", "asyncio", "processes")
#: The scale group's grid, as the issue asks for it.
SCALE_PROCESSES = (1, 2, 4)
SCALE_QUEUES = (1, 10, 100)

HEADER = ["target", "amqptasks", "reference", "ratio", "status"]
#: The workflow figures' keys and how a target names them.
_WORKFLOWS = (("group", "Group"), ("chord", "Chord"))


@dataclass(frozen=True)
class Target:
    name: str
    ours: str
    reference: str
    ratio: str
    status: str

    def row(self) -> list[str]:
        return [self.name, self.ours, self.reference, self.ratio, self.status]


def _value(s: Series | None) -> str:
    """``1.23 ms (threads pool, ...)``: a best figure with its unit and configuration."""
    if s is None or s.median is None:
        return NOT_MEASURED
    f = BY_KEY[s.figure]
    who = s.framework if s.group != "amqptasks" else ""
    where = f"{who}: {s.config}" if who else s.config
    return f"{f.fmt.format(s.median)} {f.unit} ({where})"


def _ratio(
    name: str,
    ours: Series | None,
    ref: Series | None,
    ok: Callable[[float], bool],
    invert: bool = False,
) -> Target:
    """Target on ``ours ÷ ref`` (``invert``: ``ref ÷ ours``, how many times as fast a time
    is)."""
    if ours is None or ref is None or not ours.median or not ref.median:
        return Target(name, _value(ours), _value(ref), "—", NOT_MEASURED)
    r = ref.median / ours.median if invert else ours.median / ref.median
    return Target(name, _value(ours), _value(ref), f"{r:.2f}×", MET if ok(r) else NOT_MET)


def targets(res: Results) -> list[Target]:
    """Issue 14's targets, in its order."""
    a = "amqptasks"
    out = [
        _ratio(
            "Publish→start latency p50 ≤ 0.9× Dramatiq's best",
            res.best("lat_p50", a),
            res.best("lat_p50", "dramatiq"),
            lambda r: r <= 0.9,
        ),
        _ratio(
            "Publish→start latency p99 ≤ 1.0× Dramatiq's best",
            res.best("lat_p99", a),
            res.best("lat_p99", "dramatiq"),
            lambda r: r <= 1.0,
        ),
        _ratio(
            "delay().get() p50 ≤ 1.3× raw pika's round trip",
            res.best("rpc_p50", a),
            res.best("rpc_p50", "raw", "raw-pika"),
            lambda r: r <= 1.3,
        ),
        _ratio(
            "Confirmed single-caller .delay() loop ≥ 1.0× raw pika's confirmed loop",
            res.best("pub_loop_confirmed", a),
            res.best("pub_loop_confirmed", "raw", "raw-pika"),
            lambda r: r >= 1.0,
        ),
        _ratio(
            "Consume no-op, 1 process ≥ 0.7× raw pika with batched acks",
            res.best("consume1", a),
            res.best("consume1", "raw", "raw-pika", having="batched"),
            lambda r: r >= 0.7,
        ),
        _ratio(
            "Consume no-op, 1 process ≥ 0.7× raw pika with batched acks, same messages",
            res.best("consume1", a),
            res.best("consume1_same", "raw", "raw-pika"),
            lambda r: r >= 0.7,
        ),
        _events_cost(res),
        *(
            _ratio(
                f"{what} of {size} no-ops ≥ 2× as fast as Celery (its Redis backend)",
                res.best(f"wf_{key}_redis{suffix}", a),
                res.best(f"wf_{key}_redis{suffix}", "celery"),
                lambda r: r >= 2,
                invert=True,
            )
            # The main size, then the small one: Celery gave no result for 10,000 within
            # its 310 s, so the small size is where its ratio can be measured at all.
            for suffix, size in (("", "N"), ("_small", "n"))
            for key, what in _WORKFLOWS
        ),
    ]
    for store in ("redis", "sqlite"):
        t = _ratio(
            f"AsyncResult(id) read latency p50, {'Redis' if store == 'redis' else 'SQLite'} store",
            res.best(f"read_p50_{store}", a),
            res.peer_best(f"read_p50_{store}", "celery"),
            lambda _r: True,
        )
        if res.best(f"read_p50_{store}", a) is not None:  # printed, no threshold
            t = Target(t.name, t.ours, t.reference, t.ratio, REPORTED)
        out.append(t)
    out += [_rss_flat(res, pool) for pool in POOLS]
    out.append(_scale(res))
    return out


def _events_cost(res: Results) -> Target:
    name = "Events on cost ≤ 10 % of no-op throughput (1 process)"
    on = res.best("consume1_events", "amqptasks")
    off = res.best("consume1", "amqptasks")
    if on is None or off is None or not on.median or not off.median:
        return Target(name, _value(on), _value(off), "—", NOT_MEASURED)
    lost = 1 - on.median / off.median
    ours = f"{_value(on)}; {lost:.0%} lost"
    status = MET if lost <= 0.10 else NOT_MET
    return Target(name, ours, _value(off), f"{on.median / off.median:.2f}×", status)


def _rss_flat(res: Results, pool: str) -> Target:
    name = f"N tasks through one worker, {pool} pool: RSS flat after warm-up (≤ {FLAT_MIB} MiB)"
    having = f"{pool} pool"
    growth = res.best("rss_growth", "amqptasks", having=having)
    warm = res.best("rss_warm", "amqptasks", having=having)
    final = res.best("rss_final", "amqptasks", having=having)
    if growth is None or growth.median is None or warm is None or final is None:
        return Target(name, NOT_MEASURED, "—", "—", NOT_MEASURED)
    assert warm.median is not None and final.median is not None
    ours = f"warm-up {warm.median:.1f} MiB → final {final.median:.1f} MiB: {growth.median:+.1f} MiB"
    return Target(name, ours, "—", "—", MET if growth.median <= FLAT_MIB else NOT_MET)


def _scale(res: Results) -> Target:
    name = (
        "Scale: consume and publish rates, "
        f"{'/'.join(map(str, SCALE_PROCESSES))} processes × "
        f"{'/'.join(map(str, SCALE_QUEUES))} queues"
    )
    wanted = 2 * len(SCALE_PROCESSES) * len(SCALE_QUEUES)
    got = sum(
        1
        for fig in ("scale_consume", "scale_publish")
        for p in SCALE_PROCESSES
        for q in SCALE_QUEUES
        if res.best(fig, "amqptasks", having=scale_label(p, q)) is not None
    )
    if got == 0:
        return Target(name, NOT_MEASURED, "—", "—", NOT_MEASURED)
    status = REPORTED if got == wanted else f"{NOT_MEASURED} ({wanted - got} of {wanted} cells)"
    return Target(name, f"{got} of {wanted} cells (table below)", "—", "—", status)


def scale_label(processes: int, queues: int) -> str:
    """The configuration label a scale cell is recorded under."""
    return f"{processes} process(es) × {queues} queue(s)"


# -- the earlier issues' targets ---------------------------------------------------------------


def earlier(res: Results) -> list[list[str]]:
    """(target, measured, status) of the targets set before issue 14 that still compare like
    with like (consume against the peers; what a result store costs)."""
    out: list[list[str]] = []

    def check(name: str, value: float | None, ok: Callable[[float], bool], fmt: str) -> None:
        if value is None:
            out.append([name, NOT_MEASURED, NOT_MEASURED])
        else:
            out.append([name, fmt.format(value), MET if ok(value) else NOT_MET])

    for fig, procs in (("consume1", 1), ("consume2", 2)):
        check(
            f"consume ({procs} proc) ≥ 3× Celery best",
            res.ratio(fig, "celery"),
            lambda r: r >= 3,
            "{:.2f}×",
        )
        check(
            f"consume ({procs} proc) ≥ 1.5× Dramatiq best",
            res.ratio(fig, "dramatiq"),
            lambda r: r >= 1.5,
            "{:.2f}×",
        )
    a = res.best("consume1", "amqptasks")
    check(
        "consume (1 proc) ≥ 8,000 tasks/s",
        a.median if a else None,
        lambda v: v >= 8000,
        "{:,.0f} tasks/s",
    )
    for fig, what in (
        ("wf_group_sqlite", "group of N (SQLite store)"),
        ("wf_chord_sqlite", "chord of N (SQLite store)"),
    ):
        r = res.ratio(fig, "celery")
        check(
            f"{what} ≥ 2× as fast as Celery's redis backend",
            1 / r if r else None,
            lambda v: v >= 2,
            "{:.2f}×",
        )
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
