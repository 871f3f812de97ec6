"""The benchmark harness still works end to end (issue: CI keeps `bench --quick` alive).

This checks that a quick run measures, reports and cleans up — never how fast anything is:
speed is the benchmark's business (docs/benchmarks.md), not a test's. Peers (Celery,
Dramatiq) are left out: their virtualenvs come from PyPI and would make CI depend on it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from broker_fixtures import ROOT, mgmt

pytestmark = pytest.mark.broker
#: A measured cell: "25,370 (1 run)" or "24,028 [21,704–28,688]" (never "n/a").
VALUE = r"\| ([\d,.]+) (?:\(1 run\)|\[[\d,.]+–[\d,.]+\])"


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _bench_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "bench.peers" in line or "bench0@" in line]


def test_quick_run_measures_reports_and_cleans_up(tmp_path, broker):
    report = tmp_path / "report.md"
    run = _bench(
        "--quick",
        "--frameworks",
        "amqptasks,raw-pika",
        "--only",
        "consume,publish,latency,rpc,rss,countdown",  # rss: idle only (--quick)
        "--processes",
        "1",
        "--repeats",
        "1",
        "--countdowns",
        "500",
        "--results-dir",
        str(tmp_path),
        "--out",
        str(report),
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    text = report.read_text()
    assert "> **Quick run**" in text
    # Every figure of the selected parts was measured for amqptasks (a number, not n/a).
    for figure in (
        "Consume no-op, 1 worker process (tasks/s)",
        "Publish, confirmed, pipelined / bulk API (msg/s)",
        "Publish→start latency p50 (light load) (ms)",
        "delay().get() round trip p50 (ms)",
        "Worker RSS, idle (MiB)",
        "Pending countdowns: unacked deliveries (msgs)",
    ):
        rows = [line for line in text.splitlines() if line.startswith(f"| {figure}")]
        assert any("| amqptasks |" in r and re.search(VALUE, r) for r in rows), f"{figure}: {rows}"
    # The raw ceiling was measured in the same run.
    assert re.search(r"\| raw-pika \| .*" + VALUE, text)
    # 500 pending countdowns live in the broker, not the worker: none unacked.
    unacked = next(
        line
        for line in text.splitlines()
        if line.startswith("| Pending countdowns: unacked deliveries (msgs)")
        and "| amqptasks |" in line
    )
    match = re.search(VALUE, unacked)
    assert match and match.group(1) == "0", unacked
    # The saved results render to the same report.
    saved = tmp_path / "results-latest.json"
    assert json.loads(saved.read_text())["machine"]
    again = tmp_path / "again.md"
    rendered = _bench("--render", str(saved), "--out", str(again))
    assert rendered.returncode == 0, rendered.stderr
    assert again.read_text() == text
    # Nothing left behind: no run vhosts, no worker or client processes.
    assert not [v["name"] for v in mgmt("GET", "/vhosts") if v["name"].startswith("bench-")]
    assert _bench_processes() == []


def test_bad_arguments_are_named():
    run = _bench("--only", "consume,nonsense")
    assert run.returncode == 2
    assert "--only: unknown nonsense" in run.stderr
