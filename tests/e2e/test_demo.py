"""The README's first command (``./dev run``) ends in ``python -m examples.demo``: it must keep
printing every result a newcomer is promised, against a real broker and a real store."""

from __future__ import annotations

import os
import subprocess
import sys

from broker_fixtures import ROOT, amqptasks_exe


def test_the_quickstart_demo_prints_every_result_and_stops_its_worker(tmp_path, broker):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMQPTASKS_")}
    env.update(
        AMQPTASKS_BROKER_URL=broker.url,  # the shipped config, pointed at this test's vhost
        AMQPTASKS_RESULT_BACKEND=f"sqlite:///{tmp_path}/results.db",
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
    )
    subprocess.run(
        [amqptasks_exe(), "topology", "apply"], cwd=ROOT, env=env, check=True, timeout=60
    )
    run = subprocess.run(
        [sys.executable, "-m", "examples.demo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert "  result: 5" in lines
    assert "  result: 'mail sent to newcomer@example.com'" in lines
    assert any(line.startswith("  reply: ") and '"result": 5' in line for line in lines)
    assert "chain(add.s(2, 2), add.s(4), add.s(8))() -> 16" in lines
    assert "chord(add.s(i, i) for i in range(10))(reduce.s()) -> 90" in lines
    assert any(line.startswith("app.AsyncResult(") and line.endswith("SUCCESS 5") for line in lines)
    assert lines[-1] == "worker stopped (exit 0)"
