"""``amqptasks result``: results read by id from a real SQLite store, the way a shell user
would after a worker wrote them (no broker is involved in reading a result)."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from pathlib import Path

from click.testing import CliRunner

from amqptasks.cli import main
from amqptasks.results import store_from_url
from amqptasks.results.meta import FAILURE, STARTED, SUCCESS, ResultMeta


def _setup(tmp_path: Path, backend: str | None = None) -> tuple[Path, str]:
    url = backend or f"sqlite:///{tmp_path / 'results.sqlite3'}"
    cfg = tmp_path / "amqptasks.yaml"
    cfg.write_text(
        "broker: {url: 'amqp://guest:guest@127.0.0.1:1/'}\n"  # never connected to
        f"results: {{backend: '{url}'}}\n"
    )
    return cfg, url


def _record(task_id: str, status: str, **fields: object) -> ResultMeta:
    return ResultMeta(
        id=task_id,
        status=status,
        task="examples.tasks.add",
        date_done=datetime.now(timezone.utc),
        **fields,  # type: ignore[arg-type]
    )


def _run(cfg: Path, *args: str):
    return CliRunner().invoke(main, ["result", *args, "--config", str(cfg)])


def test_each_id_gets_its_state_and_value_and_json_follows_the_schema(tmp_path):
    cfg, url = _setup(tmp_path)
    store = store_from_url(url)
    store.save(
        [
            _record("ok-1", SUCCESS, result=5),
            _record("bad-1", FAILURE, error_type="ZeroDivisionError", error_message="boom:"),
            _record("gone-1", FAILURE, error_type="WorkerLost"),
            ResultMeta(id="run-1", status=STARTED, task="examples.tasks.add"),
        ]
    )
    r = _run(cfg, "ok-1", "bad-1", "gone-1", "run-1", "nobody", "ok-1")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [
        "ok-1 SUCCESS 5",
        "bad-1 FAILURE ZeroDivisionError: boom:",
        "gone-1 FAILURE WorkerLost",
        "run-1 STARTED",
        "nobody PENDING (no record yet: not run, still running, expired or unknown)",
        "ok-1 SUCCESS 5",
    ]
    r = _run(cfg, "ok-1", "nobody", "--json")
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in r.output.splitlines()]
    assert lines[0]["id"] == "ok-1" and lines[0]["status"] == SUCCESS and lines[0]["result"] == 5
    assert lines[1] == {"id": "nobody", "status": "PENDING"}


def test_wait_returns_when_the_result_lands_and_fails_for_a_failure_or_a_timeout(tmp_path):
    cfg, url = _setup(tmp_path)
    store = store_from_url(url)
    later = threading.Timer(0.3, lambda: store.save([_record("late", SUCCESS, result=[1, 2])]))
    later.start()
    try:
        r = _run(cfg, "late", "--wait", "20")
    finally:
        later.join()
    assert r.exit_code == 0, r.output
    assert r.output.strip() == "late SUCCESS [1, 2]"
    store.save([_record("bad", FAILURE, error_type="ValueError", error_message="no")])
    r = _run(cfg, "late", "bad", "--wait", "5")
    assert r.exit_code == 1 and "error: bad: ended FAILURE" in r.output
    r = _run(cfg, "never", "--wait", "0.2")
    assert r.exit_code == 1 and "error: never: not finished within 0.2s" in r.output
    # An error message a task chose cannot drive the terminal: its escapes are shown, inert.
    store.save([_record("evil", FAILURE, error_type="ValueError", error_message="x\x1b[2Jy")])
    r = _run(cfg, "evil")
    assert r.output.strip() == "evil FAILURE ValueError: x\\x1b[2Jy" and "\x1b" not in r.output


def test_rpc_backend_and_bad_arguments_are_usage_errors(tmp_path):
    cfg, _ = _setup(tmp_path, "rpc://")
    r = _run(cfg, "some-id")
    assert r.exit_code == 2
    assert "results.backend is 'rpc://'" in r.output and "sqlite:///PATH" in r.output
    cfg, _ = _setup(tmp_path)
    assert _run(cfg).exit_code == 2  # no ID
    r = _run(cfg, "x", "--wait", "0")
    assert r.exit_code == 2 and "--wait" in r.output
