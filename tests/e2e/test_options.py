"""Every config key and CLI option the docs name, exercised for real."""

from __future__ import annotations

import pickle
import signal
import subprocess
import time
from pathlib import Path

import pika
import pytest
from broker_fixtures import (
    ROOT,
    amqptasks_exe,
    cli_env,
    ledger_lines,
    wait_for,
    write_config,
    write_config_default_queue,
)

from amqptasks import App, ResultsDisabled, load_config


def test_quorum_queue_and_its_dlq_are_declared_as_quorum(tmp_path, broker, worker_factory):
    cfg = write_config_default_queue(tmp_path, broker, type="quorum")
    worker_factory(cfg, "-Q", "default")
    assert broker.queue_info("default")["type"] == "quorum"
    assert broker.queue_info("default.dlq")["type"] == "quorum"
    app = App(load_config(cfg, env={}))
    try:
        assert app.send_task("examples.tasks.add", (1, 2)).get(timeout=20) == 3
    finally:
        app.close()


def test_max_priority_queue_delivers_higher_priority_first(tmp_path, broker, worker_factory):
    cfg = write_config_default_queue(tmp_path, broker, max_priority=9)
    ledger = tmp_path / "ledger"
    settings = load_config(cfg, env={})
    app = App(settings)
    try:
        # Declared by a first worker run, then filled while no worker consumes.
        w = worker_factory(cfg, "-Q", "default")
        w.stop()
        for tag, prio in [("low", 1), ("mid", 5), ("high", 9)]:
            app.send_task("testtasks.record", (tag,), priority=prio, ignore_result=True)
    finally:
        app.close()
    assert broker.queue_info("default")["arguments"]["x-max-priority"] == 9
    worker_factory(cfg, "-Q", "default", "-c", "1", "--prefetch-multiplier", "1", ledger=ledger)
    wait_for(lambda: len(ledger_lines(ledger)) == 6, message="three tasks")
    assert [line for line in ledger_lines(ledger) if line.startswith("done")] == [
        "done high",
        "done mid",
        "done low",
    ]


def test_pickle_runs_only_when_the_config_accepts_it(tmp_path, broker, worker_factory):
    cfg = write_config(
        tmp_path,
        broker,
        serialization={"accept": ["application/json", "application/x-python-serialize"]},
    )
    ledger = tmp_path / "ledger"
    worker_factory(cfg, "-Q", "web_tasks", ledger=ledger)
    body = pickle.dumps({"task": "testtasks.record", "args": ["pickled"]})
    broker.publish_raw(
        "tasks", "web.p", body, pika.BasicProperties(content_type="application/x-python-serialize")
    )
    wait_for(lambda: "done pickled" in ledger_lines(ledger), message="the pickled task")


def test_results_ignore_result_config_default(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker, results={"ignore_result": True})
    ledger = tmp_path / "ledger"
    worker_factory(cfg, "-Q", "default", ledger=ledger)
    app = App(load_config(cfg, env={}))
    try:
        r = app.send_task("testtasks.record", ("r",))
        with pytest.raises(ResultsDisabled):
            r.get(timeout=1)
        wait_for(lambda: "done r" in ledger_lines(ledger), message="the task to run anyway")
    finally:
        app.close()


def test_a_tasks_entry_ignore_result_wins_over_the_default_for_caller_and_worker(
    tmp_path, broker, worker_factory
):
    """``tasks.<name>.ignore_result`` in YAML, both ways round: the caller does not wait for
    a reply the worker will not send (ResultsDisabled at once), and a task the entry keeps
    is answered and stored although ``results.ignore_result`` is true."""
    cfg = write_config(tmp_path, broker, tasks={"testtasks.record": {"ignore_result": True}})
    ledger = tmp_path / "ledger"
    w = worker_factory(cfg, "-Q", "default", ledger=ledger)
    app = App(load_config(cfg, env={}))
    try:
        quiet = app.send_task("testtasks.record", ("quiet",))
        with pytest.raises(ResultsDisabled):
            quiet.get(timeout=10)
        wait_for(lambda: "done quiet" in ledger_lines(ledger), message="the task to run anyway")
        assert app.send_task("examples.tasks.add", (1, 2)).get(timeout=20) == 3
    finally:
        app.close()
    w.stop()
    (tmp_path / "kept").mkdir()
    cfg = write_config(
        tmp_path / "kept",
        broker,
        results={"ignore_result": True},
        tasks={"examples.tasks.add": {"ignore_result": False}},
    )
    worker_factory(cfg, "-Q", "default")
    app = App(load_config(cfg, env={}))
    try:
        kept = app.send_task("examples.tasks.add", (2, 3))
        assert kept.get(timeout=20) == 5
        with pytest.raises(ResultsDisabled):
            app.send_task("examples.tasks.add", (2, 3), ignore_result=True).get(timeout=10)
    finally:
        app.close()
    reader = App(load_config(cfg, env={}))  # another process's view: the store
    try:
        stored = reader.AsyncResult(kept.id)
        assert stored.get(timeout=10) == 5  # waits for the store, not for a reply
        assert stored.state == "SUCCESS"
    finally:
        reader.close()


def test_track_started_from_the_config_default_and_from_a_tasks_entry(
    tmp_path, broker, worker_factory
):
    """``results.track_started`` (every task) and ``tasks.<name>.track_started`` (one task):
    while a task runs, another process reads STARTED from the store; untracked, PENDING."""

    def check_while_running(cfg: Path, expected: dict[str, str]) -> None:
        names = list(expected)
        ledger, gate = cfg.with_name("ledger"), cfg.with_name("gate")
        w = worker_factory(cfg, "-Q", "default", "-c", "2", ledger=ledger)
        app = App(load_config(cfg, env={}))
        reader = App(load_config(cfg, env={}))  # another process's view: the store only
        try:
            runs = {n: app.send_task(n, (n, str(gate)), queue="default") for n in names}
            wait_for(
                lambda: (
                    {ln.split()[1] for ln in ledger_lines(ledger) if ln.startswith("start ")}
                    == set(names)
                ),
                message="both tasks running",
            )
            # The STARTED record is saved beside the task's start, so it may trail it a little.
            seen: dict[str, str] = {}
            wait_for(
                lambda: (
                    seen.update({n: reader.AsyncResult(r.id).state for n, r in runs.items()})
                    or seen == expected
                ),
                message=f"the states {expected} while running",
            )
            gate.touch()
            assert [runs[n].get(timeout=30) for n in names] == names
            assert {reader.AsyncResult(r.id).state for r in runs.values()} == {"SUCCESS"}
        finally:
            reader.close()
            app.close()
        w.stop()

    every = write_config(tmp_path, broker, results={"track_started": True})
    check_while_running(every, {"testtasks.gated": "STARTED", "testtasks.held": "STARTED"})
    (tmp_path / "one").mkdir()
    one = write_config(tmp_path / "one", broker, tasks={"testtasks.gated": {"track_started": True}})
    check_while_running(one, {"testtasks.gated": "STARTED", "testtasks.held": "PENDING"})


def test_no_declare_worker_fails_clearly_when_queues_are_missing(tmp_path, broker):
    cfg = write_config(tmp_path, broker)
    out = subprocess.run(
        [amqptasks_exe(), "worker", "-Q", "default", "--no-declare"],
        cwd=ROOT,
        env=cli_env(cfg),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "queue 'default' does not exist" in out.stderr
    assert "topology apply" in out.stderr


def test_loglevel_and_hostname_options(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    quiet = worker_factory(cfg, "-Q", "web_tasks", "-l", "WARNING", "-n", "w1@test")
    loud = worker_factory(cfg, "-Q", "default", "-l", "INFO", "-n", "w2@test")
    app = App(load_config(cfg, env={}))
    try:
        app.send_task("examples.web.sendmail", ("a@b",)).get(timeout=20)
        app.send_task("examples.tasks.add", (1, 1)).get(timeout=20)
        app.send_task("no.such.task", queue="web_tasks", ignore_result=True)
    finally:
        app.close()
    wait_for(lambda: broker.depth("web_tasks.dlq") == 1, message="a dead letter")
    [(props, _)] = broker.get_all("web_tasks.dlq")
    assert props.headers["x-amqptasks-worker"] == "w1@test"
    assert "amqptasks worker w1@test" in quiet.output()
    assert "succeeded" not in quiet.output()
    wait_for(lambda: "task examples.tasks.add[" in loud.output(), message="an INFO task line")


def test_send_cli_queue_exchange_and_priority_options(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    env = cli_env(cfg)

    def send(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [amqptasks_exe(), "send", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    unroutable = send("examples.tasks.add", "--queue", "queue_add")  # not declared yet
    assert unroutable.returncode == 1
    assert "default exchange" in unroutable.stderr and "'queue_add'" in unroutable.stderr
    applied = subprocess.run(
        [amqptasks_exe(), "topology", "apply"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert applied.returncode == 0, applied.stderr
    assert send("examples.tasks.add", "--args", "[1, 2]", "--queue", "queue_add").returncode == 0
    assert (
        send(
            "examples.tasks.add",
            "--exchange",
            "direct_tasks",
            "--routing-key",
            "queue_add",
            "--priority",
            "3",
        ).returncode
        == 0
    )
    assert broker.depth("queue_add") == 2
    props = [p for p, _ in broker.get_all("queue_add")]
    assert props[1].priority == 3


def test_second_signal_is_a_cold_shutdown_that_acks_nothing(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ledger"
    w = worker_factory(cfg, "-Q", "default", ledger=ledger)
    app = App(load_config(cfg, env={}))
    app.send_task("testtasks.record", ("cold", 5.0), ignore_result=True)
    app.close()
    wait_for(lambda: "start cold" in ledger_lines(ledger), message="the task to start")
    w.signal(signal.SIGTERM)
    time.sleep(0.3)
    w.signal(signal.SIGTERM)
    assert w.wait(15) == 1
    assert "cold shutdown" in w.output()
    # Not acked: the message is back in the queue for another worker.
    wait_for(lambda: broker.depth("default") == 1, message="the message back in the queue")


def test_delay_async_publishes_and_gets_the_result(tmp_path, broker, worker_factory):
    import asyncio

    cfg = write_config(tmp_path, broker)
    worker_factory(cfg, "-Q", "default")
    app = App(load_config(cfg, env={}))

    @app.task(name="examples.tasks.add")
    def add(x: int, y: int) -> int:  # same name as the worker's task: only published here
        return x + y

    async def main() -> int:
        try:
            r = await add.delay_async(20, 22)
            return await asyncio.to_thread(r.get, 20)
        finally:
            await app.aclose()

    assert asyncio.run(main()) == 42


def test_broker_heartbeat_is_negotiated_on_worker_connections(tmp_path, broker, worker_factory):
    import urllib.parse

    from broker_fixtures import mgmt

    cfg = write_config(tmp_path, broker, broker={"url": broker.url, "heartbeat": 7})
    worker_factory(cfg, "-Q", "default")
    vh = urllib.parse.quote(broker.vhost, safe="")
    conns = wait_for(
        lambda: [
            c
            for c in mgmt("GET", f"/vhosts/{vh}/connections")
            if "amqptasks@" in c.get("client_properties", {}).get("connection_name", "")
        ],
        message="the worker's connections",
    )
    assert {c["timeout"] for c in conns} == {7}


def test_consumer_timeout_setting_bounds_hard_limits(tmp_path, broker):
    cfg = write_config(
        tmp_path,
        broker,
        broker={"url": broker.url, "consumer_timeout": 10},
        tasks={"testtasks.record": {"time_limit": 20}},
    )
    out = subprocess.run(
        [amqptasks_exe(), "worker", "--config", str(cfg)],
        cwd=ROOT,
        env=cli_env(cfg),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2  # a config error, like any other
    assert "consumer_timeout (10s" in out.stderr
