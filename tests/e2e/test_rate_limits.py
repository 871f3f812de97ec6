"""Rate limits (per worker and fleet-wide) and time limits changed at run time, through real
workers and the real broker; the unacked counts come from the management API.

Issue 11 item 5: "300 tasks with 10/s across two workers take >= 29 s (fleet-wide) and nothing
is held unacked beyond prefetch; with per-worker mode they take about half."
"""

from __future__ import annotations

import signal
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from broker_fixtures import (
    ledger_lines,
    mgmt,
    wait_for,
    write_config,
)
from control_cli import answers, run_cli

from amqptasks import App, load_config

#: -c 2 --prefetch-multiplier 2: each worker may hold 4 unacked deliveries of its queue.
CONCURRENCY, MULTIPLIER = 2, 2
PREFETCH = CONCURRENCY * MULTIPLIER


def ticks(ledger: Path) -> list[tuple[str, float]]:
    """(tag, start time) of every testtasks.tick that ran."""
    out = []
    for line in ledger_lines(ledger):
        if line.startswith("tick "):
            _, tag, when = line.split()
            out.append((tag, float(when)))
    return out


class Unacked:
    """Samples the management API while a run goes on: the most unacked deliveries of
    ``queue`` seen at once, per consuming channel and in the queue as a whole."""

    def __init__(self, broker: Any, queue: str) -> None:
        self.vhost = urllib.parse.quote(broker.vhost, safe="")
        self.queue = queue
        self.per_channel = 0
        self.in_queue = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            consumers = mgmt("GET", f"/consumers/{self.vhost}") or []
            # A consumer the broker has not gathered channel stats for yet comes with
            # ``"channel_details": []`` (an empty list, not an object): not countable yet.
            names = {
                c["channel_details"]["name"]
                for c in consumers
                if isinstance(c.get("channel_details"), dict)
                and isinstance(c.get("queue"), dict)
                and c["queue"]["name"] == self.queue
            }
            channels = mgmt("GET", f"/vhosts/{self.vhost}/channels") or []
            for ch in channels:
                if ch["name"] in names:
                    self.per_channel = max(self.per_channel, ch.get("messages_unacknowledged", 0))
            info = mgmt("GET", f"/queues/{self.vhost}/{self.queue}")
            self.in_queue = max(self.in_queue, info.get("messages_unacknowledged", 0))
            self.samples += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def run_300(tmp_path: Path, broker: Any, worker_factory: Any, scope: str) -> tuple[float, Any]:
    """300 testtasks.tick at 10/s (``scope``) across two workers: (seconds, unacked)."""
    run = tmp_path / scope
    run.mkdir()
    limit = {"rate": "10/s", "scope": scope}
    cfg = write_config(run, broker, tasks={"testtasks.tick": {"rate_limit": limit}})
    ledger = run / "ledger"
    workers = [
        worker_factory(
            cfg,
            "-Q",
            "default",
            "-n",
            f"{scope}{i}@host",
            "-c",
            str(CONCURRENCY),
            "--prefetch-multiplier",
            str(MULTIPLIER),
            ledger=ledger,
        )
        for i in (1, 2)
    ]
    unacked = Unacked(broker, "default")
    app = App(load_config(cfg, env={}))
    try:
        app.send_many([("testtasks.tick", (f"t{i}",), None) for i in range(300)], queue="default")
        wait_for(lambda: len(ticks(ledger)) >= 300, timeout=90, message="300 ticks")
    finally:
        app.close()
        unacked.stop()
    times = sorted(t for _tag, t in ticks(ledger))
    assert len(times) == 300, "a task ran twice"
    stats = answers(cfg, "inspect", "stats")
    ran = [s["by_task"]["testtasks.tick"]["succeeded"] for s in stats.values()]
    assert len(ran) == 2 and sum(ran) == 300 and min(ran) >= 60, ran  # both took part
    for w in workers:
        w.stop()
    return times[-1] - times[0], unacked


def test_300_tasks_at_10_per_s_take_30_s_fleet_wide_and_about_half_per_worker(
    tmp_path, broker, worker_factory
):
    fleet, fleet_unacked = run_300(tmp_path, broker, worker_factory, "fleet")
    per_worker, worker_unacked = run_300(tmp_path, broker, worker_factory, "worker")
    print(f"\n300 tasks at 10/s on two workers: fleet {fleet:.1f}s, per worker {per_worker:.1f}s")
    assert fleet >= 29.0
    assert fleet < 33.0  # and not much slower than the rate either
    assert 0.4 < per_worker / fleet < 0.6
    for unacked in (fleet_unacked, worker_unacked):
        assert unacked.samples >= 10
        # Throttled deliveries wait unacked, but never beyond the configured prefetch.
        assert 0 < unacked.per_channel <= PREFETCH
        assert unacked.in_queue <= 2 * PREFETCH


def pace(times: list[float]) -> float:
    """Starts per second over ``times`` (sorted)."""
    return (len(times) - 1) / (times[-1] - times[0])


def test_control_rate_limit_changes_the_pace_of_a_running_worker(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker, tasks={"testtasks.tick": {"rate_limit": "2/s"}})
    ledger = tmp_path / "ledger"
    worker_factory(cfg, "-Q", "default", "-n", "rl@host", "-c", "4", ledger=ledger)
    app = App(load_config(cfg, env={}))
    try:
        app.send_many([("testtasks.tick", (f"a{i}",), None) for i in range(60)], queue="default")
        wait_for(lambda: len(ticks(ledger)) >= 6, message="six ticks at 2/s")
        slow = pace(sorted(t for _tag, t in ticks(ledger)))
        [policy] = [
            r["testtasks.tick"]["policy"]["rate_limit"]
            for r in answers(cfg, "inspect", "registered").values()
        ]
        assert policy == {"rate": "2/s", "per_second": 2.0, "scope": "worker", "burst": 1}

        changed = time.time()
        [reply] = answers(cfg, "control", "rate-limit", "testtasks.tick", "20/s").values()
        assert reply["rate_limit"]["rate"] == "20/s" and reply["was"]["rate"] == "2/s"
        wait_for(lambda: len(ticks(ledger)) >= 60, timeout=30, message="the rest, faster")
        fast = pace(sorted(t for _tag, t in ticks(ledger) if t > changed + 0.2))

        # Fleet-wide from now on: this worker joins (and, alone, refills) the token queue.
        [reply] = answers(
            cfg, "control", "rate-limit", "testtasks.tick", "5/s", "--scope", "fleet"
        ).values()
        assert reply["rate_limit"]["scope"] == "fleet"
        fleet_start = time.time()
        app.send_many([("testtasks.tick", (f"b{i}",), None) for i in range(16)], queue="default")
        wait_for(lambda: len(ticks(ledger)) >= 76, timeout=30, message="16 ticks fleet-wide")
        fleet = pace(sorted(t for tag, t in ticks(ledger) if tag.startswith("b")))
        [stats] = answers(cfg, "inspect", "stats").values()
        limit = stats["rate_limits"]["testtasks.tick"]
        assert (limit["scope"], limit["refilling"], limit["waiting"]) == ("fleet", True, 0)
        assert limit["spent"] == 16
        # One worker holds the lock queue's single active consumer; the tokens queue exists.
        vh = urllib.parse.quote(broker.vhost, safe="")
        lock_path = f"/queues/{vh}/amqptasks.ratelimit.testtasks.tick.lock"
        assert mgmt("GET", lock_path)["arguments"]["x-single-active-consumer"] is True
        # The management API's counters are a sample refreshed every few seconds: wait for
        # the held lock message to show rather than reading one (possibly stale) sample.
        wait_for(
            lambda: mgmt("GET", lock_path).get("messages_unacknowledged") == 1,
            timeout=15,
            message="the lock message held unacked by the refilling worker",
        )
    finally:
        app.close()
    print(f"\npace: {slow:.2f}/s at 2/s, {fast:.2f}/s at 20/s, {fleet:.2f}/s at 5/s fleet-wide")
    assert slow <= 2.3
    assert fast >= 12.0
    assert 3.5 <= fleet <= 6.5
    assert time.time() - fleet_start >= 15 / 5 - 0.5  # 16 starts at 5/s: about 3 s


def test_control_time_limit_makes_a_running_worker_enforce_a_new_limit(
    tmp_path, broker, worker_factory
):
    # rpc:// and no reply wanted: nothing wants the message, so the task takes the fast path,
    # which cannot enforce limits: the command must send it down the pipeline from now on.
    cfg = write_config(tmp_path, broker, results={"backend": "rpc://"})
    ledger = tmp_path / "ledger"
    worker_factory(cfg, "-Q", "default", "-n", "tl@host", ledger=ledger)
    app = App(load_config(cfg, env={}))
    try:
        app.send_task("testtasks.busy", ("before", 1.0), queue="default", ignore_result=True)
        wait_for(lambda: "done before" in ledger_lines(ledger), message="no limit at first")

        [reply] = answers(cfg, "control", "time-limit", "testtasks.busy", "0.5", "10").values()
        assert reply == {"task": "testtasks.busy", "soft_time_limit": 0.5, "time_limit": 10.0}
        [registered] = answers(cfg, "inspect", "registered").values()
        policy = registered["testtasks.busy"]["policy"]
        assert (policy["soft_time_limit"], policy["time_limit"]) == (0.5, 10.0)

        started = time.monotonic()
        app.send_task("testtasks.busy", ("after", 8.0), queue="default", ignore_result=True)
        wait_for(lambda: "soft after" in ledger_lines(ledger), message="the soft limit")
        assert time.monotonic() - started < 5.0
        assert "done after" not in ledger_lines(ledger)

        # Refused before it is sent (every worker would refuse it): a usage error.
        refused = run_cli(cfg, "control", "time-limit", "testtasks.busy", "5", "1")
        assert refused.returncode == 2
        assert "time-limit: SOFT (5s) must be below HARD (1s)" in refused.stderr
        unknown = run_cli(cfg, "control", "rate-limit", "no.such.task", "1/s")
        assert unknown.returncode == 1 and "error UnknownTask: task 'no.such.task'" in (
            unknown.stdout
        )
    finally:
        app.close()


def _measure(tmp_path: Path, broker: Any, worker_factory: Any, rate: int) -> tuple[int, float]:
    """(tasks done, achieved starts/s) for testtasks.nothing at ``rate``/s fleet-wide (0:
    none), about 6 s of work at the asked rate; a rate the limit cannot reach is measured
    over what ran within twice that time (the backlog never runs dry meanwhile)."""
    run = tmp_path / f"r{rate}"
    run.mkdir()
    limit = {"rate": f"{rate}/s", "scope": "fleet"}
    tasks = {"testtasks.nothing": {"rate_limit": limit}} if rate else {}
    cfg = write_config(run, broker, tasks=tasks)
    workers = [
        worker_factory(cfg, "-Q", "default", "-n", f"s{rate}.{i}@host", "-c", "8") for i in (1, 2)
    ]
    n = max(200, min(rate * 6, 9000)) if rate else 6000
    budget = 2 * n / rate + 5 if rate else 60.0
    names = [f"s{rate}.{i}@host" for i in (1, 2)]
    app = App(load_config(cfg, env={}))

    def succeeded() -> int:  # in-process: answers in milliseconds, both workers named
        replies = app.control.inspect_stats(destination=names, timeout=5)
        assert sorted(replies) == names
        return sum(
            r.result["by_task"].get("testtasks.nothing", {}).get("succeeded", 0)
            for r in replies.values()
        )

    try:
        sent = time.monotonic()
        app.send_many([("testtasks.nothing", (), None)] * n, queue="default")
        start = time.monotonic()
        first: tuple[float, int] | None = None
        done = 0
        while done < n and time.monotonic() - start < budget:
            time.sleep(0.1)
            done = succeeded()
            if first is None and done:
                first = (time.monotonic(), done)
        end = time.monotonic()
    finally:
        app.close()
    for w in workers:
        w.stop()
    assert first is not None, "nothing ran"
    if not rate:  # no limit: it all ran while it was being sent (bound by the publisher)
        return done, done / (end - sent)
    # From the first sample that saw work done to the last: the pace while work waited.
    return done, (done - first[1]) / (end - first[0])


@pytest.mark.slow
def test_what_a_fleet_wide_limit_can_sustain(tmp_path, broker, worker_factory):
    """Not a pass/fail figure beyond "close at low rates": prints achieved vs asked for
    (docs/reliability.md has the table)."""
    print("\nfleet-wide rate limit, two workers -c 8, a no-op task:")
    rows = []
    for rate in RATES:
        n, achieved = _measure(tmp_path, broker, worker_factory, rate)
        rows.append((rate, achieved))
        asked = f"{rate}/s" if rate else "no limit"
        print(f"  {asked:>9}: {n} tasks, {achieved:7.1f}/s achieved", flush=True)
    for rate, achieved in rows:
        if rate and rate <= 100:
            assert 0.85 * rate <= achieved <= 1.15 * rate + 2


RATES = (0, 20, 100, 300, 1000, 3000)


def test_a_fleet_limit_holds_when_the_refilling_worker_is_killed(tmp_path, broker, worker_factory):
    """Workers come and go: kill -9 the one that refills the tokens mid-run; the broker hands
    the lock to the other at once, which goes on at the same rate, and nothing is lost."""
    limit = {"rate": "10/s", "scope": "fleet"}
    cfg = write_config(tmp_path, broker, tasks={"testtasks.tick": {"rate_limit": limit}})
    ledger = tmp_path / "ledger"
    workers = {
        name: worker_factory(cfg, "-Q", "default", "-n", name, "-c", "2", ledger=ledger)
        for name in ("a@host", "b@host")
    }
    app = App(load_config(cfg, env={}))
    try:
        app.send_many([("testtasks.tick", (f"t{i}",), None) for i in range(100)], queue="default")
        wait_for(lambda: len(ticks(ledger)) >= 30, timeout=30, message="30 ticks")
        refilling = [
            name
            for name, s in answers(cfg, "inspect", "stats").items()
            if s["rate_limits"]["testtasks.tick"]["refilling"]
        ]
        assert len(refilling) == 1, refilling  # exactly one worker refills
        [dead] = refilling
        [survivor] = [name for name in workers if name != dead]
        workers[dead].signal(signal.SIGKILL)
        workers[dead].wait(10)
        killed = time.time()
        wait_for(lambda: len({t for t, _ in ticks(ledger)}) >= 100, timeout=60, message="all")
        replies = answers(cfg, "inspect", "stats")
        assert list(replies) == [survivor]
        assert replies[survivor]["rate_limits"]["testtasks.tick"]["refilling"] is True
    finally:
        app.close()
    after = sorted(t for _tag, t in ticks(ledger) if t > killed)
    gaps = [b - a for a, b in zip([killed, *after], after, strict=False)]
    print(
        f"\nrefiller {dead} killed: first start after {gaps[0]:.3f}s, largest gap "
        f"{max(gaps):.3f}s, pace after {pace(after):.2f}/s"
    )
    assert max(gaps) < 1.5  # the tokens kept coming: failover is the broker's, not a timeout
    assert pace(after) <= 11.5  # the rate held across the failover
    # Nothing lost: every tag ran (one the dead worker had started may have run again).
    assert {t for t, _ in ticks(ledger)} == {f"t{i}" for i in range(100)}


def test_control_rate_limit_on_a_task_that_had_none_takes_it_off_the_fast_path(
    tmp_path, broker, worker_factory
):
    """A task without a limit runs on the fast path; a limit set at run time must reach it
    (the fast path's cached task list is refreshed), and 0 lifts it again."""
    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ledger"
    worker_factory(cfg, "-Q", "default", "-n", "free@host", "-c", "4", ledger=ledger)
    app = App(load_config(cfg, env={}))
    try:
        [before] = [
            r["testtasks.tick"]["policy"]["rate_limit"]
            for r in answers(cfg, "inspect", "registered").values()
        ]
        assert before is None
        [reply] = answers(cfg, "control", "rate-limit", "testtasks.tick", "4/s").values()
        assert reply["rate_limit"]["rate"] == "4/s" and reply["was"] is None
        app.send_many([("testtasks.tick", (f"c{i}",), None) for i in range(13)], queue="default")
        wait_for(lambda: len(ticks(ledger)) >= 13, timeout=30, message="13 ticks at 4/s")
        limited = sorted(t for _tag, t in ticks(ledger))
        # 13 starts at 4/s: about 3 s (the first token is there at once).
        assert limited[-1] - limited[0] >= 12 / 4 - 0.5, limited

        [reply] = answers(cfg, "control", "rate-limit", "testtasks.tick", "0").values()
        assert reply["rate_limit"] is None and reply["was"]["rate"] == "4/s"
        lifted_at = time.time()
        app.send_many([("testtasks.tick", (f"d{i}",), None) for i in range(40)], queue="default")
        wait_for(lambda: len(ticks(ledger)) >= 53, timeout=30, message="40 ticks, no limit")
        free = sorted(t for tag, t in ticks(ledger) if tag.startswith("d"))
    finally:
        app.close()
    print(f"\n13 ticks at 4/s over {limited[-1] - limited[0]:.2f}s; 40 without over "
          f"{free[-1] - free[0]:.2f}s")  # fmt: skip
    assert free[-1] - free[0] < 2.0  # at 4/s they would need about 10 s
    assert free[0] >= lifted_at - 0.1
