"""Delays, retries, expiry, time limits, process pool, quorum poison, reconnection."""

from __future__ import annotations

import itertools
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pika
import pytest
from broker_fixtures import ROOT, ledger_lines, wait_for, write_config, write_config_default_queue

from amqptasks import App, BrokerError, PublishNacked, load_config


def _app(cfg):
    return App(load_config(cfg, env={}))


def _tasks_cfg(tmp_path, broker, tasks=None, **extra):
    return write_config(tmp_path, broker, tasks=tasks or {}, **extra)


def test_countdown_waits_in_the_broker_not_in_the_worker(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ledger"
    worker_factory(cfg, "-Q", "default", ledger=ledger)
    app = _app(cfg)
    sent = time.time()
    app.send_task("testtasks.when", ("c",), countdown=4, ignore_result=True)
    app.close()
    time.sleep(1.5)
    # While it waits: nothing in the work queue, nothing unacked in the worker.
    info = broker.queue_info("default")
    assert info.get("messages", 0) == 0 and info.get("messages_unacknowledged", 0) == 0
    assert broker.depth("amqptasks.delay.2") == 1  # 4 s = binary 100: level 2
    wait_for(lambda: any(x.startswith("ran c") for x in ledger_lines(ledger)), timeout=15)
    ran = float(ledger_lines(ledger)[0].split()[-1])
    assert 4 - 1 <= ran - sent <= 4 + 1.5


def test_foreign_eta_is_honoured_through_the_delay_levels(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ledger"
    worker_factory(cfg, "-Q", "web_tasks", ledger=ledger)
    eta = (datetime.now(timezone.utc) + timedelta(seconds=3)).isoformat()
    sent = time.time()
    broker.publish_raw(
        "tasks", "web.x", f'{{"task": "testtasks.when", "args": ["e"], "eta": "{eta}"}}'.encode()
    )
    wait_for(lambda: ledger_lines(ledger), timeout=15, message="the eta task")
    ran = float(ledger_lines(ledger)[0].split()[-1])
    assert 3 - 1 <= ran - sent <= 3 + 1.5


def test_retry_runs_max_retries_plus_one_times_then_dead_letters(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ledger"
    worker_factory(cfg, "-Q", "default", ledger=ledger)
    app = _app(cfg)
    r = app.send_task("testtasks.flaky", ("f", 1.0))
    with pytest.raises(RuntimeError, match="flaky f"):
        r.get(timeout=30)  # only the final attempt answers
    app.close()
    runs = [line.split() for line in ledger_lines(ledger)]
    assert [int(x[2]) for x in runs] == [0, 1, 2, 3]
    times = [float(x[3]) for x in runs]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(0.5 <= g <= 2.5 for g in gaps), gaps
    wait_for(lambda: broker.depth("default.dlq") == 1, message="the final failure in the DLQ")
    [(props, _)] = broker.get_all("default.dlq")
    h = props.headers
    assert h["x-amqptasks-reason"] == "task-failed"
    assert h["x-amqptasks-attempts"] == 4
    assert h["x-amqptasks-exception-type"] == "RuntimeError"
    assert h["x-amqptasks-original-exchange"] == "tasks"
    assert h["x-amqptasks-original-routing-key"] == "task.default"
    assert h["x-amqptasks-first-failed-at"] < h["x-amqptasks-last-failed-at"]
    assert "x-death" not in h or all(d["queue"] != "default" for d in h["x-death"])


def test_autoretry_with_exponential_backoff(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ledger"
    worker_factory(cfg, "-Q", "default", ledger=ledger)
    app = _app(cfg)
    app.send_task("testtasks.auto", ("a",), ignore_result=True)
    app.close()
    wait_for(lambda: broker.depth("default.dlq") == 1, timeout=20, message="the DLQ copy")
    times = [float(line.split()[-1]) for line in ledger_lines(ledger)]
    assert len(times) == 3  # max_retries=2 -> 3 executions
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert 0.5 <= gaps[0] <= 2.0 and 1.5 <= gaps[1] <= 3.0, gaps  # 1 s then 2 s


def test_retry_policy_from_yaml_overrides_defaults(tmp_path, broker, worker_factory):
    cfg = _tasks_cfg(
        tmp_path,
        broker,
        tasks={
            "testtasks.auto*": {"max_retries": 0},
        },
    )
    ledger = tmp_path / "ledger"
    worker_factory(cfg, "-Q", "default", ledger=ledger)
    app = _app(cfg)
    app.send_task("testtasks.auto", ("y",), ignore_result=True)
    app.close()
    wait_for(lambda: broker.depth("default.dlq") == 1, message="the DLQ copy")
    # The decorator said max_retries=2, but explicit decorator args win over YAML: 3 runs.
    assert len(ledger_lines(ledger)) == 3


def test_yaml_fills_what_the_decorator_left_unset(tmp_path, broker, worker_factory):
    cfg = _tasks_cfg(
        tmp_path,
        broker,
        tasks={
            "testtasks.fail": {
                "autoretry_for": ["ValueError"],
                "max_retries": 1,
                "default_retry_delay": 1,
            },
        },
    )
    ledger = tmp_path / "ledger"
    w = worker_factory(cfg, "-Q", "default", ledger=ledger)
    app = _app(cfg)
    app.send_task("testtasks.fail", ("boom",), ignore_result=True)
    app.close()
    wait_for(lambda: broker.depth("default.dlq") == 1, message="the DLQ copy")
    assert w.output().count("retry 1 in") == 1


def test_expired_task_is_not_run_and_lands_in_dlq(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ledger"
    w = worker_factory(cfg, "-Q", "default", ledger=ledger)
    w.stop()  # declared; nobody consumes now
    app = _app(cfg)
    app.send_task("testtasks.record", ("old",), expires=1, ignore_result=True)
    app.close()
    time.sleep(1.5)
    worker_factory(cfg, "-Q", "default", ledger=ledger)
    wait_for(lambda: broker.depth("default.dlq") == 1, message="the expired message")
    [(props, _)] = broker.get_all("default.dlq")
    assert props.headers["x-amqptasks-reason"] == "expired"
    assert ledger_lines(ledger) == []


def test_thread_soft_limit_raises_inside_and_hard_limit_settles(tmp_path, broker, worker_factory):
    cfg = _tasks_cfg(
        tmp_path,
        broker,
        tasks={
            "testtasks.busy": {"soft_time_limit": 1},
            "testtasks.record": {"time_limit": 1},
        },
    )
    ledger = tmp_path / "ledger"
    worker_factory(cfg, "-Q", "default", ledger=ledger)
    app = _app(cfg)
    try:
        assert app.send_task("testtasks.busy", ("s", 10)).get(timeout=20) == "cleaned up"
        start = time.monotonic()
        hard = app.send_task("testtasks.record", ("h", 6))
        with pytest.raises(Exception) as err:
            hard.get(timeout=20)
        assert type(err.value).__name__ == "TimeLimitExceeded"
        assert time.monotonic() - start < 4
    finally:
        app.close()
    wait_for(lambda: broker.depth("default.dlq") == 1, message="the time-limit DLQ copy")
    [(props, _)] = broker.get_all("default.dlq")
    assert props.headers["x-amqptasks-reason"] == "time-limit"


def test_hard_limit_not_below_consumer_timeout_is_refused(tmp_path, broker):
    cfg = _tasks_cfg(tmp_path, broker, tasks={"testtasks.record": {"time_limit": 3600}})
    out = subprocess.run(
        [str(ROOT / ".venv/bin/amqptasks"), "worker", "--config", str(cfg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=__import__("broker_fixtures").cli_env(cfg),
    )
    assert out.returncode == 2  # a config error, like any other
    assert "time_limit 3600s is not below the broker's consumer_timeout" in out.stderr


def test_process_pool_runs_tasks_and_recycles_children(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ledger"
    w = worker_factory(
        cfg,
        "-Q",
        "default",
        "--pool",
        "processes",
        "-c",
        "1",
        "--max-tasks-per-child",
        "2",
        ledger=ledger,
    )
    assert "max-tasks-per-child=2" in w.output()
    app = _app(cfg)
    try:
        pids = [app.send_task("testtasks.pid", (str(i),)).get(timeout=30) for i in range(4)]
        assert app.send_task("examples.tasks.add", (2, 3)).get(timeout=30) == 5
    finally:
        app.close()
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[1] != pids[2]
    assert w.proc.pid not in pids


def test_process_pool_max_memory_per_child(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ledger"
    worker_factory(
        cfg,
        "-Q",
        "default",
        "--pool",
        "processes",
        "-c",
        "1",
        "--max-memory-per-child",
        "100000",
        ledger=ledger,
    )
    app = _app(cfg)
    try:
        small = app.send_task("testtasks.pid", ("a",)).get(timeout=30)
        assert app.send_task("testtasks.pid", ("b",)).get(timeout=30) == small
        big = app.send_task("testtasks.hog", (200,)).get(timeout=30)
        after = app.send_task("testtasks.pid", ("c",)).get(timeout=30)
    finally:
        app.close()
    assert big == small and after != big  # the child passed 100 MB and was replaced


def test_process_child_killed_mid_task_is_retried_and_replaced(tmp_path, broker, worker_factory):
    cfg = _tasks_cfg(tmp_path, broker, tasks={"testtasks.crash_once": {"default_retry_delay": 1}})
    ledger = tmp_path / "ledger"
    w = worker_factory(cfg, "-Q", "default", "--pool", "processes", "-c", "2", ledger=ledger)
    app = _app(cfg)
    try:
        assert app.send_task("testtasks.crash_once", ("x",)).get(timeout=30) == "x"
        assert app.send_task("examples.tasks.add", (1, 1)).get(timeout=30) == 2
    finally:
        app.close()
    assert ledger_lines(ledger) == ["start x", "start x", "done x"]
    assert "died running testtasks.crash_once" in w.output()
    assert w.proc.poll() is None


def test_process_hard_limit_kills_the_child(tmp_path, broker, worker_factory):
    cfg = _tasks_cfg(
        tmp_path, broker, tasks={"testtasks.record": {"time_limit": 1, "soft_time_limit": 0.5}}
    )
    ledger = tmp_path / "ledger"
    worker_factory(cfg, "-Q", "default", "--pool", "processes", "-c", "1", ledger=ledger)
    app = _app(cfg)
    try:
        r = app.send_task("testtasks.record", ("p", 5))
        with pytest.raises(Exception) as err:
            r.get(timeout=20)
        # time.sleep in the child is interrupted by SIGALRM: the soft limit hits first.
        assert type(err.value).__name__ in ("SoftTimeLimitExceeded", "TimeLimitExceeded")
        assert app.send_task("examples.tasks.add", (2, 2)).get(timeout=30) == 4
    finally:
        app.close()
    assert "done p" not in ledger_lines(ledger)


def test_quorum_poison_message_lands_in_dlq_after_delivery_limit(tmp_path, broker, worker_factory):
    cfg = write_config_default_queue(tmp_path, broker, type="quorum", delivery_limit=2)
    ledger = tmp_path / "ledger"
    first = worker_factory(cfg, "-Q", "default", ledger=ledger)
    first.stop()
    app = _app(cfg)
    app.send_task("testtasks.record", ("before",), ignore_result=True)
    app.send_task("testtasks.record", ("poison", 30), ignore_result=True)
    app.send_task("testtasks.record", ("after",), ignore_result=True)
    app.close()
    # Crash loop: every worker dies (kill -9) while the poison message runs.
    for _ in range(6):
        w = worker_factory(
            cfg, "-Q", "default", "-c", "1", "--prefetch-multiplier", "1", ledger=ledger
        )
        try:
            wait_for(
                lambda: (
                    (
                        ledger_lines(ledger).count("start poison") > 0
                        and ledger_lines(ledger)[-1] == "start poison"
                    )
                    or broker.depth("default.dlq") == 1
                ),
                timeout=20,
            )
        finally:
            w.proc.kill()
            w.wait()
        if broker.depth("default.dlq") == 1:
            break
    w = worker_factory(cfg, "-Q", "default", ledger=ledger)
    wait_for(lambda: "done after" in ledger_lines(ledger), message="the neighbour after poison")
    assert broker.depth("default.dlq") == 1
    [(props, _)] = broker.get_all("default.dlq")
    assert props.headers["x-death"][0]["reason"] == "delivery_limit"
    lines = ledger_lines(ledger)
    assert lines.count("done before") == 1 and lines.count("done after") == 1
    assert "done poison" not in lines


def test_full_reject_publish_queue_raises_to_the_publisher(tmp_path, broker, worker_factory):
    cfg = write_config_default_queue(tmp_path, broker, max_length=2, overflow="reject-publish")
    w = worker_factory(cfg, "-Q", "web_tasks,default")
    w.stop()
    app = _app(cfg)
    try:
        app.send_task("x", ignore_result=True)
        app.send_task("x", ignore_result=True)
        with pytest.raises(PublishNacked):
            app.send_task("x", ignore_result=True)
    finally:
        app.close()
    assert broker.depth("default") == 2


def test_oversized_body_is_dead_lettered_unread(tmp_path, broker, worker_factory):
    cfg = write_config(
        tmp_path, broker, serialization={"accept": ["application/json"], "max_body_size": 1000}
    )
    worker_factory(cfg, "-Q", "web_tasks")
    body = b'{"task": "testtasks.record", "args": ["' + b"x" * 2000 + b'"]}'
    broker.publish_raw("tasks", "web.big", body, pika.BasicProperties(message_id="big-1"))
    wait_for(lambda: broker.depth("web_tasks.dlq") == 1, message="the oversized message")
    [(props, got)] = broker.get_all("web_tasks.dlq")
    assert props.headers["x-amqptasks-reason"] == "too-large" and got == body


def test_worker_resumes_after_broker_restart_and_publish_while_down_raises(
    tmp_path, broker, worker_factory
):
    cfg = write_config(tmp_path, broker, broker={"url": broker.url, "publish_timeout": 3})
    ledger = tmp_path / "ledger"
    w = worker_factory(cfg, "-Q", "default", ledger=ledger)
    app = _app(cfg)
    ctl = [str(ROOT / "deploy" / "broker.sh"), "ctl"]
    try:
        assert app.send_task("examples.tasks.add", (1, 2)).get(timeout=20) == 3
        subprocess.run([*ctl, "stop_app"], check=True, capture_output=True, timeout=120)
        try:
            start = time.monotonic()
            with pytest.raises(BrokerError):
                app.send_task("testtasks.record", ("down",), ignore_result=True)
            assert time.monotonic() - start < 10
        finally:
            subprocess.run([*ctl, "start_app"], check=True, capture_output=True, timeout=120)
        wait_for(
            lambda: w.output().count("ready: consuming") >= 2,
            timeout=60,
            message="the worker to reconnect",
        )
        app.send_task("testtasks.record", ("up",), ignore_result=True)
        wait_for(lambda: "done up" in ledger_lines(ledger), timeout=30)
    finally:
        app.close()
    assert "down" not in " ".join(ledger_lines(ledger))
    assert w.proc.poll() is None


def test_delays_reach_quorum_queues_and_direct_routes(tmp_path, broker, worker_factory):
    cfg = write_config_default_queue(
        tmp_path,
        broker,
        type="quorum",
        others=("queue_add",),
        routes={"testtasks.when": {"exchange": "direct_tasks", "routing_key": "queue_add"}},
    )
    ledger = tmp_path / "ledger"
    worker_factory(cfg, "-Q", "default,queue_add", ledger=ledger)
    app = _app(cfg)
    sent = time.time()
    try:
        app.send_task("testtasks.when", ("direct",), countdown=2, ignore_result=True)
        app.send_task("testtasks.record", ("quorum",), countdown=2, ignore_result=True)
    finally:
        app.close()
    wait_for(lambda: len(ledger_lines(ledger)) == 3, timeout=20, message="both delayed tasks")
    ran = [line for line in ledger_lines(ledger) if line.startswith("ran direct")]
    assert ran and 1 <= float(ran[0].split()[-1]) - sent <= 3.5
    assert "done quorum" in ledger_lines(ledger)
    assert time.time() - sent >= 1.5


def test_publish_under_a_resource_alarm_waits_the_bound_then_raises(tmp_path, broker):
    import asyncio

    from amqptasks import PublishTimeout
    from amqptasks.transport.aio import declare_topology

    cfg = write_config(tmp_path, broker, broker={"url": broker.url, "publish_timeout": 2})
    app = _app(cfg)
    asyncio.run(declare_topology(broker.url, app.settings.topology))
    ctl = [str(ROOT / "deploy" / "broker.sh"), "ctl"]
    app.send_task("testtasks.record", ("before",), ignore_result=True)  # connected
    subprocess.run(
        [*ctl, "set_vm_memory_high_watermark", "0.000001"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    try:
        time.sleep(1)  # the alarm blocks publishing connections (connection.blocked)
        start = time.monotonic()
        with pytest.raises((PublishTimeout, BrokerError)):
            app.send_task("testtasks.record", ("blocked",), ignore_result=True)
        waited = time.monotonic() - start
        assert 1.5 <= waited < 6
    finally:
        subprocess.run(
            [*ctl, "set_vm_memory_high_watermark", "0.4"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        app.close()


@pytest.mark.parametrize("pool", ["threads", "processes"])
def test_expiry_is_checked_again_when_a_slot_frees(tmp_path, broker, worker_factory, pool):
    """A message that waited for a free slot behind long tasks past its ``expires`` does not
    start: it lands in the DLQ with reason ``expired``."""
    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ledger"
    worker_factory(cfg, "-Q", "default", "-c", "2", "--pool", pool, ledger=ledger)
    app = _app(cfg)
    for tag in ("long1", "long2"):
        app.send_task("testtasks.record", (tag, 3), ignore_result=True)
    wait_for(
        lambda: {"start long1", "start long2"} <= set(ledger_lines(ledger)),
        message="both slots busy",
    )
    app.send_task("testtasks.record", ("late",), expires=1, ignore_result=True)
    app.close()
    wait_for(lambda: broker.depth("default.dlq") == 1, timeout=15, message="the expired one")
    [(props, _)] = broker.get_all("default.dlq")
    assert props.headers["x-amqptasks-reason"] == "expired"
    assert "free slot" in props.headers["x-amqptasks-detail"]
    wait_for(lambda: "done long2" in ledger_lines(ledger), message="the long tasks")
    assert not any("late" in line for line in ledger_lines(ledger))
