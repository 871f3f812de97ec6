"""Task and worker events through the real CLI: a worker with ``-E``, listeners run as
``amqptasks events`` subprocesses, every JSON line validated against schema/event-v1.json."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import time
import uuid
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pika
from broker_fixtures import (
    ROOT,
    amqptasks_exe,
    cli_env,
    wait_for,
    write_config,
)

from amqptasks import App, load_config
from amqptasks.schedule import SCHEDULE_HEADER

SCHEMA = json.loads(
    (resources.files("amqptasks") / "schema" / "event-v1.json").read_text(encoding="utf-8")
)
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
TERMINAL = {"task-succeeded", "task-failed", "task-retried", "task-rejected", "task-expired"}


def valid(event: dict[str, Any]) -> dict[str, Any]:
    problems = [f"{list(e.path)}: {e.message}" for e in VALIDATOR.iter_errors(event)]
    assert problems == [], (event, problems)
    return event


class Listener:
    """``amqptasks events ARGS`` in the background, its output in files."""

    def __init__(self, config: Path, *args: str) -> None:
        tag = uuid.uuid4().hex[:6]
        self.out_path = config.with_name(f"events-{tag}.out")
        self.err_path = config.with_name(f"events-{tag}.err")
        self._out, self._err = self.out_path.open("wb"), self.err_path.open("wb")
        self.proc = subprocess.Popen(
            [amqptasks_exe(), "events", *args, "--config", str(config)],
            cwd=ROOT,
            env=cli_env(config),
            stdout=self._out,
            stderr=self._err,
        )

    def wait_listening(self) -> Listener:
        wait_for(
            lambda: "listening on" in self.err_path.read_text() or self.proc.poll() is not None,
            message="the listener to bind its queue",
        )
        assert self.proc.poll() is None, self.err_path.read_text()
        return self

    def lines(self) -> list[str]:
        return [line for line in self.out_path.read_text().splitlines() if line]

    def events(self) -> list[dict[str, Any]]:
        return [valid(json.loads(line)) for line in self.lines()]

    def finish(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._out.close()
        self._err.close()


def run_events(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [amqptasks_exe(), "events", *args, "--config", str(config)],
        cwd=ROOT,
        env=cli_env(config),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def by_task(events: list[dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for e in events:
        if e["type"].startswith("task-"):
            out[e["id"]].append(e["type"])
    return out


def test_a_1000_task_run_yields_received_started_and_an_outcome_in_order_for_every_task(
    tmp_path, broker, worker_factory
):
    cfg = write_config(tmp_path, broker, events={"heartbeat_interval": 0.3})
    listener = Listener(cfg, "--json").wait_listening()  # before the worker: worker-online
    try:
        w = worker_factory(cfg, "-Q", "default", "-E", "-n", "ev@host", "-c", "4")
        app = App(load_config(cfg, env={}))
        try:
            # Fast path (no reply wanted) and the full pipeline (a reply wanted), both paths.
            quiet = app.send_many(
                [("examples.tasks.add", (i, i), None) for i in range(700)]
                + [("testtasks.fail", (f"f{i}",), None) for i in range(100)],
                ignore_result=True,
            )
            replied = app.send_many([("examples.tasks.add", (i, 1), None) for i in range(200)])
            assert [r.get(timeout=60) for r in replied] == [i + 1 for i in range(200)]
        finally:
            app.close()
        ids = {r.id for r in quiet + replied}
        assert len(ids) == 1000

        def outcomes() -> int:
            marks = ('"type":"task-succeeded"', '"type":"task-failed"')
            return sum(1 for line in listener.lines() if any(m in line for m in marks))

        wait_for(lambda: outcomes() >= 1000, timeout=60, message="1000 outcome events")
        w.signal(signal.SIGTERM)
        assert w.wait(30) == 0
        wait_for(
            lambda: '"type":"worker-offline"' in listener.out_path.read_text(),
            message="worker-offline",
        )
        listener.proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert listener.finish(10) == 0
    finally:
        listener.close()

    events = listener.events()
    seen = by_task(events)
    assert set(seen) == ids
    ok = ["task-received", "task-started", "task-succeeded"]
    failed = ["task-received", "task-started", "task-failed"]
    assert sum(1 for types in seen.values() if types == ok) == 900
    assert sum(1 for types in seen.values() if types == failed) == 100
    # Nothing lost, nothing doubled. (A batch goes out type by type, so across tasks the
    # stream is not in clock order; each task's events are, as checked above.)
    clocks = [e["clock"] for e in events if e["hostname"] == "ev@host"]
    assert sorted(clocks) == list(range(len(clocks)))
    mine = [e["type"] for e in sorted(events, key=lambda e: e["clock"])]
    assert mine[0] == "worker-online" and mine[-1] == "worker-offline"
    assert "worker-heartbeat" in mine
    beat = next(e for e in events if e["type"] == "worker-heartbeat")
    assert (beat["queues"], beat["concurrency"], beat["interval"]) == (["default"], 4, 0.3)
    fail = next(e for e in events if e["type"] == "task-failed")
    assert fail["exception"]["type"] == "ValueError" and fail["reason"] == "task-failed"
    assert "Traceback" in fail["traceback"]
    done = next(e for e in events if e["type"] == "task-succeeded")
    assert done["queue"] == "default" and done["runtime"] >= 0 and done["result"].isdigit()


def test_a_durable_listener_stopped_for_10_s_misses_none_of_the_events_meanwhile(
    tmp_path, broker, worker_factory
):
    cfg = write_config(tmp_path, broker)
    worker_factory(cfg, "-Q", "default", "-E", "-n", "ev@host")
    first = run_events(cfg, "--queue", "audit", "--dump", "--duration", "0.5")
    assert first.returncode == 0, first.stderr
    assert "listening on audit" in first.stderr
    # The listener is down now. Ten seconds of tasks (paced: time has to pass here).
    app = App(load_config(cfg, env={}))
    ids: list[str] = []
    started = time.monotonic()
    try:
        while time.monotonic() - started < 10:
            batch = app.send_many([("examples.tasks.add", (i, 2), None) for i in range(20)])
            assert [r.get(timeout=30) for r in batch] == [i + 2 for i in range(20)]
            ids += [r.id for r in batch]
            time.sleep(0.5)
    finally:
        app.close()
    wait_for(lambda: broker.depth("audit") > 0, message="events waiting in the durable queue")
    second = run_events(
        cfg,
        "--queue",
        "audit",
        "--dump",
        "--state",
        "received,started,succeeded",
        "--count",
        str(3 * len(ids)),
    )
    assert second.returncode == 0, second.stderr
    events = [valid(json.loads(line)) for line in second.stdout.splitlines()]
    assert len(events) == 3 * len(ids)
    seen = by_task(events)
    assert set(seen) == set(ids)
    assert all(t == ["task-received", "task-started", "task-succeeded"] for t in seen.values())


def test_event_filters_each_keep_only_what_they_name(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker, events={"send_sent": True})  # the callers' task-sent
    worker_factory(cfg, "-Q", "default,web_tasks", "-E", "-n", "w1@host")
    listeners = {
        "task": Listener(cfg, "--dump", "--task", "examples.tasks.*", "--count", "6"),
        "failed": Listener(cfg, "--dump", "--state", "failed", "--count", "1"),
        "worker": Listener(
            cfg, "--dump", "--worker", "w1@*", "--state", "succeeded", "--count", "3"
        ),
        "nobody": Listener(cfg, "--dump", "--worker", "nobody@*", "--duration", "4"),
        "queue": Listener(cfg, "--dump", "--task-queue", "web_tasks", "--count", "3"),
        "human": Listener(cfg, "--state", "succeeded", "--count", "3"),
        "sent": Listener(cfg, "--json", "--state", "sent", "--count", "4"),
    }
    try:
        for listener in listeners.values():
            listener.wait_listening()
        app = App(load_config(cfg, env={}))  # task-sent from events.send_sent
        assert (
            app.sends_events and not App(load_config(cfg, env={}), send_events=False).sends_events
        )
        try:
            assert app.send_task("examples.tasks.add", (1, 2)).get(timeout=20) == 3
            assert app.send_task("examples.tasks.add", (3, 4)).get(timeout=20) == 7
            failed = app.send_task("testtasks.fail", ("x",))
            with contextlib.suppress(ValueError):
                failed.get(timeout=20)
            mail = app.send_task("examples.web.sendmail", ("a@b",))
            assert mail.get(timeout=20) == "mail sent to a@b"
        finally:
            app.close()
        codes = {name: listener.finish(60) for name, listener in listeners.items()}
        assert codes == dict.fromkeys(listeners, 0)
    finally:
        for listener in listeners.values():
            listener.close()

    task = listeners["task"].events()
    assert len(task) == 6 and {e["task"] for e in task} == {"examples.tasks.add"}
    [fail] = listeners["failed"].events()
    assert (fail["type"], fail["task"], fail["id"]) == ("task-failed", "testtasks.fail", failed.id)
    worker = listeners["worker"].events()
    assert {(e["type"], e["hostname"]) for e in worker} == {("task-succeeded", "w1@host")}
    assert listeners["nobody"].lines() == []
    queue = listeners["queue"].events()
    assert [e["type"] for e in queue] == ["task-received", "task-started", "task-succeeded"]
    assert {(e["task"], e["id"], e["queue"]) for e in queue} == {
        ("examples.web.sendmail", mail.id, "web_tasks")
    }
    human = listeners["human"].lines()
    line = re.compile(
        r"^\S+Z w1@host task-succeeded (examples\.tasks\.add|examples\.web\.sendmail)"
        r"\[[0-9a-f-]{36}\] queue=\S+ runtime=\d+\.\d+s result=\S+"
    )
    assert len(human) == 3 and all(line.match(h) for h in human), human
    sent = listeners["sent"].events()
    assert [e["type"] for e in sent] == ["task-sent"] * 4
    assert {e["hostname"] for e in sent} == {socket.gethostname()}
    assert {(e["exchange"], e["routing_key"]) for e in sent} == {
        ("tasks", "task.add"),
        ("tasks", "task.default"),
        ("tasks", "web.render"),
    }
    assert sent[0]["args"] == "[1,2]"


def test_rejected_expired_retried_and_revoked_tasks_have_their_events(
    tmp_path, broker, worker_factory
):
    cfg = write_config(tmp_path, broker)
    worker_factory(cfg, "-Q", "default", "-E", "-n", "w1@host")
    wanted = "rejected,expired,retried,failed,revoked"
    listener = Listener(cfg, "--dump", "--state", wanted, "--count", "8").wait_listening()
    try:
        broker.publish_raw("tasks", "task.x", b'{"task": "no.such.task"}')
        broker.publish_raw("tasks", "task.x", b"{not json")
        app = App(load_config(cfg, env={}))
        try:
            app.send_task("examples.tasks.add", (1, 1), expires=-1, ignore_result=True)
            flaky = app.send_task("testtasks.flaky", ("r", 0), ignore_result=True)
            firing = {"headers": {SCHEDULE_HEADER: "nightly"}, "task_id": "nightly:2030-01-01"}
            assert app.send_task("examples.tasks.add", (2, 2), **firing).get(timeout=20) == 4
            app.send_task("examples.tasks.add", (2, 2), ignore_result=True, **firing)
        finally:
            app.close()
        assert listener.finish(60) == 0
    finally:
        listener.close()
    events = listener.events()
    kinds = sorted(e["type"] for e in events)
    assert kinds == sorted(
        ["task-rejected", "task-rejected", "task-expired"]
        + ["task-retried"] * 3
        + ["task-failed", "task-revoked"]
    )
    rejected = [e for e in events if e["type"] == "task-rejected"]
    assert {e["reason"] for e in rejected} == {"unknown-task", "decode-error"}
    undecodable = next(e for e in rejected if e["reason"] == "decode-error")
    assert undecodable["task"] is None and undecodable["queue"] == "default"
    retried = [e for e in events if e["id"] == flaky.id]
    assert [e["type"] for e in retried] == ["task-retried"] * 3 + ["task-failed"]
    assert [e["retries"] for e in retried] == [0, 1, 2, 3]
    [revoked] = [e for e in events if e["type"] == "task-revoked"]
    assert (revoked["id"], revoked["reason"]) == ("nightly:2030-01-01", "duplicate")
    assert pika  # the raw publishes above are a foreign client's, not ours


def test_events_follow_the_config_and_either_flag_overrides_it(tmp_path, broker, worker_factory):
    """``events.enabled: true`` turns events on with no flag; ``--no-events`` turns them off
    for one worker, ``-E`` on where the config says false."""

    def one_task(cfg: Path, *flags: str) -> str:
        w = worker_factory(cfg, "-Q", "default", *flags)
        app = App(load_config(cfg, env={}))
        try:
            r = app.send_task("examples.tasks.add", (1, 2))
            assert r.get(timeout=30) == 3
        finally:
            app.close()
        w.stop()
        return r.id

    on = write_config(tmp_path, broker, events={"enabled": True})
    assert run_events(on, "--queue", "audit", "--duration", "0.5").returncode == 0
    by_config = one_task(on, "-n", "config@host")
    switched_off = one_task(on, "-n", "off@host", "--no-events")
    (tmp_path / "off").mkdir()
    off = write_config(tmp_path / "off", broker, events={"enabled": False})
    switched_on = one_task(off, "-n", "on@host", "-E")
    wait_for(lambda: broker.depth("audit") > 0, message="events in the durable queue")
    got = run_events(on, "--queue", "audit", "--dump", "--duration", "3")
    assert got.returncode == 0, got.stderr
    events = [valid(json.loads(line)) for line in got.stdout.splitlines()]
    hosts = {e["hostname"] for e in events}
    assert {"config@host", "on@host"} <= hosts and "off@host" not in hosts, hosts
    tasks = by_task(events)
    assert "task-succeeded" in tasks[by_config] and "task-succeeded" in tasks[switched_on]
    assert switched_off not in tasks
