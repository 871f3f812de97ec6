"""Beat on the cluster: the node holding the scheduler's lock dies; another scheduler takes
over; no tick fires twice (and, with ``catch_up: all``, none is skipped)."""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
from broker_fixtures import ROOT, amqptasks_exe, cli_env, wait_for

pytestmark = pytest.mark.timeout(300)
SUCCEEDED = re.compile(r"task testtasks\.record\[(?P<id>tick:[^\]]+)\] succeeded")


class Beat:
    def __init__(self, config: Path, name: str) -> None:
        self.log_path = config.with_name(f"beat-{name}.log")
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [amqptasks_exe(), "beat", "--config", str(config), "-n", name, "--log-format", "json"],
            cwd=ROOT,
            env=cli_env(config),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def records(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def active_at(self) -> list[float]:
        return [
            datetime.fromisoformat(r["time"].replace("Z", "+00:00")).timestamp()
            for r in self.records()
            if ": active, holding the lock" in r.get("message", "")
        ]

    def fired(self) -> list[str]:
        return [
            r["message"].split()[1]
            for r in self.records()
            if r.get("message", "").startswith("fired ")
        ]

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def test_lock_holders_node_dies_another_scheduler_takes_over_no_tick_twice(
    cluster, tmp_path, worker_factory, report
):
    schedules = {
        "tick": {"task": "testtasks.record", "args": ["t"], "every": "1s", "catch_up": "all"}
    }
    cfg_a = cluster.config(tmp_path, "a", (1, 2, 3), schedules=schedules)
    cfg_b = cluster.config(tmp_path, "b", (2, 3, 1), schedules=schedules)
    worker = worker_factory(cfg_b, "-Q", "default", "-c", "4")  # on node 2: never loses its link
    beats: list[Beat] = []
    killed = False
    try:
        a = Beat(cfg_a, "a")  # on node 1, where the lock queue's leader is declared
        beats.append(a)
        wait_for(lambda: a.active_at(), timeout=60, message="beat a active")
        b = Beat(cfg_b, "b")
        beats.append(b)
        wait_for(
            lambda: any("standby" in r.get("message", "") for r in b.records()),
            timeout=60,
            message="beat b on standby",
        )
        lock_leader = cluster.leader("amqptasks.beat.lock")
        lock_type = cluster.queue("amqptasks.beat.lock")["type"]
        wait_for(lambda: len(a.fired()) >= 3, timeout=30, message="a fired 3 ticks")
        killed_at = time.time()
        before = len(a.fired())
        cluster.kill(1)
        killed = True

        def activations() -> list[float]:
            return sorted(t for t in a.active_at() + b.active_at() if t > killed_at)

        def fired_since() -> int:
            return len(a.fired()) + len(b.fired()) - before

        # b on standby is first in line; a, rejoining through node 2, is second.
        wait_for(activations, timeout=60, message="a scheduler takes the lock over")
        takeover = activations()[0] - killed_at
        # The new holder reads the state from a quorum queue whose leader was on the dead
        # node: until the survivors' new leader is known, basic.get closes the connection
        # (internal_error, nodedown) and each scheduler that got the lock and could not read
        # pauses before rejoining (0.5 s, 1 s, 2 s ... 5 s). On a loaded 2-core box with three
        # nodes that has taken more than 30 s after a previous test's node kill; what is
        # asserted is that ticks fire again, and that none fires twice, not how soon.
        wait_for(lambda: fired_since() >= 5, timeout=120, message="5 ticks fired after the kill")
        cluster.restart(1)
        killed = False
        wait_for(lambda: fired_since() >= 8, timeout=30, message="ticks keep firing")
    except AssertionError as exc:
        logs = "\n".join(
            f"--- beat {beat.log_path.name} (last lines)\n{beat.tail()}" for beat in beats
        )
        raise AssertionError(f"{exc}\n{logs}") from None
    finally:
        for beat in reversed(beats):
            beat.stop()
        if killed:
            cluster.restart(1)  # the vhost's teardown and the next test want all three nodes
    fired = a.fired() + b.fired()

    def ran() -> Counter:
        return Counter(m["id"] for m in SUCCEEDED.finditer(worker.output()))

    wait_for(lambda: set(fired) <= set(ran()), timeout=60, message="the worker ran every tick")
    counts = ran()
    fire_times = sorted(
        datetime.fromisoformat(i.split(":", 1)[1].replace("Z", "+00:00")) for i in counts
    )
    gaps = [
        (y - x).total_seconds()
        for x, y in itertools.pairwise(fire_times)
        if (y - x).total_seconds() != 1
    ]
    twice_fired = [i for i, c in Counter(fired).items() if c > 1]
    twice_ran = [i for i, c in counts.items() if c > 1]
    report(
        f"beat on the cluster: lock queue {lock_type} (leader {lock_leader}); node 1 (leader and "
        f"the active scheduler's link) SIGKILLed: lock taken over after {takeover:.2f}s; ticks "
        f"fired a={len(a.fired())} b={len(b.fired())}, fired twice {len(twice_fired)}, ran twice "
        f"{len(twice_ran)}, gaps {gaps}"
    )
    assert lock_type == "quorum"
    assert twice_fired == [] and twice_ran == []
    assert gaps == []  # catch_up: all — nothing skipped across the takeover
    assert takeover < 15
