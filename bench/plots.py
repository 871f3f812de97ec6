"""PNG plots written next to the report: throughput by processes and queues (the scale
group), publish→start latency distributions (a CDF per contender's best configuration), and
worker RSS over the N-task run (one line per pool and peer).

matplotlib (Agg backend: no display) is a development dependency, not a runtime one: without
it the harness still measures and reports, and says "plots skipped: matplotlib missing".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .report import GROUPS, Results
from .targets import scale_label

SKIPPED = "plots skipped: matplotlib missing"


@dataclass(frozen=True)
class Plot:
    title: str
    file: str  # the PNG's name, next to the report


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write(res: Results, report: Path) -> list[Plot] | str:
    """Write every plot there is data for next to ``report`` (``<stem>-<kind>.png``); the
    plots written, or :data:`SKIPPED` without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return SKIPPED
    out: list[Plot] = []
    for kind, title, draw in (
        ("scale", "Throughput by processes and queues (scale group)", _scale),
        ("latency", "Publish→start latency, CDF (best configuration of each)", _latency),
        ("rss", "Worker RSS over the N-task run", _rss),
    ):
        fig = draw(plt, res)
        if fig is None:
            continue
        name = f"{report.stem}-{kind}.png"
        fig.savefig(report.parent / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
        out.append(Plot(title, name))
    return out


def _scale(plt: Any, res: Results) -> Any:
    cells = {
        (s.figure, s.config): s.median
        for s in res.series.values()
        if s.figure in ("scale_consume", "scale_publish") and s.median is not None
    }
    if not cells:
        return None
    procs = sorted({int(c.split()[0]) for _f, c in cells})
    queues = sorted({int(c.split("× ")[1].split()[0]) for _f, c in cells})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, figure, what in (
        (axes[0], "scale_consume", "consume (tasks/s)"),
        (axes[1], "scale_publish", "publish, send_many (msg/s)"),
    ):
        for q in queues:
            ys = [cells.get((figure, scale_label(p, q))) for p in procs]
            pts = [(p, y) for p, y in zip(procs, ys, strict=True) if y is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{q} queue(s)")
        ax.set_xticks(procs)
        ax.set_xlabel("amqptasks processes")
        ax.set_title(what)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
    return fig


def _latency(plt: Any, res: Results) -> Any:
    samples = res.samples.get("lat", {})
    who = {(s.group, s.framework) for s in res.series.values() if s.figure == "lat_p50"}
    lines = []
    for g, fw in sorted(who, key=lambda gf: (GROUPS.index(gf[0]), gf[1])):
        b = res.best("lat_p50", g, fw)
        vals = samples.get(f"{fw} | {b.config}") if b else None
        if b and vals:
            lines.append((f"{fw}: {b.config}", sorted(vals)))
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for label, vals in lines:
        n = len(vals)
        ax.plot(vals, [(i + 1) / n for i in range(n)], label=label[:70])
    top = max(v[int(len(v) * 0.995) - 1] for _l, v in lines)
    ax.set_xlim(0, top * 1.05)
    ax.set_xlabel("publish→start latency (ms)")
    ax.set_ylabel("fraction of samples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return fig


def _rss(plt: Any, res: Results) -> Any:
    samples = res.samples.get("rss", {})
    if not samples:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for label, pts in sorted(samples.items()):
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label[:70])
    ax.set_xlabel("tasks executed")
    ax.set_ylabel("RSS of the worker's processes (MiB)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig
