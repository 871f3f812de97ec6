"""The pool's size at run time, through the real CLI against real workers: ``control
pool-grow|pool-shrink|autoscale``, ``worker --autoscale MAX,MIN`` and ``inspect stats``.

The tasks are ``testtasks.gated``: each records its start, then runs until the test creates
its gate file. So "N run at once" is read from the ledger (starts and ends in the order they
happened), and nothing in the tests sleeps: they wait for ledger lines, answers and log lines
with a bounded wait.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
from broker_fixtures import (
    ledger_lines,
    mgmt,
    run_cli,
    wait_for,
    write_config,
)

from amqptasks import App, load_config

VALIDATOR = jsonschema.Draft202012Validator(
    json.loads(
        (resources.files("amqptasks") / "schema" / "control-v1.json").read_text(encoding="utf-8")
    )
)


def answer(config: Path, *args: str, worker: str = "w1@host") -> Any:
    """``amqptasks ARGS -d worker --json``: exit 0, the reply valid, its result."""
    out = run_cli(config, *args, "-d", worker, "--json", "--timeout", "5")
    assert out.returncode == 0, out.stdout + out.stderr
    reply = json.loads(out.stdout)[worker]
    problems = [e.message for e in VALIDATOR.iter_errors(reply)]
    assert problems == [], (reply, problems)
    return reply["result"]


def send_gated(config: Path, tags: list[str], gate: Path) -> None:
    app = App(load_config(config, env={}))
    try:
        for tag in tags:
            app.send_task("testtasks.gated", (tag, str(gate)), queue="default", ignore_result=True)
    finally:
        app.close()


def started(ledger: Path) -> list[str]:
    return [line.split()[1] for line in ledger_lines(ledger) if line.startswith("start ")]


def done(ledger: Path) -> list[str]:
    return [line.split()[1] for line in ledger_lines(ledger) if line.startswith("done ")]


def most_at_once(ledger: Path, after: str | None = None) -> int:
    """The most tasks running together, from the ledger's order of starts and ends (only
    counting from the start of task ``after`` on, when given)."""
    running: set[str] = set()
    most, counting = 0, after is None
    for line in ledger_lines(ledger):
        kind, tag = line.split()[:2]
        if kind == "start":
            running.add(tag)
            counting = counting or tag == after
        elif kind == "done":
            running.discard(tag)
        if counting:
            most = max(most, len(running))
    return most


def consumer_prefetch(broker: Any, queue: str = "default") -> list[int]:
    """The prefetch of each consumer of ``queue``, as the broker has it."""
    vh = urllib.parse.quote(broker.vhost, safe="")
    return sorted(
        c["prefetch_count"] for c in mgmt("GET", f"/consumers/{vh}") if c["queue"]["name"] == queue
    )


def test_the_worker_section_of_the_config_sizes_the_pool_and_flags_override_it(
    tmp_path, broker, worker_factory
):
    cfg = write_config(
        tmp_path, broker, worker={"concurrency": 3, "prefetch_multiplier": 2, "pool": "asyncio"}
    )
    worker_factory(cfg, "-Q", "default", "-n", "w1@host")
    stats = answer(cfg, "inspect", "stats")
    assert (stats["pool"], stats["concurrency"], stats["prefetch"]) == ("asyncio", 3, 6)
    wait_for(lambda: consumer_prefetch(broker) == [6], message="the broker's consumer at 6")
    worker_factory(cfg, "-Q", "default", "-n", "w2@host", "-c", "5", "--pool", "threads")
    stats = answer(cfg, "inspect", "stats", worker="w2@host")
    assert (stats["pool"], stats["concurrency"], stats["prefetch"]) == ("threads", 5, 10)


def test_pool_grow_from_2_to_6_runs_6_at_once_and_prefetch_follows(
    tmp_path, broker, worker_factory
):
    cfg = write_config(tmp_path, broker)
    ledger, gate = tmp_path / "ledger", tmp_path / "gate"
    worker_factory(cfg, "-Q", "default", "-c", "2", "-n", "w1@host", ledger=ledger)
    tags = [f"t{i}" for i in range(6)]
    send_gated(cfg, tags, gate)
    wait_for(lambda: len(started(ledger)) == 2, message="two tasks running")
    stats = wait_for(
        lambda: (s := answer(cfg, "inspect", "stats"))["reserved"] == 4 and s,
        message="four deliveries waiting for a slot",
    )
    assert (stats["concurrency"], stats["prefetch"], stats["running"]) == (2, 8, 2)
    assert stats["autoscale"] is None
    assert len(started(ledger)) == 2  # the pool of 2 held the other four back

    grown = answer(cfg, "control", "pool-grow", "4")
    assert grown == {"concurrency": 6, "prefetch": 24, "autoscale": None}
    wait_for(lambda: len(started(ledger)) == 6, message="six tasks running")
    stats = answer(cfg, "inspect", "stats")
    assert (stats["concurrency"], stats["prefetch"], stats["running"]) == (6, 24, 6)
    wait_for(lambda: consumer_prefetch(broker) == [24], message="the broker's consumer at 24")

    gate.touch()
    wait_for(lambda: sorted(done(ledger)) == tags, message="all six done")
    assert most_at_once(ledger) == 6
    human = run_cli(cfg, "control", "pool-grow", "1")
    assert human.returncode == 0, human.stderr
    assert human.stdout.strip() == "w1@host: pool 7, prefetch 28 per consumer"


def test_pool_shrink_lets_running_tasks_finish_then_runs_at_most_n_and_loses_nothing(
    tmp_path, broker, worker_factory
):
    cfg = write_config(tmp_path, broker)
    ledger, gate_a, gate_b = tmp_path / "ledger", tmp_path / "gate-a", tmp_path / "gate-b"
    worker_factory(cfg, "-Q", "default", "-c", "4", "-n", "w1@host", ledger=ledger)
    first = [f"a{i}" for i in range(4)]
    send_gated(cfg, first, gate_a)
    wait_for(lambda: len(started(ledger)) == 4, message="four tasks running")

    shrunk = answer(cfg, "control", "pool-shrink", "2")
    assert shrunk == {"concurrency": 2, "prefetch": 8, "autoscale": None}
    stats = answer(cfg, "inspect", "stats")
    assert (stats["concurrency"], stats["running"]) == (2, 4)  # none was interrupted

    second = [f"b{i}" for i in range(6)]
    send_gated(cfg, second, gate_b)
    gate_a.touch()
    wait_for(lambda: sorted(done(ledger)) == first, message="the first four done")
    wait_for(lambda: len(started(ledger)) == 6, message="two of the second batch running")
    stats = wait_for(
        lambda: (s := answer(cfg, "inspect", "stats"))["reserved"] + s["running"] == 6 and s,
        message="the rest of the second batch taken",
    )
    assert (stats["running"], stats["reserved"]) == (2, 4)
    assert len(started(ledger)) == 6  # still only two of the second batch
    wait_for(lambda: consumer_prefetch(broker) == [8], message="the broker's consumer at 8")

    gate_b.touch()
    wait_for(lambda: sorted(done(ledger)) == first + second, message="all ten done")
    assert most_at_once(ledger, after="b0") <= 2 and most_at_once(ledger, after=None) == 4
    assert sorted(started(ledger)) == sorted(first + second)  # each ran once
    assert broker.depth("default") == 0 and broker.depth("default.dlq") == 0

    too_far = run_cli(cfg, "control", "pool-shrink", "2", "-d", "w1@host")
    assert too_far.returncode == 1
    assert too_far.stdout.strip() == (
        "w1@host: error BadArguments: pool-shrink 2: the pool has 2 slot(s) and keeps at "
        "least one, so it can shrink by at most 1"
    )
    bad = run_cli(cfg, "control", "pool-grow", "lots")
    assert bad.returncode == 2 and "pool-grow: N must be a whole number, got 'lots'" in bad.stderr


def test_autoscale_6_1_grows_under_a_backlog_and_shrinks_back_when_idle(
    tmp_path, broker, worker_factory
):
    cfg = write_config(tmp_path, broker)
    ledger, gate = tmp_path / "ledger", tmp_path / "gate"
    w = worker_factory(
        cfg,
        "-Q",
        "default",
        "--autoscale",
        "6,1",
        "--autoscale-idle",
        "1",
        "-n",
        "w1@host",
        ledger=ledger,
    )
    assert "autoscale:   max=6 min=1" in w.output()
    stats = answer(cfg, "inspect", "stats")
    assert (stats["concurrency"], stats["prefetch"], stats["autoscale"]) == (
        1,
        4,
        {"max": 6, "min": 1},
    )

    tags = [f"t{i}" for i in range(8)]
    send_gated(cfg, tags, gate)
    wait_for(lambda: len(started(ledger)) == 6, message="the pool grown to six")
    stats = answer(cfg, "inspect", "stats")
    assert (stats["concurrency"], stats["prefetch"], stats["running"]) == (6, 24, 6)
    assert stats["reserved"] == 2  # the maximum holds: two wait
    assert len(started(ledger)) == 6

    gate.touch()
    wait_for(lambda: sorted(done(ledger)) == tags, message="all eight done")
    # Each idle window shrinks to the most that were busy in it, so the way back may be one
    # step (6 -> 1) or two (6 -> 2 -> 1, when a tick saw the last two running): both end at 1.
    wait_for(
        lambda: re.search(r"pool shrunk from [2-6] to 1 \(autoscale\)", w.output()),
        message="the idle pool shrunk back to 1",
    )
    assert "pool shrunk from 6 to " in w.output()
    stats = answer(cfg, "inspect", "stats")
    assert (stats["concurrency"], stats["prefetch"]) == (1, 4)
    assert most_at_once(ledger) == 6
    wait_for(lambda: consumer_prefetch(broker) == [4], message="the broker's consumer at 4")

    # The bounds can change at run time; the size moves into them at once.
    assert answer(cfg, "control", "autoscale", "3", "2") == {
        "concurrency": 2,
        "prefetch": 8,
        "autoscale": {"max": 3, "min": 2},
    }
    assert broker.depth("default") == 0 and broker.depth("default.dlq") == 0


def test_control_autoscale_later_keeps_the_workers_autoscale_idle(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    w = worker_factory(cfg, "-Q", "default", "-c", "3", "--autoscale-idle", "0.5", "-n", "w1@host")
    assert answer(cfg, "control", "autoscale", "4", "1") == {
        "concurrency": 3,
        "prefetch": 12,
        "autoscale": {"max": 4, "min": 1},
    }
    # Idle at once: half a second later it shrinks (the default would wait 30 s).
    wait_for(
        lambda: re.search(r"pool shrunk from [23] to 1 \(autoscale\)", w.output()),
        timeout=15,
        message="the idle pool shrunk to 1 after --autoscale-idle",
    )
    assert answer(cfg, "inspect", "stats")["concurrency"] == 1


def test_the_process_pool_starts_and_retires_children_with_the_pool(
    tmp_path, broker, worker_factory
):
    cfg = write_config(tmp_path, broker)
    ledger, gate = tmp_path / "ledger", tmp_path / "gate"
    w = worker_factory(
        cfg, "-Q", "default", "-c", "1", "--pool", "processes", "-n", "w1@host", ledger=ledger
    )
    assert children(w.proc.pid) == 1
    tags = ["p0", "p1", "p2"]
    send_gated(cfg, tags, gate)
    wait_for(lambda: len(started(ledger)) == 1, message="one task running")
    assert answer(cfg, "control", "pool-grow", "2")["concurrency"] == 3
    wait_for(lambda: len(started(ledger)) == 3, message="three tasks running")
    pids = {line.split()[2] for line in ledger_lines(ledger) if line.startswith("start ")}
    assert len(pids) == 3  # three children, one task each
    assert children(w.proc.pid) == 3

    assert answer(cfg, "control", "pool-shrink", "2")["concurrency"] == 1
    gate.touch()  # the busy children finish their tasks (none is killed), then retire
    wait_for(lambda: sorted(done(ledger)) == tags, message="all three done")
    wait_for(lambda: children(w.proc.pid) == 1, message="two children retired")
    assert broker.depth("default") == 0 and broker.depth("default.dlq") == 0
    assert "WorkerLost" not in w.output()


def children(pid: int) -> int:
    """Child processes of ``pid`` that are pool children (multiprocessing's spawn)."""
    out = subprocess.run(
        ["ps", "-ww", "--ppid", str(pid), "-o", "args="],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return sum(1 for line in out.splitlines() if "spawn_main" in line)
