"""The worker's process flags through the real CLI: ``--time-limit``/``--soft-time-limit``,
``--purge``, ``--pidfile``, ``-f/--logfile``, ``-E --heartbeat-interval`` and what ``--help``
says about ``--detach``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from broker_fixtures import (
    ROOT,
    amqptasks_exe,
    cli_env,
    ledger_lines,
    wait_for,
    write_config,
)

from amqptasks import App, load_config


def run_worker(config: Path, *args: str, stdin: str | None = None, timeout: float = 60):
    """A worker expected to exit by itself (a refusal, a declined purge)."""
    return subprocess.run(
        [amqptasks_exe(), "worker", "--config", str(config), *args],
        cwd=ROOT,
        env=cli_env(config),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def app_for(config: Path) -> App:
    return App(load_config(config, env={}))


def test_worker_time_limits_apply_to_tasks_without_their_own(tmp_path, broker, worker_factory):
    own = {"time_limit": 30, "soft_time_limit": 20}
    # gated sets only its soft limit: the worker's hard limit is still its (each limit apart).
    tasks = {"testtasks.record": own, "testtasks.gated": {"soft_time_limit": 30}}
    cfg = write_config(tmp_path, broker, tasks=tasks)
    ledger = tmp_path / "ledger"
    worker_factory(
        cfg, "-Q", "default", "--soft-time-limit", "0.5", "--time-limit", "2", ledger=ledger
    )
    app = app_for(cfg)
    try:
        # testtasks.busy sets no limit: the worker's soft limit interrupts it.
        assert app.send_task("testtasks.busy", ("s", 10)).get(timeout=20) == "cleaned up"
        # testtasks.record has its own limits (config): the worker's are not its.
        assert app.send_task("testtasks.record", ("own", 3.0)).get(timeout=20) == "own"
        # testtasks.gated has no hard limit of its own: the worker's ends the wait for it.
        gated = app.send_task("testtasks.gated", ("h", str(tmp_path / "never"), 8.0))
        with pytest.raises(Exception) as err:
            gated.get(timeout=20)
        assert type(err.value).__name__ == "TimeLimitExceeded"
    finally:
        app.close()
    assert "soft s" in ledger_lines(ledger) and "done own" in ledger_lines(ledger)
    wait_for(lambda: broker.depth("default.dlq") == 1, message="the time-limit dead letter")
    [(props, _)] = broker.get_all("default.dlq")
    assert props.headers["x-amqptasks-reason"] == "time-limit"


def test_worker_time_limits_are_checked_at_start_and_refused_with_exit_2(tmp_path, broker):
    cfg = write_config(tmp_path, broker, broker={"url": broker.url, "consumer_timeout": 60})
    out = run_worker(cfg, "--time-limit", "60")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == (
        f"error: --time-limit 60s is not below the broker's consumer_timeout (60s, "
        f"broker.consumer_timeout in {cfg}): the broker would close the channel and "
        "redeliver before the limit fires"
    )
    out = run_worker(cfg, "--time-limit", "5", "--soft-time-limit", "5")
    assert out.returncode == 2
    assert "--soft-time-limit 5 must be below --time-limit 5" in out.stderr


def test_purge_asks_says_how_many_and_removes_only_ready_messages(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ledger"
    empty = worker_factory(cfg, "--purge", "-Q", "default", ledger=ledger)
    assert "purged nothing: default (0) had no ready messages" in empty.output()  # not asked
    assert "[y/N]" not in empty.output()
    empty.stop()
    app = app_for(cfg)
    try:
        for i in range(3):
            app.send_task("testtasks.record", (f"old{i}",), queue="default", ignore_result=True)
    finally:
        app.close()
    wait_for(lambda: broker.depth("default") == 3, message="three messages waiting")

    declined = run_worker(cfg, "--purge", "-Q", "default", stdin="n\n")
    assert declined.returncode == 1
    assert "delete the 3 ready message(s) of default (3)? [y/N]" in declined.stderr
    assert "error: --purge not confirmed: nothing purged, the worker did not start" in (
        declined.stderr
    )
    assert broker.depth("default") == 3

    w = worker_factory(cfg, "--purge", "--yes", "-Q", "default", ledger=ledger)
    assert "purged 3 message(s) from default (3)" in w.output()
    assert "[y/N]" not in w.output()
    app = app_for(cfg)
    try:
        assert app.send_task("testtasks.record", ("new",), queue="default").get(timeout=20) == "new"
    finally:
        app.close()
    assert ledger_lines(ledger) == ["start new", "done new"]  # the purged ones never ran


def test_purge_confirmed_on_stdin_then_the_worker_runs(tmp_path, broker):
    cfg = write_config(tmp_path, broker)
    apply = subprocess.run(
        [amqptasks_exe(), "topology", "apply", "--config", str(cfg)],
        cwd=ROOT,
        env=cli_env(cfg),
        capture_output=True,
        timeout=60,
    )
    assert apply.returncode == 0
    app = app_for(cfg)
    try:
        app.send_task("testtasks.record", ("old",), queue="default", ignore_result=True)
    finally:
        app.close()
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [amqptasks_exe(), "worker", "--config", str(cfg), "--purge", "-Q", "default"],
            cwd=ROOT,
            env=cli_env(cfg),
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert proc.stdin is not None
            proc.stdin.write("y\n")
            proc.stdin.close()
            wait_for(lambda: "ready: consuming" in log.read_text(), message="the worker ready")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
    text = log.read_text()
    assert "delete the 1 ready message(s) of default (1)? [y/N]" in text
    assert "purged 1 message(s) from default (1)" in text


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_pidfile_is_written_refuses_a_live_pid_replaces_a_stale_one_and_goes_at_exit(
    tmp_path, broker, worker_factory
):
    cfg = write_config(tmp_path, broker)
    pidfile = tmp_path / "run" / "worker.pid"
    pidfile.parent.mkdir()
    pidfile.write_text(f"{dead_pid()}\n")  # stale: left by a process that died
    w = worker_factory(cfg, "-Q", "default", "--pidfile", str(pidfile))
    assert pidfile.read_text() == f"{w.proc.pid}\n"
    assert [p.name for p in pidfile.parent.iterdir()] == ["worker.pid"]  # no temporary left

    second = run_worker(cfg, "-Q", "default", "--pidfile", str(pidfile))
    assert second.returncode == 2
    assert second.stderr.strip() == (
        f"error: --pidfile {pidfile}: process {w.proc.pid} is running (a worker with this pid "
        f"file is already started; stop it, or remove the file if pid {w.proc.pid} is not "
        "ours)"
    )
    assert pidfile.read_text() == f"{w.proc.pid}\n"  # the refused one left it alone

    w.signal(signal.SIGTERM)
    assert w.wait(30) == 0
    assert not pidfile.exists()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_logfile_takes_the_logs_and_the_banner(tmp_path, broker, fmt):
    cfg = write_config(tmp_path, broker)
    logfile = tmp_path / "worker.log"
    logfile.write_text("earlier line\n")  # appended to, never truncated
    proc = subprocess.Popen(
        [
            amqptasks_exe(),
            "worker",
            "--config",
            str(cfg),
            "-Q",
            "default",
            "-f",
            str(logfile),
            "--log-format",
            fmt,
        ],
        cwd=ROOT,
        env=cli_env(cfg),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: "ready: consuming" in logfile.read_text(), message="ready in the file")
        app = app_for(cfg)
        try:
            assert app.send_task("examples.tasks.add", (2, 3)).get(timeout=20) == 5
        finally:
            app.close()
        wait_for(lambda: "succeeded" in logfile.read_text(), message="the task's log line")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert (out, err) == ("", "")  # everything went to the file
    lines = logfile.read_text().splitlines()
    assert lines[0] == "earlier line"
    if fmt == "json":
        records = [json.loads(line) for line in lines[1:]]
        messages = [r["message"] for r in records]
        assert messages[0].startswith("amqptasks worker ")  # the banner, as one record
        assert "ready: consuming default" in messages
        assert any("examples.tasks.add" in m and "succeeded" in m for m in messages)
    else:
        assert lines[1].startswith("amqptasks worker ")
        assert "ready: consuming default" in lines
        assert any("INFO amqptasks.worker: task examples.tasks.add[" in line for line in lines)


def test_a_logfile_that_cannot_be_opened_is_a_usage_error(tmp_path, broker):
    cfg = write_config(tmp_path, broker)
    out = run_worker(cfg, "-f", str(tmp_path / "missing" / "worker.log"))
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"error: -f/--logfile {tmp_path / 'missing' / 'worker.log'}: cannot open it: "
        "No such file or directory"
    )


def test_events_heartbeat_interval_sets_the_worker_heartbeat(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    listener = subprocess.Popen(
        [
            amqptasks_exe(),
            "events",
            "--dump",
            "--state",
            "heartbeat",
            "--count",
            "3",
            "--config",
            str(cfg),
        ],
        cwd=ROOT,
        env=cli_env(cfg),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: _listening(cfg), message="the listener bound")  # its queue exists
        worker_factory(cfg, "-Q", "default", "-E", "--heartbeat-interval", "0.3", "-n", "hb@h")
        out, err = listener.communicate(timeout=30)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.communicate()
    assert listener.returncode == 0, err
    beats = [json.loads(line) for line in out.splitlines()]
    assert [(b["type"], b["hostname"], b["interval"]) for b in beats] == [
        ("worker-heartbeat", "hb@h", 0.3)
    ] * 3


def _listening(cfg: Path) -> bool:
    from broker_fixtures import mgmt

    settings = load_config(cfg, env={})
    vhost = settings.broker.url.rsplit("/", 1)[1]
    return any(b["source"] == "amqptasks.events" for b in mgmt("GET", f"/bindings/{vhost}") or [])


def test_help_says_detach_is_systemds_job():
    out = subprocess.run(
        [amqptasks_exe(), "worker", "--help"],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0
    assert "There is no --detach: run the worker under systemd" in " ".join(out.stdout.split())
    for flag in ("--autoscale", "--time-limit", "--soft-time-limit", "--purge", "--pidfile"):
        assert flag in out.stdout
    assert "-f, --logfile" in out.stdout and "-E, --events" in out.stdout
    assert "--heartbeat-interval" in out.stdout and "--metrics-port" in out.stdout
