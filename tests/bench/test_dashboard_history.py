"""``python -m bench.dashboard_history`` still runs end to end: a small history, the real
dashboard over HTTP, every query's figures printed. Never how fast: the figures at a
million tasks are the benchmark's business (docs/dashboard.md), not a test's."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from broker_fixtures import ROOT, mgmt

from bench.dashboard_history import queries

pytestmark = pytest.mark.broker
TASKS = 400


def test_a_small_run_prints_every_query_s_figures_and_cleans_up(tmp_path, broker):
    run = subprocess.run(
        [sys.executable, "-m", "bench.dashboard_history", "--tasks", str(TASKS),
         "--repeats", "3", "--dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert re.search(r"history built: [\d,]+ events/s through History.apply, [\d,]+ MB", out)
    assert re.search(r"dashboard answering [\d.]+s after its start", out)
    for label, (_params, expect) in queries(TASKS).items():
        line = next((x for x in out.splitlines() if x.strip().startswith(label)), None)
        assert line is not None, f"{label} not printed:\n{out}"
        m = re.fullmatch(rf"\s+{re.escape(label)}\s+([\d.]+)\s+([\d.]+)\s+(\d+)", line)
        assert m, line
        found = int(m.group(3))
        assert found == {"none": 0, "one": 1}.get(expect, found) and found >= (expect != "none")
    # A second run reuses the file; nothing is left behind on the broker.
    again = subprocess.run(
        [sys.executable, "-m", "bench.dashboard_history", "--tasks", str(TASKS),
         "--repeats", "1", "--dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reused" in again.stdout
    assert not [v["name"] for v in mgmt("GET", "/vhosts") if v["name"].startswith("bench-dashhist")]
    assert not list(Path(tempfile.gettempdir()).glob("bench-dashhist-*"))  # its work dirs
