"""An unmodified Celery 5 producer feeding an amqptasks worker (docs/migration.md).

Celery's own code (the latest release, in its own virtualenv: celery_fixtures) publishes with
``delay``/``apply_async`` to the amqptasks topology and reads results with its ``rpc://``
backend; a real ``amqptasks worker`` runs the tasks (tests/support/celerytasks.py).
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from broker_fixtures import ROOT, amqptasks_exe, cli_env, ledger_lines, wait_for, write_config

pytestmark = pytest.mark.broker
IMPORTS = ["examples.tasks", "examples.web", "testtasks", "celerytasks"]


def _start(tmp_path, broker, worker_factory, **config):
    cfg = write_config(tmp_path, broker, imports=IMPORTS, **config)
    ledger = tmp_path / "ledger"
    worker_factory(cfg, "-Q", "default", ledger=ledger)
    return cfg, ledger


def _dead_letters(broker, count=1):
    wait_for(lambda: broker.depth("default.dlq") >= count, message=f"{count} dead letter(s)")
    return broker.get_all("default.dlq")


def _h(props, name):
    value = props.headers[name]
    return value.decode() if isinstance(value, bytes) else value


def test_delay_runs_on_our_worker_and_rpc_get_returns_the_result(
    tmp_path, broker, worker_factory, celery_call
):
    _, ledger = _start(tmp_path, broker, worker_factory)
    out = celery_call({"call": "delay", "args": [2, 3], "wait": 20})
    assert out.get("result") == 5, out
    assert [x.split()[:3] for x in ledger_lines(ledger)] == [["add", "2", "3"]]


def test_a_celery_chain_runs_on_our_worker(tmp_path, broker, worker_factory, celery_call):
    _, ledger = _start(tmp_path, broker, worker_factory)
    out = celery_call({"call": "chain", "first": [2, 2], "then": [4], "wait": 30})
    assert out.get("result") == 8, out  # the chain's result: its last step, add(4, 4)
    assert [x.split()[:3] for x in ledger_lines(ledger)] == [["add", "2", "2"], ["add", "4", "4"]]


def test_celery_links_and_groups_run_on_our_worker(tmp_path, broker, worker_factory, celery_call):
    _, ledger = _start(tmp_path, broker, worker_factory)
    out = celery_call({"call": "group", "wait": 30})
    assert out.get("result") == [2, 4], out
    out = celery_call({"call": "links", "wait": 30})
    assert out.get("error", {}).get("type") == "ValueError", out
    # link: add.s(10) gets add(2, 2)'s result prepended; link_error: add.si(0, 0) is immutable.
    wait_for(lambda: len(ledger_lines(ledger)) == 6, message="the callback and the errback")
    runs = sorted(" ".join(x.split()[:3]) for x in ledger_lines(ledger))
    assert runs == ["add 0 0", "add 1 1", "add 2 2", "add 2 2", "add 4 10", "fail x"]


def test_countdown_waits_in_our_delay_levels(tmp_path, broker, worker_factory, celery_call):
    _, ledger = _start(tmp_path, broker, worker_factory)
    out = celery_call({"call": "tasks.add", "args": [1, 2], "options": {"countdown": 3}})
    # Not held by the worker: the message waits in a delay level queue (3 s = 2 s + 1 s).
    wait_for(
        lambda: broker.depth("amqptasks.delay.1") + broker.depth("amqptasks.delay.0") == 1,
        timeout=3,
        interval=0.02,
        message="the Celery message in a delay level",
    )
    info = broker.queue_info("default")
    assert info.get("messages_unacknowledged", 0) == 0
    assert not ledger_lines(ledger)
    wait_for(lambda: ledger_lines(ledger), timeout=15, message="the delayed add")
    ran = float(ledger_lines(ledger)[0].split()[-1])
    assert 3 - 0.6 <= ran - out["sent"] <= 3 + 2.0


def test_expires_is_honoured(tmp_path, broker, worker_factory, celery_call):
    _, ledger = _start(tmp_path, broker, worker_factory)
    # Due in 3 s, expired after 1 s: it comes back from the delay levels expired.
    out = celery_call(
        {"call": "tasks.add", "args": [1, 1], "options": {"countdown": 3, "expires": 1}}
    )
    (props, body), *_ = _dead_letters(broker)
    assert _h(props, "x-amqptasks-reason") == "expired"
    assert _h(props, "id") == out["id"] and json.loads(body)[0] == [1, 1]
    assert not ledger_lines(ledger)


def test_timelimit_is_read_as_hard_then_soft(tmp_path, broker, worker_factory, celery_call):
    _start(tmp_path, broker, worker_factory)
    # soft only: timelimit [None, 0.5] on the wire; read the other way round it would be a
    # hard limit and the task would not get to clean up.
    out = celery_call(
        {"call": "tasks.spin", "args": [10], "options": {"soft_time_limit": 0.5}, "wait": 20}
    )
    assert out.get("result") == "soft limit", out
    both = {"time_limit": 8, "soft_time_limit": 0.5}
    out = celery_call({"call": "tasks.spin", "args": [10], "options": both, "wait": 20})
    assert out.get("result") == "soft limit", out
    # hard only: timelimit [1, None]; the task is stopped, no soft limit to catch.
    out = celery_call({"call": "tasks.spin", "args": [3], "options": {"time_limit": 1}, "wait": 20})
    assert out.get("error", {}).get("type") == "TimeLimitExceeded", out
    assert out["elapsed"] < 3
    (props, _), *_ = _dead_letters(broker)
    assert _h(props, "x-amqptasks-reason") == "time-limit"


def test_a_failing_task_is_retried_by_our_policy_then_dead_lettered(
    tmp_path, broker, worker_factory, celery_call
):
    policy = {"autoretry_for": ["ValueError"], "max_retries": 2, "default_retry_delay": 0.5}
    _, ledger = _start(tmp_path, broker, worker_factory, tasks={"tasks.fail": policy})
    out = celery_call({"call": "tasks.fail", "args": ["boom"], "wait": 30})
    # Celery's AsyncResult.get() raises the builtin ValueError, rebuilt from our reply.
    assert out.get("error") == {
        "type": "ValueError",
        "module": "builtins",
        "message": "boom",
        "builtin_value_error": True,
    }, out
    assert ledger_lines(ledger) == ["fail boom"] * 3
    [(props, body)] = _dead_letters(broker)
    assert _h(props, "x-amqptasks-reason") == "task-failed"
    assert props.headers["x-amqptasks-attempts"] == 3
    assert "ValueError: boom" in _h(props, "x-amqptasks-detail")
    # Still a Celery message (retries went through our delay levels in Celery's format).
    assert _h(props, "task") == "tasks.fail" and props.headers["retries"] == 2
    assert json.loads(body)[:2] == [["boom"], {}]


def test_a_pickled_celery_message_is_refused_never_run(
    tmp_path, broker, worker_factory, celery_call
):
    _, ledger = _start(tmp_path, broker, worker_factory)
    out = celery_call(
        {"call": "tasks.add", "args": [1, 1], "options": {"serializer": "pickle"}, "wait": 15}
    )
    assert out.get("error", {}).get("type") == "ContentTypeRefused", out  # told at once
    [(props, _)] = _dead_letters(broker)
    assert _h(props, "x-amqptasks-reason") == "content-type-refused"
    assert props.content_type == "application/x-python-serialize"
    assert not ledger_lines(ledger)


def test_ingest_off_dead_letters_celery_messages_with_the_reason(
    tmp_path, broker, worker_factory, celery_call
):
    off = {"accept": ["application/json"], "celery_ingest": False}
    _, ledger = _start(tmp_path, broker, worker_factory, serialization=off)
    out = celery_call({"call": "delay", "args": [2, 3], "wait": 15})
    assert out.get("error", {}).get("type") == "CeleryUnsupported", out
    [(props, _)] = _dead_letters(broker)
    assert _h(props, "x-amqptasks-reason") == "celery-unsupported"
    assert "serialization.celery_ingest: false" in _h(props, "x-amqptasks-detail")
    assert not ledger_lines(ledger)


def test_a_task_missing_here_is_unknown_task_naming_it(
    tmp_path, broker, worker_factory, celery_call
):
    _start(tmp_path, broker, worker_factory)
    out = celery_call({"call": "tasks.missing", "wait": 15})
    assert out.get("error", {}).get("type") == "TaskNotRegistered", out
    [(props, _)] = _dead_letters(broker)
    assert _h(props, "x-amqptasks-reason") == "unknown-task"
    assert "'tasks.missing'" in _h(props, "x-amqptasks-detail")


def _dlq(cfg, *args):
    return subprocess.run(
        [amqptasks_exe(), "dlq", *args],
        cwd=ROOT,
        env=cli_env(cfg),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dlq_replay_of_a_celery_message_runs_it_again(
    tmp_path, broker, worker_factory, celery_call
):
    cfg, ledger = _start(tmp_path, broker, worker_factory)
    flag = tmp_path / "fixed"
    out = celery_call({"call": "tasks.mended", "args": [str(flag)], "wait": 15})
    assert out.get("error", {}).get("type") == "RuntimeError", out
    wait_for(lambda: broker.depth("default.dlq") == 1, message="the dead letter")
    listed = _dlq(cfg, "list", "default")
    assert any(out["id"] in x and "tasks.mended" in x for x in listed.stdout.splitlines()), (
        listed.stdout
    )
    flag.touch()  # the bug is fixed
    replay = _dlq(cfg, "replay", "default", out["id"])
    assert replay.returncode == 0 and "replayed 1" in replay.stdout, replay.stdout + replay.stderr
    wait_for(lambda: "mended ok" in ledger_lines(ledger), message="the replayed run")
    assert ledger_lines(ledger) == ["mended broken", "mended ok"]
    time.sleep(0.3)
    assert broker.depth("default.dlq") == 0
