"""``amqptasks worker --metrics-port``: Prometheus metrics scraped over HTTP from a real
worker after a real run, the counts matching exactly what the run did; loopback by
default, credentials required beyond it."""

from __future__ import annotations

import base64
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from broker_fixtures import ROOT, amqptasks_exe, cli_env, wait_for, write_config
from prometheus_client.parser import text_string_to_metric_families

from amqptasks import App, load_config


def scrape(port: int, auth: tuple[str, str] | None = None) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` of one scrape."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metrics_port(output: str) -> int:
    match = re.search(r"metrics: http://127\.0\.0\.1:(\d+)/metrics", output)
    assert match, output
    return int(match.group(1))


def test_a_scrape_after_a_run_counts_exactly_what_happened(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    w = worker_factory(cfg, "-Q", "default", "-c", "2", "--metrics-port", "0")
    port = metrics_port(w.output())
    app = App(load_config(cfg, env={}))
    try:
        adds = [app.send_task("examples.tasks.add", (i, i), queue="default") for i in range(5)]
        assert [r.get(timeout=20) for r in adds] == [0, 2, 4, 6, 8]
        for i in range(2):
            app.send_task("testtasks.fail", (f"f{i}",), queue="default", ignore_result=True)
        # Retried three times (1 s broker-side delays), then dead-lettered.
        app.send_task("testtasks.flaky", ("r", 1.0), queue="default", ignore_result=True)
        app.send_task("no.such.task", queue="default", ignore_result=True)  # unknown: rejected
    finally:
        app.close()
    wait_for(lambda: broker.depth("default.dlq") == 4, timeout=30, message="four dead letters")

    m = wait_for(
        lambda: (s := scrape(port)).get(("amqptasks_tasks_running", ())) == 0 and s,
        message="nothing running",
    )

    def sample(name: str, **labels: str) -> Any:
        return m.get((name, tuple(sorted(labels.items()))))

    outcomes = {
        (dict(labels)["task"], dict(labels)["outcome"]): value
        for (name, labels), value in m.items()
        if name == "amqptasks_tasks_total"
    }
    assert outcomes == {
        ("examples.tasks.add", "succeeded"): 5,
        ("testtasks.fail", "failed"): 2,
        ("testtasks.flaky", "retried"): 3,
        ("testtasks.flaky", "failed"): 1,
        ("no.such.task", "rejected"): 1,
    }
    assert sample("amqptasks_task_retries_total", task="testtasks.flaky") == 3
    dead = {
        dict(labels)["reason"]: value
        for (name, labels), value in m.items()
        if name == "amqptasks_dead_lettered_total"
    }
    assert dead == {"task-failed": 3, "unknown-task": 1}
    assert sample("amqptasks_dead_lettered_total", queue="default", reason="task-failed") == 3
    for task, runs in (("examples.tasks.add", 5), ("testtasks.fail", 2), ("testtasks.flaky", 4)):
        assert sample("amqptasks_task_runtime_seconds_count", task=task) == runs
        assert sample("amqptasks_task_runtime_seconds_bucket", task=task, le="+Inf") == runs
        assert sample("amqptasks_task_runtime_seconds_sum", task=task) > 0
    assert sample("amqptasks_task_runtime_seconds_count", task="no.such.task") is None
    assert sample("amqptasks_reconnects_total") == 0
    assert sample("amqptasks_tasks_reserved") == 0
    assert sample("amqptasks_prefetch_in_use") == 0
    assert (sample("amqptasks_pool_size"), sample("amqptasks_prefetch")) == (2, 8)


def test_prefetch_in_use_and_in_flight_while_tasks_run(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    ledger, gate = tmp_path / "ledger", tmp_path / "gate"
    w = worker_factory(cfg, "-Q", "default", "-c", "2", "--metrics-port", "0", ledger=ledger)
    port = metrics_port(w.output())
    app = App(load_config(cfg, env={}))
    try:
        for i in range(5):
            app.send_task(
                "testtasks.gated", (f"g{i}", str(gate)), queue="default", ignore_result=True
            )
    finally:
        app.close()
    m = wait_for(
        lambda: (s := scrape(port)).get(("amqptasks_tasks_reserved", ())) == 3 and s,
        message="two running, three waiting",
    )
    assert m[("amqptasks_tasks_running", ())] == 2
    assert m[("amqptasks_prefetch_in_use", ())] == 5
    gate.touch()
    wait_for(
        lambda: scrape(port).get(("amqptasks_prefetch_in_use", ())) == 0, message="all settled"
    )


def run_worker(config: Path, *args: str, env: dict[str, str] | None = None):
    return subprocess.run(
        [amqptasks_exe(), "worker", "--config", str(config), *args],
        cwd=ROOT,
        env={**cli_env(config), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_beyond_loopback_the_metrics_need_credentials(tmp_path, broker):
    cfg = write_config(tmp_path, broker)
    out = run_worker(cfg, "--metrics-port", "0", "--metrics-address", "0.0.0.0")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "error: --metrics-address 0.0.0.0 is not loopback: give credentials with "
        "--metrics-auth USER:PASS or $AMQPTASKS_METRICS_AUTH, or listen on 127.0.0.1"
    )
    bad = run_worker(cfg, "--metrics-port", "0", "--metrics-auth", "nopassword")
    assert bad.returncode == 2
    assert "--metrics-auth: expected USER:PASS with a non-empty user and password" in bad.stderr


def test_basic_auth_is_checked_and_the_password_never_shown(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    password = "s3cret-metrics-Pw"
    w = worker_factory(
        cfg,
        "-Q",
        "default",
        "--metrics-port",
        "0",
        extra_env={"AMQPTASKS_METRICS_AUTH": f"prom:{password}"},
    )
    port = metrics_port(w.output())
    assert "(basic auth, user prom)" in w.output()
    for auth in (None, ("prom", "wrong"), ("other", password)):
        try:
            scrape(port, auth)
        except urllib.error.HTTPError as exc:
            assert exc.code == 401
            assert exc.headers["WWW-Authenticate"] == 'Basic realm="amqptasks metrics"'
        else:
            raise AssertionError(f"scrape with {auth} was let in")
    assert ("amqptasks_pool_size", ()) in scrape(port, ("prom", password))
    w.stop()
    assert password not in w.output()
