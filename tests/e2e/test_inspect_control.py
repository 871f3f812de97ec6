"""``amqptasks inspect`` / ``amqptasks control`` through the real CLI against real workers.

Every ``--json`` answer is validated against schema/control-v1.json: these are the formats
the dashboard is built on.
"""

from __future__ import annotations

import contextlib
import json
import urllib.parse
import uuid

from broker_fixtures import (
    ledger_lines,
    mgmt,
    wait_for,
    write_config,
)
from control_cli import answers, run_cli

from amqptasks import App, load_config


def test_two_workers_answer_ping_and_active_and_shutdown_stops_only_the_one_named(
    tmp_path, broker, worker_factory
):
    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ledger"
    w1 = worker_factory(cfg, "-Q", "default", "-n", "w1@host", ledger=ledger)
    w2 = worker_factory(cfg, "-Q", "web_tasks", "-n", "w2@host", ledger=ledger)
    both = "w1@host,w2@host"

    pong = answers(cfg, "inspect", "ping", "-d", both)
    assert set(pong) == {"w1@host", "w2@host"}
    human = run_cli(cfg, "inspect", "ping")
    assert human.returncode == 0
    assert "w1@host: pong" in human.stdout and "w2@host: pong" in human.stdout

    app = App(load_config(cfg, env={}))
    try:
        one = app.send_task("testtasks.record", ("one", 4.0), queue="default", ignore_result=True)
        two = app.send_task("testtasks.record", ("two", 4.0), queue="web_tasks", ignore_result=True)
    finally:
        app.close()
    wait_for(lambda: {"start one", "start two"} <= set(ledger_lines(ledger)), message="starts")
    active = answers(cfg, "inspect", "active", "-d", both)
    [on1], [on2] = active["w1@host"], active["w2@host"]
    assert (on1["id"], on1["task"], on1["queue"], on1["args"]) == (
        one.id,
        "testtasks.record",
        "default",
        '["one",4.0]',
    )
    assert (on2["id"], on2["queue"]) == (two.id, "web_tasks")
    assert on1["pid"] == w1.proc.pid and on2["pid"] == w2.proc.pid and on1["runtime"] >= 0
    table = run_cli(cfg, "inspect", "active", "-d", both)
    assert one.id in table.stdout and two.id in table.stdout and "runtime" in table.stdout

    stop = run_cli(cfg, "control", "shutdown", "-d", "w1@host")
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout.strip() == "w1@host: warm shutdown started (1 task(s) running)"
    assert w1.wait(30) == 0, w1.output()
    assert "done one" in ledger_lines(ledger)  # warm: the running task finished first
    assert w2.proc.poll() is None
    after = run_cli(cfg, "inspect", "ping", "-d", both)
    assert after.returncode == 1
    assert "w2@host: pong" in after.stdout
    assert "error: no answer from w1@host within 1.0s" in after.stderr


def test_inspect_reserved_active_query_stats_registered_and_conf_show_real_values(
    tmp_path, broker, worker_factory
):
    user, password = f"u{uuid.uuid4().hex[:6]}", "s3cr3t-Pw"
    vh = urllib.parse.quote(broker.vhost, safe="")
    mgmt("PUT", f"/users/{user}", {"password": password, "tags": ""})
    try:
        mgmt("PUT", f"/permissions/{vh}/{user}", {"configure": ".*", "write": ".*", "read": ".*"})
        url = broker.url.replace("guest:guest", f"{user}:{password}")
        cfg = write_config(tmp_path, broker, broker={"url": url})
        ledger = tmp_path / "ledger"
        w = worker_factory(cfg, "-Q", "default", "-c", "1", "-n", "solo@host", ledger=ledger)
        app = App(load_config(cfg, env={}))
        try:
            assert app.send_task("examples.tasks.add", (2, 3)).get(timeout=20) == 5
            failed = app.send_task("testtasks.fail", ("nope",))
            with contextlib.suppress(ValueError):
                failed.get(timeout=20)
            busy = app.send_task("testtasks.record", ("busy", 4.0), ignore_result=True)
            waiting = [
                app.send_task("testtasks.record", (f"w{i}",), ignore_result=True) for i in range(2)
            ]
        finally:
            app.close()
        wait_for(lambda: "start busy" in ledger_lines(ledger), message="the busy task to start")
        solo = ("-d", "solo@host")

        reserved = wait_for(
            lambda: (
                (r := answers(cfg, "inspect", "reserved", *solo)["solo@host"]) and len(r) == 2 and r
            ),
            message="two reserved deliveries",
        )
        assert [(h["id"], h["args"], h["queue"]) for h in reserved] == [
            (waiting[0].id, '["w0"]', "default"),
            (waiting[1].id, '["w1"]', "default"),
        ]
        assert all("started" not in h for h in reserved)
        [running] = answers(cfg, "inspect", "active", *solo)["solo@host"]
        assert running["id"] == busy.id and running["started"] and running["runtime"] >= 0

        states = answers(cfg, "inspect", "query-task", busy.id, waiting[0].id, "no-such-id", *solo)[
            "solo@host"
        ]
        assert {k: v["state"] for k, v in states.items()} == {
            busy.id: "active",
            waiting[0].id: "reserved",
            "no-such-id": "unknown",
        }

        stats = answers(cfg, "inspect", "stats", *solo)["solo@host"]
        assert stats["pid"] == w.proc.pid
        assert (stats["pool"], stats["concurrency"], stats["prefetch"]) == ("threads", 1, 4)
        assert stats["queues"] == ["default"] and stats["processed"] == 2
        assert stats["by_task"] == {
            "examples.tasks.add": {"succeeded": 1},
            "testtasks.fail": {"failed": 1},
        }
        assert (stats["running"], stats["reserved"]) == (1, 2)
        assert stats["rusage"]["maxrss_kib"] > 0 and stats["events"]["enabled"] is False

        registered = answers(cfg, "inspect", "registered", *solo)["solo@host"]
        assert registered["examples.web.sendmail"]["async"] is True
        assert registered["testtasks.early"]["policy"]["acks_early"] is True
        assert registered["testtasks.auto"]["policy"]["max_retries"] == 2
        assert registered["testtasks.auto"]["policy"]["autoretry_for"] == ["ConnectionError"]
        assert registered["examples.tasks.add"]["policy"]["max_retries"] == 3

        conf_out = run_cli(cfg, "inspect", "conf", "--json", *solo)
        human_conf = run_cli(cfg, "inspect", "conf", *solo)
        for text in (conf_out.stdout, conf_out.stderr, human_conf.stdout, human_conf.stderr):
            assert password not in text
        conf = json.loads(conf_out.stdout)["solo@host"]["result"]
        assert conf["broker"]["url"].startswith(f"amqp://{user}:***@")
        assert conf["queues"] == ["default"] and conf["worker"]["concurrency"] == 1
        assert conf["hostname"] == "solo@host" and conf["source"] == str(cfg)
    finally:
        mgmt("DELETE", f"/users/{user}", ok=(204, 404))


def test_add_and_cancel_consumer_change_what_a_worker_consumes_even_after_a_reconnect(
    tmp_path, broker, worker_factory
):
    cfg = write_config(tmp_path, broker)
    assert run_cli(cfg, "topology", "apply").returncode == 0  # web_tasks exists, unconsumed
    ledger = tmp_path / "ledger"
    w = worker_factory(cfg, "-Q", "default", "-n", "w1@host", ledger=ledger)
    app = App(load_config(cfg, env={}))
    try:
        app.send_task("testtasks.record", ("web1",), queue="web_tasks", ignore_result=True)
        wait_for(lambda: broker.depth("web_tasks") == 1, message="web1 waiting in web_tasks")

        added = run_cli(cfg, "control", "add-consumer", "web_tasks", "-d", "w1@host")
        assert added.returncode == 0, added.stderr
        assert added.stdout.strip() == "w1@host: consuming default, web_tasks"
        wait_for(lambda: "done web1" in ledger_lines(ledger), message="web1 to run")

        cancelled = answers(cfg, "control", "cancel-consumer", "default", "-d", "w1@host")
        assert cancelled == {"w1@host": {"queues": ["web_tasks"]}}
        app.send_task("testtasks.record", ("def1",), queue="default", ignore_result=True)
        app.send_task("testtasks.record", ("web2",), queue="web_tasks", ignore_result=True)
        wait_for(lambda: "done web2" in ledger_lines(ledger), message="web2 to run")
        assert "done def1" not in ledger_lines(ledger) and broker.depth("default") == 1

        for args, error in [
            (("add-consumer", "nope"), "UnknownQueue: queue 'nope' is not declared"),
            (("add-consumer", "web_tasks"), "AlreadyConsuming"),
            (("cancel-consumer", "default"), "NotConsuming"),
        ]:
            out = run_cli(cfg, "control", *args, "-d", "w1@host")
            assert out.returncode == 1 and f"w1@host: error {error}" in out.stdout, out.stdout

        # A lost connection: the worker comes back consuming what it was told, not -Q.
        vh = urllib.parse.quote(broker.vhost, safe="")
        [consumer] = wait_for(
            lambda: [
                c
                for c in mgmt("GET", f"/vhosts/{vh}/connections")
                if c.get("client_properties", {}).get("connection_name") == "w1@host consumer"
            ],
            message="the worker's consuming connection in the management API",
        )
        mgmt("DELETE", f"/connections/{urllib.parse.quote(consumer['name'], safe='')}")
        wait_for(lambda: "consuming again: web_tasks" in w.output(), message="the reconnect")
        app.send_task("testtasks.record", ("web3",), queue="web_tasks", ignore_result=True)
        wait_for(lambda: "done web3" in ledger_lines(ledger), message="web3 to run")
        assert "done def1" not in ledger_lines(ledger)
        assert answers(cfg, "inspect", "stats", "-d", "w1@host")["w1@host"]["queues"] == [
            "web_tasks"
        ]
    finally:
        app.close()


def test_no_worker_answering_exits_1_and_says_so(tmp_path, broker):
    cfg = write_config(tmp_path, broker)
    before = run_cli(cfg, "inspect", "ping")  # nothing declared the control exchange yet
    assert before.returncode == 1, before.stderr
    assert before.stderr.strip() == "error: no worker answered within 1.0s"
    assert run_cli(cfg, "topology", "apply").returncode == 0
    out = run_cli(cfg, "control", "shutdown", "--timeout", "0.5")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip() == "error: no worker answered within 0.5s"
    bad = run_cli(cfg, "inspect", "query-task")
    assert bad.returncode == 2 and "Missing argument" in bad.stderr
