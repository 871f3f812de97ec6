"""``amqptasks dlq list|show|replay|purge`` through the real CLI."""

from __future__ import annotations

import subprocess

from broker_fixtures import ROOT, amqptasks_exe, cli_env, ledger_lines, wait_for, write_config

from amqptasks import App, load_config


def dlq(cfg, *args, input=None):
    return subprocess.run(
        [amqptasks_exe(), "dlq", *args],
        cwd=ROOT,
        env=cli_env(cfg),
        capture_output=True,
        text=True,
        timeout=60,
        input=input,
    )


def _fill(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ledger"
    w = worker_factory(cfg, "-Q", "default", ledger=ledger)
    app = App(load_config(cfg, env={}))
    ids = [app.send_task("testtasks.fail", (f"boom {i}",), ignore_result=True).id for i in range(3)]
    ids.append(app.send_task("no.such.task", queue="default", ignore_result=True).id)
    app.close()
    wait_for(lambda: broker.depth("default.dlq") == 4, message="4 dead letters")
    return cfg, ledger, w, ids


def test_list_and_show(tmp_path, broker, worker_factory):
    cfg, _, _, ids = _fill(tmp_path, broker, worker_factory)
    out = dlq(cfg, "list", "default")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "TASK", "REASON", "ATTEMPTS"]
    assert sum("task-failed" in x and "ValueError: boom" in x for x in lines) == 3
    assert any("unknown-task" in x and ids[3] in x for x in lines)
    assert lines[-1] == "4 dead letter(s) in default.dlq"
    assert broker.depth("default.dlq") == 4  # listing takes nothing away
    first = dlq(cfg, "list", "default", "--limit", "2")
    assert first.returncode == 0, first.stderr
    rows = first.stdout.splitlines()
    assert [r.split()[0] for r in rows[1:3]] == [r.split()[0] for r in lines[1:3]]  # oldest
    assert rows[-1] == "the oldest 2 of 4 dead letter(s) in default.dlq (--limit 2)"
    assert len(rows) == 4 and broker.depth("default.dlq") == 4
    shown = dlq(cfg, "show", "default.dlq", ids[0])
    assert shown.returncode == 0
    assert "reason: task-failed" in shown.stdout
    assert "original_routing_key: task.default" in shown.stdout
    assert "Traceback" in shown.stdout and "ValueError: boom 0" in shown.stdout
    missing = dlq(cfg, "show", "default", "nope")
    assert missing.returncode == 1 and "no dead letter with id 'nope'" in missing.stderr
    bad = dlq(cfg, "list", "nosuchqueue")
    assert bad.returncode == 2 and "not a queue" in bad.stderr


def test_replay_by_id_and_by_task_resets_attempts(tmp_path, broker, worker_factory):
    cfg, _, w, ids = _fill(tmp_path, broker, worker_factory)
    w.stop()  # replayed messages must wait in the work queue to be inspected
    out = dlq(cfg, "replay", "default", ids[0])
    assert out.returncode == 0, out.stderr
    assert "replayed 1 message(s)" in out.stdout
    assert broker.depth("default.dlq") == 3 and broker.depth("default") == 1
    [(props, body)] = broker.get_all("default")
    # Dead-letter headers gone; only the replay marker (a digest of the dead letter) added.
    assert [k for k in props.headers if k.startswith("x-amqptasks-")] == ["x-amqptasks-replay"]
    assert len(props.headers["x-amqptasks-replay"]) == 32
    assert b'"retries"' not in body and props.message_id == ids[0]
    out = dlq(cfg, "replay", "default", "--all", "--task", "testtasks.fail")
    assert "replayed 2 message(s)" in out.stdout
    assert broker.depth("default.dlq") == 1  # the unknown task stays
    assert broker.depth("default") == 2
    notfound = dlq(cfg, "replay", "default", "missing-id")
    assert notfound.returncode == 1 and "missing-id: not found" in notfound.stderr


def test_replayed_message_runs_again(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ledger"
    worker_factory(cfg, "-Q", "web_tasks", ledger=ledger)
    # A replayed failure really runs again on its original route (and fails again, visibly).
    broker.publish_raw("tasks", "web.x", b'{"task": "testtasks.record", "args": ["r"]}')
    wait_for(lambda: "done r" in ledger_lines(ledger))
    app = App(load_config(cfg, env={}))
    app.send_task("testtasks.fail", ("x",), queue="web_tasks", ignore_result=True)
    app.close()
    wait_for(lambda: broker.depth("web_tasks.dlq") == 1)
    out = dlq(cfg, "replay", "web_tasks", "--all")
    assert "replayed 1" in out.stdout
    wait_for(lambda: broker.depth("web_tasks.dlq") == 1, message="it fails again, visibly")


def test_purge_asks_first(tmp_path, broker, worker_factory):
    cfg, _, _, _ = _fill(tmp_path, broker, worker_factory)
    refused = dlq(cfg, "purge", "default", input="n\n")
    assert refused.returncode == 1 and broker.depth("default.dlq") == 4
    out = dlq(cfg, "purge", "default", "--yes")
    assert out.returncode == 0 and "purged 4 message(s)" in out.stdout
    assert broker.depth("default.dlq") == 0


def test_interrupted_replay_loses_nothing_and_each_task_runs_once(tmp_path, broker, worker_factory):
    import signal
    import time

    import pika

    cfg = write_config(tmp_path, broker)
    w = worker_factory(cfg, "-Q", "default")
    w.stop()
    total = 400
    ch = broker.channel()
    ch.confirm_delivery()
    for i in range(total):
        ch.basic_publish(
            "amqptasks.dlx",
            "default",
            b'{"task": "testtasks.record", "args": ["m%d"]}' % i,
            pika.BasicProperties(
                message_id=f"m{i}",
                headers={
                    "x-amqptasks-reason": "task-failed",
                    "x-amqptasks-original-exchange": "tasks",
                    "x-amqptasks-original-routing-key": "task.default",
                },
            ),
        )
    proc = subprocess.Popen(
        [amqptasks_exe(), "dlq", "replay", "default", "--all", "--ledger", str(tmp_path / "l")],
        cwd=ROOT,
        env=cli_env(cfg),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: broker.depth("default") >= 20, interval=0.01, message="replay under way")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    time.sleep(0.5)  # the broker requeues what the dead client held
    assert 20 <= broker.depth("default") < total
    assert broker.depth("default") + broker.depth("default.dlq") >= total  # nothing lost
    # Running the replay again finishes the job; the ledger keeps it from republishing what
    # the first run had settled or recorded as sent.
    again = dlq(cfg, "replay", "default", "--all", "--ledger", str(tmp_path / "l"))
    assert again.returncode == 0, again.stderr
    assert broker.depth("default.dlq") == 0
    # A kill between a copy's confirm and its ledger line publishes that one message twice
    # (replay moves one at a time), never more; both copies carry the same replay marker.
    queued = broker.depth("default")
    assert total <= queued <= total + 1
    ledger = tmp_path / "ran"
    w = worker_factory(cfg, "-Q", "default", ledger=ledger)

    def handled() -> int:  # runs + copies recognised and settled without a run
        runs = sum(line.startswith("done ") for line in ledger_lines(ledger))
        out = w.output()
        return runs + out.count("already ran on this worker") + out.count("already has a final")

    wait_for(lambda: handled() >= queued, timeout=60, message="every copy handled")
    w.stop()
    done = sorted(line for line in ledger_lines(ledger) if line.startswith("done "))
    assert done == sorted(f"done m{i}" for i in range(total))  # every task, each exactly once
    assert broker.depth("default") == 0 and broker.depth("default.dlq") == 0


def test_two_copies_of_one_replayed_dead_letter_run_once(tmp_path, broker, worker_factory):
    """The copy an interrupted replay can publish twice is recognised by its marker."""
    import pika

    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ran"
    w = worker_factory(cfg, "-Q", "default", ledger=ledger)
    for tag, marker in (("a", "digest-1"), ("a", "digest-1"), ("b", "digest-2")):
        broker.publish_raw(
            "tasks",
            "task.default",
            b'{"task": "testtasks.record", "args": ["%s"]}' % tag.encode(),
            pika.BasicProperties(message_id=tag, headers={"x-amqptasks-replay": marker}),
        )
    wait_for(lambda: "done b" in ledger_lines(ledger), message="b ran")
    # The copy is settled without running: by the result store's record of the first copy,
    # or (while the first still runs, or without a store) by the worker's in-memory Dedupe.
    wait_for(
        lambda: (
            "already ran on this worker" in w.output() or "already has a final state" in w.output()
        ),
        message="the copy settled",
    )
    w.stop()
    assert sorted(x for x in ledger_lines(ledger) if x.startswith("done")) == ["done a", "done b"]
    assert broker.depth("default") == 0 and broker.depth("default.dlq") == 0


def test_unroutable_replay_keeps_the_dead_letter(tmp_path, broker, worker_factory):
    import pika

    cfg = write_config(tmp_path, broker)
    w = worker_factory(cfg, "-Q", "default")
    w.stop()
    ch = broker.channel()
    ch.confirm_delivery()
    ch.basic_publish(
        "amqptasks.dlx",
        "default",
        b'{"task": "t", "args": []}',
        pika.BasicProperties(
            message_id="lost-route",
            headers={
                "x-amqptasks-reason": "task-failed",
                "x-amqptasks-original-exchange": "tasks",
                "x-amqptasks-original-routing-key": "nowhere.bound",
            },
        ),
    )
    out = dlq(cfg, "replay", "default", "--all")
    assert out.returncode == 1 and "lost-route" in out.stderr and "unroutable" in out.stderr
    assert broker.depth("default.dlq") == 1


# -- one id everywhere: the decoder's rule (body id, else message_id, else generated) -------
def _logged_id(worker_output: str) -> str:
    """The id in the worker's dead-letter log line (``message <id> on <queue> dead-lettered``)."""
    import re

    [ident] = re.findall(r"message (\S+) on default dead-lettered", worker_output)
    return ident


def test_a_body_only_id_is_the_id_in_log_list_show_and_replay(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    w = worker_factory(cfg, "-Q", "default")
    # A foreign client: the id only in the body, no message_id property.
    broker.publish_raw("tasks", "task.default", b'{"task": "no.such.task", "id": "body-only-7"}')
    wait_for(lambda: broker.depth("default.dlq") == 1, message="the dead letter")
    w.stop()
    assert _logged_id(w.output()) == "body-only-7"
    listed = dlq(cfg, "list", "default")
    assert listed.returncode == 0, listed.stderr
    [row] = [line for line in listed.stdout.splitlines() if "unknown-task" in line]
    assert row.split()[0] == "body-only-7"
    shown = dlq(cfg, "show", "default", "body-only-7")
    assert shown.returncode == 0, shown.stderr
    assert "id: body-only-7" in shown.stdout and "reason: unknown-task" in shown.stdout
    ledger = str(tmp_path / "replay.log")
    out = dlq(cfg, "replay", "default", "body-only-7", "--ledger", ledger)
    assert out.returncode == 0, out.stderr
    assert "replayed 1 message(s)" in out.stdout
    assert broker.depth("default.dlq") == 0 and broker.depth("default") == 1


def test_a_message_without_any_id_is_listed_and_shown_by_the_id_the_worker_logged(
    tmp_path, broker, worker_factory
):
    cfg = write_config(tmp_path, broker)
    w = worker_factory(cfg, "-Q", "default")
    broker.publish_raw("tasks", "task.default", b'{"task": "no.such.task"}')
    wait_for(lambda: broker.depth("default.dlq") == 1, message="the dead letter")
    w.stop()
    logged = _logged_id(w.output())
    listed = dlq(cfg, "list", "default")
    [row] = [line for line in listed.stdout.splitlines() if "unknown-task" in line]
    assert row.split()[0] == logged
    shown = dlq(cfg, "show", "default", logged)
    assert shown.returncode == 0 and f"id: {logged}" in shown.stdout


def _dead_letter(broker, message_id, reason, body=b'{"task": "testtasks.record", "args": ["x"]}'):
    import pika

    broker.publish_raw(
        "amqptasks.dlx",
        "default",
        body,
        pika.BasicProperties(
            message_id=message_id,
            headers={
                "x-amqptasks-reason": reason,
                "x-amqptasks-original-exchange": "tasks",
                "x-amqptasks-original-routing-key": "task.default",
            },
        ),
    )


def test_replay_all_skips_what_cannot_succeed_and_says_why(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    worker_factory(cfg, "-Q", "default").stop()  # topology declared, nobody consuming
    _dead_letter(broker, "d1", "decode-error", b"\xff not json")
    _dead_letter(broker, "d2", "decode-error", b'{"task": "t", "nope": 1}')
    _dead_letter(broker, "c1", "content-type-refused")
    _dead_letter(broker, "e1", "expired")
    _dead_letter(broker, "u1", "unknown-task")
    _dead_letter(broker, "f1", "task-failed")
    ledger = str(tmp_path / "replay.log")
    out = dlq(cfg, "replay", "default", "--all", "--ledger", ledger)
    assert out.returncode == 0, out.stderr
    assert "replayed 2 message(s)" in out.stdout  # unknown-task and task-failed
    assert "skipped 4" in out.stderr
    for line in ("decode-error: 2", "content-type-refused: 1", "expired: 1", "--force"):
        assert line in out.stderr, out.stderr
    assert broker.depth("default") == 2 and broker.depth("default.dlq") == 4
    # An explicit id is skipped the same way, and said so (exit 1: it was asked for).
    one = dlq(cfg, "replay", "default", "e1", "--ledger", ledger)
    assert one.returncode == 1 and "e1: reason expired" in one.stderr
    assert broker.depth("default.dlq") == 4
    forced = dlq(cfg, "replay", "default", "--all", "--force", "--ledger", ledger)
    assert forced.returncode == 0, forced.stderr
    assert "replayed 4 message(s)" in forced.stdout and "skipped" not in forced.stderr
    assert broker.depth("default.dlq") == 0 and broker.depth("default") == 6
