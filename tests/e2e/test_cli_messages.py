"""What the CLI says and how it exits, run as a user runs it: one ``error:`` line naming what and
where, exit 2 for what the user fixes in the config or command line, 1 at run time; logs
without client-library noise; ``send``'s timing and header options doing what they say."""

from __future__ import annotations

import ast
import functools
import json
import re
import time
import urllib.parse
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

from broker_fixtures import (
    cli_env,
    ledger_lines,
    mgmt,
    wait_for,
    write_config,
)
from broker_fixtures import run_cli as _run_cli

# These tests name the config through $AMQPTASKS_CONFIG, or place --config themselves.
run_cli = functools.partial(_run_cli, config_flag=False)


def with_module(tmp_path: Path, name: str, source: str) -> dict[str, str]:
    """A task package ``name`` under tmp_path; the env that makes it importable."""
    pkg = tmp_path / "mods" / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "tasks.py").write_text(source)
    env = cli_env(tmp_path / "unused.yaml")
    return {"PYTHONPATH": f"{tmp_path / 'mods'}:{env['PYTHONPATH']}"}


# -- exit codes and one-line errors ---------------------------------------------------------------
def test_unknown_queue_is_a_usage_error_naming_the_declared_ones(tmp_path, broker):
    cfg = write_config(tmp_path, broker)
    out = run_cli(cfg, "worker", "-Q", "default,nosuchqueue", "--config", str(cfg))
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == (
        f"error: -Q default,nosuchqueue: queue 'nosuchqueue' is not declared in {cfg} "
        "(declared: default, web_tasks, queue_add)"
    )


def test_unimportable_task_module_exits_2_naming_its_place_in_the_config(tmp_path, broker):
    cfg = write_config(tmp_path, broker, imports=["examples.tasks", "nosuch.mod"])
    for command in (["worker"], ["beat", "--list"]):
        out = run_cli(cfg, *command, "--config", str(cfg))
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip() == (
            f"error: importing 'nosuch.mod' (imports[1] in {cfg}) failed: "
            "ModuleNotFoundError: No module named 'nosuch'"
        )


def test_task_module_raising_on_import_is_one_line_traceback_only_with_debug(tmp_path, broker):
    env = with_module(tmp_path, "boomapp", "import os\nratio = 1 / 0\n")
    module_file = tmp_path / "mods" / "boomapp" / "tasks.py"
    cfg = write_config(tmp_path, broker, imports=["boomapp.tasks"])
    expected = (
        f"error: importing 'boomapp.tasks' (imports[0] in {cfg}) failed: "
        f"ZeroDivisionError: division by zero (at {module_file}:2)"
    )
    for command in (["worker"], ["beat"], ["beat", "--list"]):
        out = run_cli(cfg, *command, "--config", str(cfg), env=env)
        assert (out.returncode, out.stderr.strip()) == (2, expected), command
    out = run_cli(cfg, "worker", "-l", "debug", "--config", str(cfg), env=env)
    assert out.returncode == 2
    assert out.stderr.startswith(expected + "\n")
    assert "Traceback (most recent call last)" in out.stderr
    assert f'File "{module_file}", line 2' in out.stderr


def test_send_wait_on_a_failed_task_names_the_task_id_and_exception_type(
    tmp_path, broker, worker_factory
):
    cfg = write_config(tmp_path, broker)
    worker_factory(cfg, "-Q", "default")
    out = run_cli(
        cfg,
        "send",
        "examples.tasks.reduce",
        "--args",
        "[[1, 2]]",
        "--kwargs",
        '{"op": "pow"}',
        "--wait",
        "20",
        "--config",
        str(cfg),
    )
    assert out.returncode == 1
    task_id = out.stdout.strip()
    uuid.UUID(task_id)
    assert out.stderr.strip() == (
        f"error: task examples.tasks.reduce[{task_id}] failed: "
        "ValueError: unknown op 'pow' (expected one of add, mul)"
    )


# -- send options ---------------------------------------------------------------------------------
def test_send_countdown_and_eta_wait_in_the_broker(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ledger"
    worker_factory(cfg, "-Q", "default", ledger=ledger)
    for tag in ("cd", "eta"):
        eta = (datetime.now(timezone.utc) + timedelta(seconds=3)).isoformat()
        option = ["--countdown", "3"] if tag == "cd" else ["--eta", eta]
        sent = time.time()
        out = run_cli(cfg, "send", "testtasks.when", "--args", f'["{tag}"]', *option)
        assert out.returncode == 0, out.stderr
        line = wait_for(
            lambda tag=tag: [x for x in ledger_lines(ledger) if x.startswith(f"ran {tag} ")],
            timeout=20,
            message=f"the {tag} task",
        )
        ran = float(line[0].split()[-1])
        assert 3 - 1 <= ran - sent <= 3 + 2, (tag, ran - sent)
    out = run_cli(cfg, "send", "testtasks.when", "--countdown", "1", "--eta", eta)
    assert out.returncode == 2 and "--countdown or --eta" in out.stderr


def test_send_expires_dead_letters_an_expired_task_with_reason_expired(
    tmp_path, broker, worker_factory
):
    cfg = write_config(tmp_path, broker)
    ledger = tmp_path / "ledger"
    past = "2001-01-01T00:00:00Z"
    assert run_cli(cfg, "topology", "apply").returncode == 0  # no worker yet
    out = run_cli(cfg, "send", "testtasks.record", "--args", '["late"]', "--expires", past)
    assert out.returncode == 0, out.stderr
    # Seconds from now travel as an absolute time in the body.
    before = datetime.now(timezone.utc)
    out = run_cli(cfg, "send", "testtasks.record", "--args", '["soon"]', "--expires", "3600")
    assert out.returncode == 0, out.stderr
    bodies = [json.loads(body) for _, body in broker.get_all("default")]
    assert [b["args"] for b in bodies] == [["late"], ["soon"]]
    assert bodies[0]["expires"].startswith("2001-01-01T00:00:00")
    soon = datetime.fromisoformat(bodies[1]["expires"].replace("Z", "+00:00"))
    assert timedelta(seconds=3590) < soon - before < timedelta(seconds=3610)
    out = run_cli(cfg, "send", "testtasks.record", "--args", '["late2"]', "--expires", past)
    worker_factory(cfg, "-Q", "default", ledger=ledger)
    wait_for(lambda: broker.depth("default.dlq") == 1, message="the expired task in the DLQ")
    [(props, body)] = broker.get_all("default.dlq")
    assert props.headers["x-amqptasks-reason"] == "expired"
    assert json.loads(body)["args"] == ["late2"]
    assert ledger_lines(ledger) == []  # never ran
    out = run_cli(cfg, "send", "testtasks.record", "--expires", "tomorrow")
    assert out.returncode == 2 and "--expires" in out.stderr and "ISO 8601" in out.stderr


def test_send_headers_reach_the_task_request(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    worker_factory(cfg, "-Q", "default")
    headers = {"tenant": "a", "trace": 7}
    out = run_cli(
        cfg, "send", "testtasks.headers", "--headers", json.dumps(headers), "--wait", "20"
    )
    assert out.returncode == 0, out.stderr
    result = out.stdout.strip().splitlines()[1]
    assert result.startswith("result: ")
    seen = ast.literal_eval(result.removeprefix("result: "))
    assert {k: seen[k] for k in headers} == headers
    out = run_cli(cfg, "send", "testtasks.headers", "--headers", "[1]")
    assert out.returncode == 2 and "--headers" in out.stderr and "JSON object" in out.stderr


# -- logs -----------------------------------------------------------------------------------------
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) (\S+): ")


def _close_connections(broker) -> int:
    """Close every client connection of the test's vhost from the broker side, as a broker
    shutdown does (CONNECTION_FORCED); returns how many."""
    vh = urllib.parse.quote(broker.vhost, safe="")

    def listed():
        conns = mgmt("GET", f"/vhosts/{vh}/connections")
        names = [str(c.get("client_properties", {}).get("connection_name")) for c in conns]
        ours = [n for n in names if n.startswith("amqptasks@")]
        both = {n.rsplit(" ", 1)[-1] for n in ours} >= {"consumer", "publisher"}
        return conns if both else None

    conns = wait_for(listed, timeout=30, interval=0.5, message="the worker's connections")
    for c in conns:
        mgmt("DELETE", "/connections/" + urllib.parse.quote(c["name"], safe=""))
    return len(conns)


def test_default_level_worker_output_has_no_client_library_internals(
    tmp_path, broker, worker_factory
):
    cfg = write_config(tmp_path, broker)
    w = worker_factory(cfg, "-Q", "default")
    for n in (1, 2):
        out = run_cli(cfg, "send", "examples.tasks.add", "--args", f"[{n}, 1]", "--wait", "20")
        assert out.returncode == 0 and out.stderr == "", out.stderr
        if n == 1:
            assert _close_connections(broker) == 2
            wait_for(lambda: w.output().count("ready: consuming") == 2, timeout=30)
    w.stop()
    lines = w.output().splitlines()
    logged = [LOG_LINE.match(x) for x in lines]
    loggers = {m[2] for m in logged if m}
    assert not {name for name in loggers if name.startswith(("pika", "aio_pika", "asyncio"))}
    assert loggers <= {"amqptasks.worker", "aiormq.connection"}, loggers
    assert "Traceback" not in w.output() and "socket" not in w.output()
    # Everything else is the banner (indented) and the state lines.
    others = [x for x, m in zip(lines, logged, strict=True) if not m]
    assert all(x.startswith(("amqptasks worker ", "  ", "ready: consuming")) for x in others)
    assert sum("connection to the broker lost" in x for x in lines) == 1
    assert sum("aiormq" in x for x in lines) <= 1  # the publisher's connection: one line
    assert sum("succeeded" in x for x in lines) == 2


def test_unreachable_broker_is_one_error_line(tmp_path, broker):
    cfg = write_config(tmp_path, broker, broker={"url": "amqp://guest:guest@127.0.0.1:1/x"})
    for command in (["dlq", "list", "default"], ["topology", "apply"], ["send", "x.y"]):
        out = run_cli(cfg, *command, "--config", str(cfg))
        assert out.returncode == 1, (command, out.stderr)
        [line] = out.stderr.splitlines()
        assert line.startswith("error: "), (command, line)
        assert "amqp://guest:***@127.0.0.1:1/x" in line
    out = run_cli(cfg, "--log-format", "json", "dlq", "list", "default", "--config", str(cfg))
    [line] = out.stderr.splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR" and record["message"].startswith("error: cannot connect")


def test_json_log_format_is_one_object_per_line(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    w = worker_factory(cfg, "-Q", "default", "--log-format", "json")
    out = run_cli(cfg, "send", "examples.tasks.add", "--args", "[2, 3]", "--wait", "20")
    assert out.returncode == 0, out.stderr
    task_id = out.stdout.split()[0]
    w.stop()
    records = [json.loads(line) for line in w.output().splitlines()]
    for r in records:
        assert {"time", "level", "logger", "pid", "message"} <= r.keys()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["time"])
        assert r["pid"] == w.proc.pid
    messages = [r["message"] for r in records]
    assert messages[0].startswith("amqptasks worker ")  # the banner, as one record
    assert "ready: consuming default" in messages
    [done] = [r for r in records if task_id in r["message"]]
    assert done["logger"] == "amqptasks.worker" and done["level"] == "INFO"
    assert "succeeded" in done["message"]


# -- topology: a summary by default, every object with -v -----------------------------------------
def test_topology_show_and_apply_summarise_the_delay_levels(tmp_path, broker):
    cfg = write_config(tmp_path, broker)
    delay_line = (
        "delay levels: 22 queues amqptasks.delay.0..21 (1 s .. 48.5 days), 23 exchanges, "
        "25 bindings, exchange-to-exchange bindings: 22 (-v lists them)"
    )
    shown = run_cli(cfg, "topology", "show")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert delay_line in lines
    assert not [x for x in lines if "amqptasks.delay." in x and x != delay_line]
    for text in (
        "  tasks --[web.#]--> web_tasks",
        "  web_tasks.dlq  role=dead-letter durable=true",
    ):
        assert text in lines
    assert len(lines) < 40  # three queues: a screen, not ~100 lines
    full = run_cli(cfg, "topology", "show", "-v").stdout.splitlines()
    assert "  amqptasks.delay.21  type=topic durable=true" in full
    assert len([x for x in full if "amqptasks.delay." in x]) == 23 + 22 + 25 + 22
    assert run_cli(cfg, "topology", "show", "--all").stdout.splitlines() == full

    applied = run_cli(cfg, "topology", "apply")
    assert applied.returncode == 0, applied.stderr
    lines = applied.stdout.splitlines()
    assert delay_line in lines and not [x for x in lines if x.startswith("declared ")]
    assert lines[-1].endswith(": 110 objects")  # incl. events, control, revocations
    assert broker.depth("amqptasks.delay.21") == 0  # declared all the same
    verbose = run_cli(cfg, "topology", "apply", "-v").stdout.splitlines()
    assert len([x for x in verbose if x.startswith("declared ")]) == 110
    assert "declared queue amqptasks.delay.0" in verbose
