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
import redis
from broker_fixtures import ROOT, mgmt

from bench import stores

pytestmark = pytest.mark.broker
#: A measured cell: "25,370 (1 run)" or "24,028 [21,704–28,688]" (never "n/a").
VALUE = r"\| ([+\d,.]+) (?:\(1 run\)|\[[+\d,.]+–[+\d,.]+\])"
PNG = b"\x89PNG\r\n\x1a\n"


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
        "Consume no-op, 1 worker process, events on (tasks/s)",
        "Publish, confirmed, one caller in a loop (msg/s)",
        "Publish, confirmed, bulk (amqptasks: send_many; raw: pipelined confirms) (msg/s)",
        "Publish→start latency p50 (light load) (ms)",
        "delay().get() round trip p50 (ms)",
        "Worker memory, idle (PSS, all its processes) (MiB)",
        "Pending countdowns: unacked deliveries (msgs)",
    ):
        rows = [line for line in text.splitlines() if line.startswith(f"| {figure}")]
        assert any("| amqptasks |" in r and re.search(VALUE, r) for r in rows), f"{figure}: {rows}"
    # The raw ceiling was measured in the same run: the bulk publish, and latency with every
    # configuration of the consume group (one ack per message and batched acks).
    bulk = "| Publish, confirmed, bulk (amqptasks: send_many; raw: pipelined confirms) (msg/s) |"
    assert re.search(re.escape(bulk) + r" raw-pika \| SelectConnection.*" + VALUE, text)
    lat = "| Publish→start latency p50 (light load) (ms) | raw-pika |"
    for ack in ("manual ack", "acks batched"):
        assert re.search(re.escape(lat) + f" [^|]*{ack}[^|]* " + VALUE, text), ack
    # The targets table comes first; what needs a peer that did not run is not measured.
    targets = text[text.index("## Targets") : text.index("## How to run")]
    assert re.search(
        r"\| Publish→start latency p50 ≤ 0\.9× Dramatiq's best \| [\d.]+ ms .*"
        r"\| not measured \| — \| not measured \|",
        targets,
    ), targets
    consume = next(x for x in targets.splitlines() if x.startswith("| Consume no-op, 1 process"))
    assert "batched" in consume and re.search(r"\| [\d.]+× \| (met|not met) \|$", consume)
    # The second ceiling: raw pika reading amqptasks' own messages, and its target row.
    same = "| Consume no-op, 1 process, amqptasks' messages (raw pika ceiling) (tasks/s) |"
    assert re.search(re.escape(same) + r" raw-pika \| [^|]*amqptasks' messages[^|]*" + VALUE, text)
    same_target = next(x for x in targets.splitlines() if "same messages" in x)
    assert re.search(r"\| [\d.]+× \| (met|not met) \|$", same_target), same_target
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
    (tmp_path / "again").mkdir()
    again = tmp_path / "again" / "report.md"  # same name: the plots are referenced by it
    rendered = _bench("--render", str(saved), "--out", str(again))
    assert rendered.returncode == 0, rendered.stderr
    assert again.read_text() == text
    # Nothing left behind: no run vhosts, no worker or client processes.
    assert not [v["name"] for v in mgmt("GET", "/vhosts") if v["name"].startswith("bench-")]
    assert _bench_processes() == []


def test_rss_per_pool_and_the_scale_group_at_tiny_sizes(tmp_path, broker):
    """RSS sampled through an N-task run for every amqptasks pool, and the scale group on a
    2 × 2 grid: every cell measured, the cells not asked for (4 processes, 100 queues)
    reported as not measured, the plots written next to the report (or said skipped)."""
    report = tmp_path / "report.md"
    run = _bench(
        "--quick",
        "--frameworks",
        "amqptasks",
        "--only",
        "rss,scale",
        "--repeats",
        "1",
        "--rss-tasks",
        "3000",
        "--scale-n",
        "4000",
        "--scale-processes",
        "1,2",
        "--scale-queues",
        "1,10",
        "--results-dir",
        str(tmp_path),
        "--out",
        str(report),
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    text = report.read_text()
    rss = text[text.index("### Worker RSS over 3,000 tasks") :]
    for pool in ("threads", "asyncio", "processes"):
        row = next(x for x in rss.splitlines() if x.startswith(f"| amqptasks | {pool} pool"))
        assert len(re.findall(VALUE[2:], row)) == 4, row  # warm-up, final, growth, PSS
        target = next(x for x in text.splitlines() if f"one worker, {pool} pool: RSS" in x)
        assert re.search(r"\| (met|not met) \|$", target), target
    scale = text[text.index("### Scale") :]
    consume = scale[: scale.index("Publish, send_many")]
    for procs in ("1", "2"):
        row = next(x for x in consume.splitlines() if x.startswith(f"| {procs} |"))
        cells = row.strip("|").split("|")[1:]
        assert [bool(re.search(r"[\d,]+ \(1 run\)", c)) for c in cells] == [True, True, False]
    assert "| 4 | not measured | not measured | not measured |" in consume
    assert re.search(r"\| Scale: .* \| not measured \(10 of 18 cells\) \|", text)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plots skipped: matplotlib missing" in text
    else:
        for kind in ("scale", "rss"):
            assert f"](report-{kind}.png)" in text
            assert (tmp_path / f"report-{kind}.png").read_bytes()[:8] == PNG
    assert not [v["name"] for v in mgmt("GET", "/vhosts") if v["name"].startswith("bench-")]
    assert _bench_processes() == []


def test_quick_results_and_workflows_measure_every_store(tmp_path, broker):
    """The results and workflows groups (issue 10) in quick mode: every store's figure is
    measured for amqptasks, the cost table and the targets are reported, and the Redis
    database the harness uses is left empty."""
    report = tmp_path / "report.md"
    run = _bench(
        "--quick",
        "--frameworks",
        "amqptasks",
        "--only",
        "results,workflows",
        "--repeats",
        "1",
        "--workflow-n",
        "200",
        "--results-dir",
        str(tmp_path),
        "--out",
        str(report),
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    text = report.read_text()
    for figure in (
        "Consume no-op with results: none (ignore_result) (tasks/s)",
        "Consume no-op with results: rpc://, no reply wanted (tasks/s)",
        "Consume no-op with results: SQLite store (Celery: its Redis backend) (tasks/s)",
        "Consume no-op with results: Redis store (tasks/s)",
        "Group of N no-ops → all results, Redis store (s)",
        "Group of N no-ops → all results, SQLite store (Celery: Redis) (s)",
        "Chord of N no-ops → body result, Redis store (s)",
        "Chord of N no-ops → body result, SQLite store (Celery: Redis) (s)",
        "Group of n no-ops → all results, Redis store (n: where Celery finishes) (s)",
        "Chord of n no-ops → body result, Redis store (n: where Celery finishes) (s)",
        "AsyncResult(id).get() by id, other process, p50, Redis (ms)",
        "AsyncResult(id).get() by id, other process, p99, SQLite (Celery: Redis) (ms)",
    ):
        rows = [line for line in text.splitlines() if line.startswith(f"| {figure}")]
        assert any("| amqptasks |" in r and re.search(VALUE, r) for r in rows), f"{figure}: {rows}"
    assert "### What a feature costs" in text
    costs = [line for line in text.splitlines() if line.startswith("| Consume no-op with results")]
    assert any("Redis store" in line and "%" in line for line in costs), costs
    assert "| the SQLite store costs ≤ 30 % of no-op consume throughput |" in text
    # The read latency per store is printed in the targets table (Celery did not run).
    for store in ("Redis", "SQLite"):
        row = next(x for x in text.splitlines() if f"read latency p50, {store} store" in x)
        assert re.search(r"\| [\d.]+ ms .*\| not measured \| — \| reported \|$", row), row
    # The ids of the group of 200 were read back one at a time by a fresh process.
    assert "200 results by id, fresh process" in text
    # The harness's Redis database is empty again; nothing is left running.
    with redis.Redis.from_url(stores.redis_url(stores.AMQPTASKS_DB)) as client:
        assert client.dbsize() == 0
    assert not [v["name"] for v in mgmt("GET", "/vhosts") if v["name"].startswith("bench-")]
    assert _bench_processes() == []


def test_bad_arguments_are_named():
    run = _bench("--only", "consume,nonsense")
    assert run.returncode == 2
    assert "--only: unknown nonsense" in run.stderr
