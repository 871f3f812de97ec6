"""The real CLI as subprocesses against the real broker, the way a user runs it."""

from __future__ import annotations

import json
import os
import pickle
import signal
import time
import urllib.parse
import uuid

import pika
import pytest
from broker_fixtures import (
    ledger_lines,
    mgmt,
    run_cli,
    wait_for,
    write_config,
)

from amqptasks import App, ResultsDisabled, ResultTimeout, TaskError, load_config


def dlq_reasons(broker, queue):
    return [
        (props.headers or {}).get("x-amqptasks-reason")
        for props, _ in broker.get_all(queue + ".dlq")
    ]


def test_minimal_raw_pika_message_runs_on_web_tasks_worker(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ledger"
    worker_factory(cfg, "--queues", "web_tasks", ledger=ledger)
    # Plain pika, no properties at all, routing key matched only by the 'web.#' binding.
    broker.publish_raw("tasks", "web.anything", b'{"task": "testtasks.record", "args": ["raw"]}')
    wait_for(lambda: "done raw" in ledger_lines(ledger), message="the raw task to run")
    wait_for(
        lambda: (
            broker.depth("web_tasks") == 0
            and broker.queue_info("web_tasks").get("messages_unacknowledged", 1) == 0
        ),
        timeout=15,
        interval=0.5,
        message="the delivery to be acked",
    )
    assert ledger_lines(ledger) == ["start raw", "done raw"]


def test_foreign_client_gets_a_json_reply_over_direct_reply_to(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    worker_factory(cfg, "-Q", "default")
    conn = broker.connect()
    ch = conn.channel()
    replies = []
    ch.basic_consume(
        "amq.rabbitmq.reply-to",
        lambda c, m, p, b: replies.append((p, json.loads(b))),
        auto_ack=True,
    )
    ch.basic_publish(
        "tasks",
        "task.add",
        b'{"task": "examples.tasks.add", "args": [2, 3]}',
        pika.BasicProperties(reply_to="amq.rabbitmq.reply-to", correlation_id="corr-1"),
    )
    deadline = time.monotonic() + 20
    while not replies and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.2)
    [(props, body)] = replies
    assert props.correlation_id == "corr-1"
    assert body["status"] == "SUCCESS" and body["result"] == 5
    assert body["task"] == "examples.tasks.add"


def test_bad_messages_go_to_the_dlq_with_reasons_and_the_worker_keeps_serving(
    tmp_path, broker, worker_factory
):
    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ledger"
    worker = worker_factory(cfg, "--queues", "web_tasks", ledger=ledger)
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"task": "testtasks.record", "args": ["x"]})
    evil_code = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    cases = [
        (b'{"task": "no.such.task", "args": []}', None),
        (b"{not json", None),
        (b'["task", "args"]', None),
        (evil, "application/x-python-serialize"),
        (evil_code, "application/x-python-serialize"),
    ]
    for body, ctype in cases:
        broker.publish_raw(
            "tasks",
            "web.bad",
            body,
            pika.BasicProperties(content_type=ctype, message_id=str(uuid.uuid4())),
        )
    broker.publish_raw("tasks", "web.ok", b'{"task": "testtasks.record", "args": ["after"]}')
    wait_for(lambda: "done after" in ledger_lines(ledger), message="the good task after bad ones")
    wait_for(lambda: broker.depth("web_tasks.dlq") == 5, message="5 dead letters")
    dead = broker.get_all("web_tasks.dlq")
    headers = [p.headers for p, _ in dead]
    reasons = [h["x-amqptasks-reason"] for h in headers]
    assert reasons == [
        "unknown-task",
        "decode-error",
        "decode-error",
        "content-type-refused",
        "content-type-refused",
    ]
    assert "no.such.task" in headers[0]["x-amqptasks-detail"]
    assert headers[0]["x-amqptasks-original-routing-key"] == "web.bad"
    assert headers[0]["x-amqptasks-queue"] == "web_tasks"
    assert [b for _, b in dead][1] == b"{not json"  # the body is kept untouched for replay
    assert not marker.exists()
    assert worker.proc.poll() is None
    assert broker.depth("web_tasks") == 0


def test_failed_task_lands_in_dlq_and_result_reraises_its_type(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    worker_factory(cfg, "-Q", "default")
    app = App(load_config(cfg, env={}))
    try:
        ok = app.send_task("examples.tasks.add", (2, 3))
        assert ok.get(timeout=20) == 5 and ok.status == "SUCCESS" and ok.ready()
        bad = app.send_task("examples.tasks.reduce", ([1, 2],), {"op": "pow"})
        with pytest.raises(ValueError) as err:
            bad.get(timeout=20)
        assert isinstance(err.value, TaskError)
        assert type(err.value).__name__ == "ValueError"
        assert "unknown op 'pow'" in str(err.value)
        assert bad.status == "FAILURE"
        with pytest.raises(ResultsDisabled):
            app.send_task("testtasks.quiet", ("q1",), ignore_result=True).get(timeout=1)
        # The worker honours the task's own ignore_result even when a caller asks for a reply.
        asked = app.send_task("testtasks.quiet", ("q2",), ignore_result=False)
        with pytest.raises(ResultTimeout):
            asked.get(timeout=2)
    finally:
        app.close()
    wait_for(lambda: broker.depth("default.dlq") == 1, message="the failure in the DLQ")
    [(props, _)] = broker.get_all("default.dlq")
    h = props.headers
    assert h["x-amqptasks-reason"] == "task-failed"
    assert h["x-amqptasks-exception-type"] == "ValueError"
    assert "unknown op" in h["x-amqptasks-exception-message"]
    assert "Traceback" in h["x-amqptasks-traceback"]
    assert h["x-amqptasks-worker"].startswith("amqptasks@")


def test_kill_9_mid_task_redelivers_and_runs_after_restart(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ledger"
    first = worker_factory(cfg, "-Q", "default", ledger=ledger)
    app = App(load_config(cfg, env={}))
    app.send_task("testtasks.record", ("k", 3.0), ignore_result=True)
    app.close()
    wait_for(lambda: "start k" in ledger_lines(ledger), message="the task to start")
    first.proc.kill()
    first.wait()
    assert "done k" not in ledger_lines(ledger)
    worker_factory(cfg, "-Q", "default", ledger=ledger)
    wait_for(lambda: "done k" in ledger_lines(ledger), timeout=30, message="the redelivery")
    assert ledger_lines(ledger) == ["start k", "start k", "done k"]
    wait_for(lambda: broker.depth("default") == 0, message="an empty queue")


def test_sigterm_mid_task_finishes_it_exits_0_and_returns_unstarted(
    tmp_path, broker, worker_factory
):
    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ledger"
    worker = worker_factory(
        cfg, "-Q", "default", "-c", "1", "--prefetch-multiplier", "4", ledger=ledger
    )
    app = App(load_config(cfg, env={}))
    app.send_task("testtasks.record", ("long", 2.0), ignore_result=True)
    for i in range(3):
        app.send_task("testtasks.record", (f"later{i}",), ignore_result=True)
    app.close()
    wait_for(lambda: "start long" in ledger_lines(ledger), message="the long task to start")
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.output()
    assert ledger_lines(ledger) == ["start long", "done long"]
    assert "warm shutdown" in worker.output()
    # The three prefetched-but-unstarted messages are back in the queue, none lost.
    wait_for(lambda: broker.depth("default") == 3, message="3 requeued messages")


def test_send_cli_prints_id_and_waits_for_result(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    worker_factory(cfg, "-Q", "default,web_tasks")
    out = run_cli(cfg, "send", "examples.tasks.add", "--args", "[20, 22]", "--wait", "20")
    assert out.returncode == 0, out.stderr
    task_id, result = out.stdout.strip().splitlines()
    uuid.UUID(task_id)
    assert result == "result: 42"
    out = run_cli(
        cfg, "send", "examples.web.sendmail", "--args", '["bob@example.com"]', "--wait", "20"
    )
    assert out.stdout.strip().splitlines()[1] == "result: 'mail sent to bob@example.com'"
    out = run_cli(cfg, "send", "examples.tasks.add", "--args", "{}")
    assert out.returncode == 2 and "--args" in out.stderr
    out = run_cli(cfg, "send", "examples.tasks.add", "--routing-key", "nowhere")
    assert out.returncode == 1 and "unroutable" in out.stderr and "Traceback" not in out.stderr


def test_prefetch_is_concurrency_times_multiplier_per_consumer(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    worker_factory(cfg, "-Q", "default,web_tasks", "-c", "3", "--prefetch-multiplier", "5")
    vh = urllib.parse.quote(broker.vhost, safe="")
    consumers = wait_for(
        lambda: [
            c
            for c in mgmt("GET", f"/consumers/{vh}")
            if c["queue"]["name"] in ("default", "web_tasks")
        ],
        message="consumers to be listed",
    )
    assert sorted(c["queue"]["name"] for c in consumers) == ["default", "web_tasks"]
    assert {c["prefetch_count"] for c in consumers} == {15}
    assert all(c["ack_required"] for c in consumers)


@pytest.mark.parametrize("pool", ["threads", "asyncio"])
def test_both_pools_run_sync_and_async_tasks(tmp_path, broker, worker_factory, pool):
    cfg = write_config(tmp_path, broker)
    w = worker_factory(cfg, "-Q", "default,web_tasks", "--pool", pool, "-c", "2")
    assert f"pool:        {pool}" in w.output()
    app = App(load_config(cfg, env={}))
    try:
        assert app.send_task("examples.tasks.sum_all", (1, 2, 3)).get(timeout=20) == 6
        assert (
            app.send_task("examples.web.sendmail", ("x@y",)).get(timeout=20) == "mail sent to x@y"
        )
    finally:
        app.close()


def test_acks_early_task_is_acked_before_it_runs(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ledger"
    first = worker_factory(cfg, "-Q", "default", ledger=ledger)
    app = App(load_config(cfg, env={}))
    app.send_task("testtasks.early", ("e", 3.0), ignore_result=True)
    app.close()
    wait_for(lambda: "start e" in ledger_lines(ledger), message="the early task to start")
    first.proc.kill()
    first.wait()
    # At-most-once by the task's own choice: killed mid-run, it is not redelivered.
    time.sleep(1)
    assert broker.depth("default") == 0
    assert ledger_lines(ledger) == ["start e"]


def test_banner_lists_queues_bindings_tasks_and_hides_the_password(
    tmp_path, broker, worker_factory
):
    user, password = f"u{uuid.uuid4().hex[:6]}", "s3cr3t-Pw"
    vh = urllib.parse.quote(broker.vhost, safe="")
    mgmt("PUT", f"/users/{user}", {"password": password, "tags": ""})
    try:
        mgmt("PUT", f"/permissions/{vh}/{user}", {"configure": ".*", "write": ".*", "read": ".*"})
        url = broker.url.replace("guest:guest", f"{user}:{password}")
        cfg = write_config(tmp_path, broker, broker={"url": url})
        w = worker_factory(cfg, "--queues", "web_tasks")
        out = w.output()
        assert password not in out
        assert f"{user}:***@" in out
        assert "web_tasks" in out and "<- tasks [web.#]" in out
        assert "examples.web.sendmail  (async)" in out and "examples.tasks.add" in out
    finally:
        mgmt("DELETE", f"/users/{user}", ok=(204, 404))


def test_cli_reports_config_errors_with_file_and_key(tmp_path, broker):
    cfg = write_config(tmp_path, broker, worker={"concurrency": 0})
    out = run_cli(cfg, "worker")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"error: {cfg}: worker.concurrency: expected a positive integer, got an integer 0"
    )


def test_topology_show_and_apply_cli(tmp_path, broker):
    cfg = write_config(tmp_path, broker)
    shown = run_cli(cfg, "topology", "show")
    assert shown.returncode == 0
    for text in (
        "amqptasks.dlx",
        "web_tasks.dlq",
        "x-dead-letter-exchange=amqptasks.dlx",
        "tasks --[web.#]--> web_tasks",
        "examples.web.* -> tasks [web.render]",
    ):
        assert text in shown.stdout
    applied = run_cli(cfg, "topology", "apply")
    assert applied.returncode == 0, applied.stderr
    assert broker.depth("queue_add.dlq") == 0  # exists now
    again = run_cli(cfg, "topology", "apply")
    assert again.returncode == 0
    ch = broker.channel()
    ch.queue_delete("queue_add")
    ch.queue_declare("queue_add", durable=True, arguments={"x-queue-type": "quorum"})
    clash = run_cli(cfg, "topology", "apply")
    assert clash.returncode == 1
    assert "queue 'queue_add'" in clash.stderr and "Traceback" not in clash.stderr
    assert os.path.exists(cfg)
