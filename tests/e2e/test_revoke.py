"""Revoke that holds, through the real CLI against real workers and the real broker.

A revocation is kept in the broker (the stream ``amqptasks.revocations``): a worker started
after the revoke still never runs the task, also when it comes out of the delay levels later.
``--terminate`` stops what runs, as each pool can, and settles it as REVOKED (not retried).
"""

from __future__ import annotations

import json
import uuid
from importlib import resources
from typing import Any

import jsonschema
import pytest
from broker_fixtures import (
    ledger_lines,
    wait_for,
    write_config,
)
from control_cli import run_cli

from amqptasks import App, load_config
from amqptasks.errors import TaskError, TaskRevoked
from amqptasks.topology import EVENTS_EXCHANGE, REVOCATIONS_QUEUE

SCHEMAS = {
    name: jsonschema.Draft202012Validator(
        json.loads((resources.files("amqptasks") / "schema" / f"{name}-v1.json").read_text("utf-8"))
    )
    for name in ("control", "event", "result")
}


def valid(name: str, obj: Any) -> Any:
    problems = [f"{list(e.path)}: {e.message}" for e in SCHEMAS[name].iter_errors(obj)]
    assert problems == [], (obj, problems)
    return obj


def assert_record(record: dict[str, Any]) -> None:
    """A record of the revocations stream is a $defs.revocation or a $defs.marker."""
    defs = {"$defs": SCHEMAS["control"].schema["$defs"]}
    which = "revocation" if record.get("type") == "revoke" else "marker"
    validator = jsonschema.Draft202012Validator({"$ref": f"#/$defs/{which}", **defs})
    problems = [e.message for e in validator.iter_errors(record)]
    assert problems == [], (record, problems)


def stream_records(broker) -> list[dict[str, Any]]:
    """Every record of the revocations stream, read from the first offset up to a marker of
    our own (the way a worker knows it has read everything)."""
    conn = broker.connect()
    ch = conn.channel()
    ch.confirm_delivery()
    mine = {"v": 1, "type": "marker", "id": f"test.{uuid.uuid4().hex}"}
    ch.basic_publish("", REVOCATIONS_QUEUE, json.dumps(mine), mandatory=True)
    ch.basic_qos(prefetch_count=100)
    records: list[dict[str, Any]] = []

    def on_message(channel, method, _props, body):
        records.append(json.loads(body))
        channel.basic_ack(method.delivery_tag)

    ch.basic_consume(REVOCATIONS_QUEUE, on_message, arguments={"x-stream-offset": "first"})
    wait_for(
        lambda: conn.process_data_events(time_limit=0.05) or mine in records,
        message="our marker in the revocations stream",
    )
    ch.close()
    return [r for r in records if r != mine]


def drained(broker, queue: str = "default") -> bool:
    """Nothing ready and nothing unacked in ``queue``, by the management API (its sample: a
    new queue has none until the next statistics tick)."""
    info = broker.queue_info(queue)
    return info.get("messages") == 0 and info.get("messages_unacknowledged") == 0


def revoked_events(broker) -> Any:
    """A durable queue bound to task.revoked events, declared before any worker runs; returns
    a function reading the events that arrived so far (each valid against the schema)."""
    ch = broker.channel()
    ch.exchange_declare(EVENTS_EXCHANGE, "topic", durable=True)
    ch.queue_declare("seen.revoked", durable=True)
    ch.queue_bind("seen.revoked", EVENTS_EXCHANGE, "task.revoked")
    seen: list[dict[str, Any]] = []

    def read() -> list[dict[str, Any]]:
        for _props, body in broker.get_all("seen.revoked"):
            seen.extend(valid("event", e) for e in json.loads(body))
        return seen

    return read


def test_a_revoked_countdown_task_never_runs_on_a_worker_started_after_the_revoke(
    tmp_path, broker, worker_factory
):
    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ledger"
    events = revoked_events(broker)
    first = worker_factory(cfg, "-Q", "default", "-n", "first@host", ledger=ledger)
    app = App(load_config(cfg, env={}))
    try:
        late = app.send_task("testtasks.record", ("late",), queue="default", countdown=30)
        kept = app.send_task("testtasks.record", ("kept",), queue="default", countdown=30)
        first.stop()  # nobody runs now: the revocation must hold by itself

        out = run_cli(cfg, "control", "revoke", late.id, "--expires", "600")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "stored: revoke holds for every worker" in out.stdout
        assert "no worker answered" in out.stderr
        records = stream_records(broker)
        for r in records:
            assert_record(r)
        [record] = [r for r in records if r["type"] == "revoke"]
        assert record["ids"] == [late.id]

        # A worker that did not exist at the time of the revoke, with events on.
        second = worker_factory(cfg, "-Q", "default", "-n", "second@host", "-E", ledger=ledger)
        assert "revocations: 1 id(s) revoked" in second.output()
        wait_for(lambda: "done kept" in ledger_lines(ledger), timeout=60, message="kept runs")
        wait_for(
            lambda: any(e["id"] == late.id for e in events()), timeout=30, message="revoked event"
        )
        [event] = [e for e in events() if e["id"] == late.id]
        assert (event["reason"], event["terminated"], event["hostname"]) == (
            "revoked",
            False,
            "second@host",
        )
        assert "start late" not in ledger_lines(ledger)  # never ran
        handle = app.AsyncResult(late.id)
        assert handle.state == "REVOKED"
        with pytest.raises(TaskError) as err:
            handle.get(timeout=5)
        assert type(err.value).__name__ == "TaskRevoked"
        assert isinstance(err.value, TaskRevoked)  # `except TaskRevoked` around get() works
        stored = app.store.get(late.id)
        valid("result", json.loads(stored.to_json()))
        assert stored.reason == "revoked" and stored.worker == "second@host"
        assert app.AsyncResult(kept.id).get(timeout=10) == "kept"
        # Settled (acked), not dropped or held: nothing left in the queue or its DLQ.
        wait_for(lambda: drained(broker), message="the queue drained")
        assert broker.depth("default.dlq") == 0
        stats = json.loads(run_cli(cfg, "inspect", "stats", "--json").stdout)
        result = valid("control", stats["second@host"])["result"]
        assert result["by_task"]["testtasks.record"] == {"succeeded": 1, "revoked": 1}
        assert result["revocations"]["ids"] == 1 and result["revocations"]["skipped"] == 1
    finally:
        app.close()


def revoke_answers(config, *args) -> dict[str, Any]:
    """``amqptasks control revoke ARGS --json``: exit 0, each reply valid: {worker: result}."""
    out = run_cli(config, "control", "revoke", *args, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    replies = json.loads(out.stdout)
    for name, reply in replies.items():
        valid("control", reply)
        assert reply["ok"], (name, reply)
    return {name: reply["result"] for name, reply in replies.items()}


def stats_of(config, worker: str) -> dict[str, Any]:
    out = run_cli(config, "inspect", "stats", "-d", worker, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    return valid("control", json.loads(out.stdout)[worker])["result"]  # type: ignore[no-any-return]


def test_terminate_kills_a_process_pool_child_and_settles_the_task_as_revoked(
    tmp_path, broker, worker_factory
):
    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ledger"
    events = revoked_events(broker)
    worker_factory(
        cfg,
        "-Q",
        "default",
        "-n",
        "proc@host",
        "--pool",
        "processes",
        "-c",
        "1",
        "-E",
        ledger=ledger,
    )
    app = App(load_config(cfg, env={}))
    try:
        before = app.send_task("testtasks.pid", ("before",), queue="default").get(timeout=30)
        long = app.send_task("testtasks.record", ("long", 60.0), queue="default")
        wait_for(lambda: "start long" in ledger_lines(ledger), message="the long task to start")

        answer = revoke_answers(cfg, long.id, "--terminate")["proc@host"]
        assert answer["revoked"] == [long.id] and answer["terminated"] == [long.id]
        with pytest.raises(TaskError) as err:
            long.get(timeout=10)  # the caller hears at once (rpc reply), no 60 s wait
        assert type(err.value).__name__ == "TaskRevoked"
        assert app.AsyncResult(long.id).state == "REVOKED"
        # The caller's own handle (it heard the reply) says what the store says.
        assert (long.state, long.ready(), long.failed()) == ("REVOKED", True, False)

        # The child was killed and replaced: the next task runs in a new one.
        after = app.send_task("testtasks.pid", ("after",), queue="default").get(timeout=30)
        assert after != before
        [event] = [e for e in events() if e["id"] == long.id]
        assert (event["reason"], event["terminated"]) == ("revoked", True)
        # Settled as revoked: not retried (WorkerLost would be), not dead-lettered.
        stats = stats_of(cfg, "proc@host")
        assert stats["by_task"]["testtasks.record"] == {"revoked": 1}
        assert broker.depth("default.dlq") == 0
        assert ledger_lines(ledger).count("start long") == 1
        assert "done long" not in ledger_lines(ledger)
    finally:
        app.close()


def test_terminate_cancels_an_async_task(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ledger"
    worker_factory(cfg, "-Q", "default", "-n", "aio@host", ledger=ledger)
    app = App(load_config(cfg, env={}))
    try:
        nap = app.send_task("testtasks.nap", ("nap", 60.0), queue="default")
        wait_for(lambda: "start nap" in ledger_lines(ledger), message="the async task to start")
        answer = revoke_answers(cfg, nap.id, "--terminate")["aio@host"]
        assert answer["terminated"] == [nap.id]
        wait_for(lambda: "cancelled nap" in ledger_lines(ledger), message="the cancellation")
        assert app.AsyncResult(nap.id).state == "REVOKED"
        assert stats_of(cfg, "aio@host")["by_task"]["testtasks.nap"] == {"revoked": 1}
        assert "done nap" not in ledger_lines(ledger)
    finally:
        app.close()


@pytest.mark.parametrize(
    "task",
    [
        "testtasks.spin",  # the full pipeline (its result is stored)
        "testtasks.quiet_spin",  # the fast path (nothing wants it)
    ],
)
def test_terminate_raises_task_revoked_in_a_thread_pool_task(
    tmp_path, broker, worker_factory, task
):
    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ledger"
    events = revoked_events(broker)
    worker_factory(cfg, "-Q", "default", "-n", "thr@host", "-E", ledger=ledger)
    app = App(load_config(cfg, env={}))
    try:
        spin = app.send_task(task, ("spin", 60.0), queue="default", ignore_result=True)
        wait_for(lambda: "start spin" in ledger_lines(ledger), message="the busy loop to start")
        answer = revoke_answers(cfg, spin.id, "--terminate")["thr@host"]
        assert answer["terminated"] == [spin.id]
        # A pure-Python loop gets TaskRevoked at its next bytecode: its except block runs.
        wait_for(lambda: "revoked spin" in ledger_lines(ledger), message="TaskRevoked raised")
        wait_for(lambda: any(e["id"] == spin.id for e in events()), message="the event")
        [event] = [e for e in events() if e["id"] == spin.id]
        assert (event["reason"], event["terminated"]) == ("revoked", True)
        assert stats_of(cfg, "thr@host")["by_task"][task] == {"revoked": 1}
        if task == "testtasks.spin":
            assert app.AsyncResult(spin.id).state == "REVOKED"
        # The worker goes on: the thread is free again and runs the next task.
        assert app.send_task("testtasks.record", ("next",), queue="default").get(timeout=20)
        assert "done spin" not in ledger_lines(ledger)
        wait_for(lambda: drained(broker), message="everything acked")
    finally:
        app.close()


def test_revoking_queued_tasks_settles_them_without_running_and_answers_the_caller(
    tmp_path, broker, worker_factory
):
    """Revoked (through the Python API) while they wait behind a busy slot: never run,
    REVOKED, the caller hears."""
    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ledger"
    worker_factory(cfg, "-Q", "default", "-n", "one@host", "-c", "1", ledger=ledger)
    app = App(load_config(cfg, env={}))
    try:
        # Busy long enough for two revokes (each waits its 1 s for the answers).
        busy = app.send_task("testtasks.record", ("busy", 5.0), queue="default")
        wait_for(lambda: "start busy" in ledger_lines(ledger), message="the busy task")
        waiting = [app.send_task("testtasks.record", (f"w{i}",), queue="default") for i in range(3)]
        # The Python API (what a dashboard calls): Celery's AsyncResult.revoke() and
        # app.control.revoke(); each answers with the worker's reply.
        replies = waiting[0].revoke()
        assert replies["one@host"].ok and replies["one@host"].result["revoked"] == [waiting[0].id]
        replies = app.control.revoke([waiting[2].id], expires=600)
        answer = replies["one@host"].result
        assert answer["revoked"] == [waiting[2].id] and answer["terminated"] == []
        records = [r for r in stream_records(broker) if r["type"] == "revoke"]
        assert [r["ids"] for r in records] == [[waiting[0].id], [waiting[2].id]]
        with pytest.raises(TaskError) as err:
            waiting[0].get(timeout=20)
        assert type(err.value).__name__ == "TaskRevoked"
        assert waiting[1].get(timeout=20) == "w1"
        third = app.AsyncResult(waiting[2].id).get(timeout=20, propagate=False)
        assert type(third).__name__ == "TaskRevoked"
        assert busy.get(timeout=20) == "busy"
        assert [line for line in ledger_lines(ledger) if line.startswith("done")] == [
            "done busy",
            "done w1",
        ]
    finally:
        app.close()


def test_a_revoked_id_never_runs_on_the_fast_path(tmp_path, broker, worker_factory):
    """No result, no reply, no events: nothing but the revocation wants the message, so
    the fast path would take it — it must not run a revoked id."""
    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ledger"
    worker_factory(cfg, "-Q", "default", "-n", "fast@host", ledger=ledger)
    app = App(load_config(cfg, env={}))
    try:
        revoked = f"revoked-{uuid.uuid4().hex}"
        app.control.revoke([revoked], expires=600)
        quiet = {"queue": "default", "ignore_result": True}  # no reply wanted either
        app.send_task("testtasks.quiet_spin", ("no", 0.0), task_id=revoked, **quiet)
        app.send_task("testtasks.quiet_spin", ("yes", 0.0), **quiet)
        wait_for(lambda: "done yes" in ledger_lines(ledger), message="the second task")
        wait_for(lambda: drained(broker), message="both settled")
        stats = stats_of(cfg, "fast@host")["by_task"]["testtasks.quiet_spin"]
        assert stats == {"revoked": 1, "succeeded": 1}
        assert "start no" not in ledger_lines(ledger)
    finally:
        app.close()


def test_a_revocation_that_expired_no_longer_holds(tmp_path, broker, worker_factory):
    """`--expires` is how long a revocation holds: a task that comes due after it ran, one
    that comes due before it did not (both on the worker that heard the revoke, and on a
    worker started after the short one expired, which reads the stream from the start).
    The short one takes the config's ``revoke.expires``, as a revoke without --expires does."""
    cfg = write_config(tmp_path, broker, revoke={"expires": 1.5})
    ledger = tmp_path / "ledger"
    events = revoked_events(broker)
    first = worker_factory(cfg, "-Q", "default", "-n", "heard@host", "-E", ledger=ledger)
    app = App(load_config(cfg, env={}))
    try:
        short = app.send_task("testtasks.record", ("short",), queue="default", countdown=4)
        held = app.send_task("testtasks.record", ("held",), queue="default", countdown=4)
        out = run_cli(cfg, "control", "revoke", short.id)  # revoke.expires: 1.5 s
        assert out.returncode == 0, out.stdout + out.stderr
        out = run_cli(cfg, "control", "revoke", held.id, "--expires", "600")
        assert out.returncode == 0, out.stdout + out.stderr
        assert short.get(timeout=30) == "short"  # due at 4 s, its revocation ended at 1.5 s
        wait_for(
            lambda: any(e["id"] == held.id for e in events()), timeout=30, message="held revoked"
        )
        assert app.AsyncResult(held.id).state == "REVOKED"
        first.stop()

        # A worker started now reads both records: the short one is over, the other holds.
        again = app.send_task("testtasks.record", ("again",), queue="default", countdown=2)
        out = run_cli(cfg, "control", "revoke", again.id, "--expires", "600")
        assert out.returncode == 0, out.stdout + out.stderr
        second = worker_factory(cfg, "-Q", "default", "-n", "late@host", "-E", ledger=ledger)
        assert "revocations: 2 id(s) revoked" in second.output()  # held and again, not short
        wait_for(
            lambda: any(e["id"] == again.id for e in events()), timeout=30, message="again revoked"
        )
    finally:
        app.close()
    lines = ledger_lines(ledger)
    assert "done short" in lines and "start held" not in lines and "start again" not in lines
