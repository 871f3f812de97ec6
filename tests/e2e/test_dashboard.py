"""``amqptasks dashboard`` end to end: the real CLI as a subprocess against the real broker
(each test its own vhost and broker user), workers started with ``-E``, requests over HTTP
(and the seed article's curl). The browser tests are in test_dashboard_browser.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from broker_fixtures import ROOT, amqptasks_exe, cli_env, ledger_lines, wait_for, write_config
from dashboard_fixtures import (
    PASSWORD,
    SCHEDULES,
    USER,
    DashboardProcess,
    expected_fires,
    free_port,
    http,
    put_dead_letters,
)

from amqptasks import App, load_config
from amqptasks.dashboard.auth import hash_password, new_token
from amqptasks.dashboard.openapi import document


def dash_config(tmp_path: Path, broker: Any, url: str, **dashboard: Any) -> Path:
    section = {
        "database": str(tmp_path / "dashboard.sqlite3"),
        "basic_auth": [f"{USER}:{hash_password(PASSWORD)}"],
        **dashboard,
    }
    return write_config(
        tmp_path,
        broker,
        broker={"url": url, "publish_timeout": 10},
        events={"heartbeat_interval": 0.5},
        dashboard=section,
    )


@pytest.fixture
def cfg(tmp_path, broker, broker_user):
    return dash_config(tmp_path, broker, broker_user[2])


def test_the_seed_curl_runs_add_and_the_result_says_3(cfg, worker_factory, dashboard_factory):
    d = dashboard_factory(cfg)
    worker_factory(cfg, "-Q", "default", "-E", "-n", "w1@dash")
    wait_for(lambda: "w1@dash" in d.get("/api/workers").json(), message="w1 in /api/workers")
    curl = shutil.which("curl")
    assert curl, "curl is needed for the seed article's command"
    out = subprocess.run(
        [
            curl,
            "-s",
            "-u",
            f"{USER}:{PASSWORD}",
            "-X",
            "POST",
            "-d",
            '{"args":[1,2]}',
            f"{d.base}/api/task/async-apply/examples.tasks.add",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    sent = __import__("json").loads(out)
    assert sent["state"] == "PENDING" and sent["task-id"]
    answer = d.get(f"/api/task/result/{sent['task-id']}?timeout=10").json()
    assert answer == {"task-id": sent["task-id"], "state": "SUCCESS", "result": 3}
    info = wait_for(
        lambda: (
            (a := d.get(f"/api/task/info/{sent['task-id']}")).status == 200
            and a.json()["state"] == "SUCCESS"
            and a.json()
        ),
        message="the task's events in the history",
    )
    assert info["args"] == "[1,2]" and info["worker"] == "w1@dash"
    assert [e["type"] for e in info["timeline"]] == [
        "task-received",
        "task-started",
        "task-succeeded",
    ]
    # async-apply refuses a name no worker registered; send-task sends it anyway.
    unknown = d.post("/api/task/async-apply/examples.tasks.nope", {"args": []})
    assert unknown.status == 404 and "no worker registered" in unknown.json()["error"]
    assert d.post("/api/task/send-task/examples.tasks.nope", {}).status == 200
    # Where a task may be sent: declared exchanges, work queues — by name or through the
    # default exchange's routing key — and nowhere else (not a DLQ, not an internal queue).
    send = "/api/task/send-task/examples.tasks.add"
    for where, why in [
        ({"exchange": "nope"}, "exchange 'nope' is not declared"),
        ({"queue": "default.dlq"}, "queue 'default.dlq' is not a work queue"),
        ({"exchange": "", "routing_key": "default.dlq"}, "routing key 'default.dlq'"),
        ({"exchange": "", "routing_key": "amqptasks.revocations"}, "is not a work queue"),
    ]:
        refused = d.post(send, {"args": [1, 2], **where})
        assert refused.status == 400 and why in refused.json()["error"], (where, refused.text)
    direct = d.post(send, {"args": [1, 2], "exchange": "", "routing_key": "default"})
    assert direct.status == 200, direct.text


def _every_path() -> list[tuple[str, str]]:
    out = []
    for path, ops in document()["paths"].items():
        for method in ops:
            out.append((method.upper(), re.sub(r"\{[^}]+\}", "x", path)))
    out += [("GET", p) for p in ("/", "/tasks", "/workers", "/task/x", "/static/app.js",
                                 "/static/style.css", "/nope", "/api/nope", "/login")]  # fmt: skip
    out += [("POST", "/logout")]
    return out


def test_every_path_but_healthcheck_answers_401_without_or_with_wrong_credentials(
    cfg, dashboard_factory
):
    d = dashboard_factory(cfg)
    token, _digest = new_token()
    refusals = []
    for method, path in _every_path():
        if path == "/healthcheck":
            continue
        for label, kw in (
            ("none", {"auth": None}),
            ("wrong password", {"auth": (USER, PASSWORD + "x")}),
            ("unknown user", {"auth": ("root", PASSWORD)}),
            ("unknown token", {"auth": None, "headers": {"Authorization": f"Bearer {token}"}}),
        ):
            a = http(d.base, method, path, **kw)
            if a.status != 401:
                refusals.append((method, path, label, a.status))
            assert PASSWORD not in a.text
    assert refusals == []
    assert http(d.base, "GET", "/healthcheck").text == "OK"
    assert d.get("/api/stats").status == 200
    # Scripts get the Basic challenge; a browser's fetch does not (no password dialog).
    assert http(d.base, "GET", "/api/stats").headers["WWW-Authenticate"].startswith("Basic ")
    browser = http(d.base, "GET", "/api/stats", headers={"Sec-Fetch-Mode": "cors"})
    assert browser.status == 401 and "WWW-Authenticate" not in browser.headers


def test_no_password_is_in_any_page_answer_or_log_line(
    tmp_path, broker, broker_user, worker_factory, dashboard_factory
):
    _user, broker_password, url = broker_user
    # A plain dashboard password this time, given on the command line.
    cfg = dash_config(tmp_path, broker, url, basic_auth=[])
    d = dashboard_factory(cfg, "--basic-auth", f"{USER}:{PASSWORD}", "-l", "debug")
    worker_factory(cfg, "-Q", "default", "-E", "-n", "w1@dash")
    wait_for(lambda: "w1@dash" in d.get("/api/workers").json(), message="w1 online")
    d.post("/api/task/async-apply/examples.tasks.add", {"args": [1, 2]})
    texts = []
    for method, path in _every_path():
        if method == "GET" and path not in ("/api/live", "/api/task/result/x"):
            texts.append(d.get(path.replace("/x", "/default") if "dlq" in path else path).text)
    texts.append(d.get("/api/workers?refresh=1").text)
    texts.append(d.get("/api/broker").text)
    texts.append(d.output())
    for secret in (broker_password, PASSWORD):
        leaks = [t[:200] for t in texts if secret in t]
        assert leaks == [], secret
    # the answers searched were real ones, not errors
    assert "rabbitmq_version" in d.get("/api/broker").text
    assert "w1@dash" in d.get("/api/workers").text and d.get("/api/queues").status == 200


@pytest.mark.parametrize(
    "path",
    [
        "/static/../../pyproject.toml",
        "/static/%2e%2e/%2e%2e/pyproject.toml",
        "/static/..%2f..%2fpyproject.toml",
        "/static/%2e%2e%2f%2e%2e%2fconfig.py",
        "/static/....//....//pyproject.toml",
        "/static/app.js%00.css",
        "/static//etc/passwd",
        "/api/task/info/..%2f..%2f..%2fetc%2fpasswd",
        "/api/task/info/../../../etc/passwd",
        "/api/dlq/..%2f..%2fetc%2fpasswd",
    ],
)
def test_path_traversal_in_static_and_api_paths_is_refused(cfg, dashboard_factory, path):
    d = dashboard_factory(cfg)
    a = d.get(path)
    assert a.status in (400, 404), (a.status, a.text[:200])
    for marker in ("[build-system]", "root:x:0:0", "def load_config"):
        assert marker not in a.text


def test_a_task_page_for_a_strange_id_shows_it_as_text(cfg, dashboard_factory):
    d = dashboard_factory(cfg)
    a = d.get("/task/..%2f..%2fetc%2fpasswd%22%3E%3Cscript%3Ex%3C%2Fscript%3E")
    assert a.status == 200 and "root:x:0:0" not in a.text
    assert 'data-item="../../etc/passwd&quot;&gt;&lt;script&gt;x&lt;/script&gt;"' in a.text


def apply_topology(cfg: Path) -> None:
    subprocess.run(
        [amqptasks_exe(), "topology", "apply", "--config", str(cfg)],
        cwd=ROOT,
        env=cli_env(cfg),
        check=True,
        capture_output=True,
        timeout=60,
    )


def _login(d: DashboardProcess) -> tuple[str, str]:
    """A browser's login: the form's token and cookie, then the session cookie and the
    page's CSRF token."""
    page = http(d.base, "GET", "/tasks")
    assert page.status == 401
    token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    cookie = page.headers["Set-Cookie"].split(";")[0]
    done = http(
        d.base,
        "POST",
        "/login",
        raw=f"csrf={token}&username={USER}&password={PASSWORD}".encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie},
    )
    assert done.status == 303, done.text[:300]
    session = done.headers["Set-Cookie"].split(";")[0]
    shell = http(d.base, "GET", "/tasks", headers={"Cookie": session})
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', shell.text).group(1)
    return session, csrf


def test_security_headers_csrf_and_cross_site_refusals(cfg, dashboard_factory):
    apply_topology(cfg)
    d = dashboard_factory(cfg)
    session, csrf = _login(d)
    page = http(d.base, "GET", "/tasks", headers={"Cookie": session})
    assert page.status == 200
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert page.headers["X-Frame-Options"] == "DENY"
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Referrer-Policy"] == "same-origin"
    assert "<script>" not in page.text  # only <script src=...>
    for a in (page, d.get("/api/stats"), http(d.base, "GET", "/nope")):
        assert "Content-Security-Policy" in a.headers and a.headers["Cache-Control"] == "no-store"
    send = "/api/task/send-task/examples.tasks.add"
    body = {"args": [1, 2]}
    assert http(d.base, "POST", send, body=body, headers={"Cookie": session}).status == 403
    wrong = {"Cookie": session, "X-CSRF-Token": csrf[:-2] + "xx"}
    assert http(d.base, "POST", send, body=body, headers=wrong).status == 403
    right = {"Cookie": session, "X-CSRF-Token": csrf}
    assert http(d.base, "POST", send, body=body, headers=right).status == 200
    evil = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
    assert d.post(send, body, headers=evil).status == 403  # even with Basic credentials
    assert d.post(send, body, headers={"Origin": "null"}).status == 403
    assert http(d.base, "POST", send, body=body, headers={**right, **evil}).status == 403
    # Another site may link to a page (a navigation), not read the API or embed it.
    embed = {"Cookie": session, "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}
    assert http(d.base, "GET", "/api/stats", headers=embed).status == 403
    link = {"Cookie": session, "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    assert http(d.base, "GET", "/", headers=link).status == 200
    own = {"Cookie": session, "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}
    assert http(d.base, "GET", "/api/stats", headers=own).status == 200
    # A session ends with its logout.
    form = {"Cookie": session, "Content-Type": "application/x-www-form-urlencoded"}
    out = http(d.base, "POST", "/logout", raw=f"csrf={csrf}".encode(), headers=form)
    assert out.status == 303
    assert http(d.base, "GET", "/api/stats", headers={"Cookie": session}).status == 401


def test_an_api_token_works_and_is_never_stored(tmp_path, broker, broker_user, dashboard_factory):
    token, digest = new_token()
    cfg = dash_config(tmp_path, broker, broker_user[2], api_tokens=[f"ci:{digest}"])
    assert token not in cfg.read_text()
    d = dashboard_factory(cfg)
    bearer = {"Authorization": f"Bearer {token}"}
    assert http(d.base, "GET", "/api/stats", headers=bearer).status == 200
    assert http(d.base, "GET", "/api/stats", headers={"Authorization": "Bearer x"}).status == 401


def test_without_credentials_it_refuses_to_listen_beyond_loopback(tmp_path, broker):
    cfg = write_config(tmp_path, broker)
    for address in ("0.0.0.0", "192.0.2.10", "::"):
        r = subprocess.run(
            [amqptasks_exe(), "dashboard", "--config", str(cfg), "--address", address],
            cwd=ROOT,
            env={k: v for k, v in cli_env(cfg).items() if k != "AMQPTASKS_DASHBOARD_AUTH"},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 2, r.stderr
        line = r.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: refusing to listen on {address} without credentials")
        for how in (
            "--basic-auth USER:PASSWORD",
            "dashboard.basic_auth",
            "$AMQPTASKS_DASHBOARD_AUTH",
        ):
            assert how in line


def test_loopback_without_credentials_refuses_a_foreign_host_header(
    tmp_path, broker, dashboard_factory
):
    cfg = write_config(tmp_path, broker, dashboard={"database": str(tmp_path / "d.sqlite3")})
    d = dashboard_factory(cfg)
    assert http(d.base, "GET", "/api/stats").status == 200
    rebound = http(d.base, "GET", "/api/stats", headers={"Host": f"evil.example:{d.port}"})
    assert rebound.status == 403


def test_metrics_need_credentials_unless_made_public(
    tmp_path, broker, broker_user, dashboard_factory
):
    cfg = dash_config(tmp_path, broker, broker_user[2])
    d = dashboard_factory(cfg)
    assert http(d.base, "GET", "/metrics").status == 401
    assert "amqptasks_workers_online" in d.get("/metrics").text
    d.stop()
    public = dashboard_factory(cfg, "--metrics-public")
    a = http(public.base, "GET", "/metrics")
    assert a.status == 200 and "amqptasks_workers_online" in a.text
    assert http(public.base, "GET", "/api/stats").status == 401


def scrape(d: DashboardProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` parsed with prometheus-client's own parser: (sample, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    answer = d.get("/metrics")
    assert answer.status == 200, answer.text[:300]
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }


def test_metrics_and_charts_follow_what_ran(cfg, broker_user, worker_factory, dashboard_factory):
    """3 successes and 1 failure of one task name, 2 workers, 5 messages waiting in a queue
    no worker consumes, 1 undecodable events message: every metric family the dashboard
    documents, and the charts' series, say exactly that."""
    import pika

    apply_topology(cfg)
    d = dashboard_factory(cfg)
    for name in ("w1@dash", "w2@dash"):
        worker_factory(cfg, "-Q", "default", "-E", "-n", name)
    wait_for(lambda: len(d.get("/api/workers?status=online").json()) == 2, message="2 online")
    add = "examples.tasks.add"
    app = App(load_config(cfg, env={}))
    try:
        ok = [app.send_task(add, (i, i), queue="default") for i in range(3)]
        bad = app.send_task(add, (1, "x"), queue="default")  # TypeError: a FAILURE
        for i in range(5):
            app.send_task("testtasks.record", (f"waits {i}",), queue="web_tasks")
        assert [r.get(timeout=20) for r in ok] == [0, 2, 4]
    finally:
        app.close()
    conn = pika.BlockingConnection(pika.URLParameters(broker_user[2]))
    try:
        conn.channel().basic_publish("amqptasks.events", "task.bogus", b"not an events batch")
    finally:
        conn.close()

    def settled() -> Any:
        m = scrape(d)
        done = (
            m.get(("amqptasks_tasks_total", (("name", add), ("state", "SUCCESS")))) == 3
            and m.get(("amqptasks_tasks_total", (("name", add), ("state", "FAILURE")))) == 1
            and m.get(("amqptasks_queue_messages", (("queue", "web_tasks"),))) == 5
            and m.get(("amqptasks_queue_messages", (("queue", "default.dlq"),))) == 1
            and m.get(("amqptasks_dashboard_undecodable_messages_total", ())) == 1
        )
        return done and m

    m = wait_for(settled, timeout=40, message="the counters and a queue sample after the run")
    assert d.get(f"/api/task/info/{bad.id}").json()["state"] == "FAILURE"
    states = {k[1][1][1] for k in m if k[0] == "amqptasks_tasks_total" and k[1][0][1] == add}
    assert states == {"SUCCESS", "FAILURE"}
    # Runtimes: one observation per finished task (the failure's too), cumulative buckets.
    name = (("name", add),)
    assert m[("amqptasks_task_runtime_seconds_count", name)] == 4
    assert 0 < m[("amqptasks_task_runtime_seconds_sum", name)] < 20
    buckets = sorted(
        (float(dict(k[1])["le"]), v)
        for k, v in m.items()
        if k[0] == "amqptasks_task_runtime_seconds_bucket" and dict(k[1])["name"] == add
    )
    assert buckets[-1] == (float("inf"), 4)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    # Workers: both online, each up.
    assert m[("amqptasks_workers_online", ())] == 2
    assert m[("amqptasks_worker_up", (("worker", "w1@dash"),))] == 1
    assert m[("amqptasks_worker_up", (("worker", "w2@dash"),))] == 1
    # Queue depths from the management API: 5 waiting, the work queue drained.
    assert m[("amqptasks_queue_messages", (("queue", "default"),))] == 0
    # The dashboard's own: 4 tasks in the history (the 5 waiting ones never ran: no events).
    assert m[("amqptasks_dashboard_history_tasks", ())] == 4
    assert m[("amqptasks_dashboard_events_total", ())] >= 4 * 3
    assert 0 <= m[("amqptasks_dashboard_ingest_lag_seconds", ())] < 30
    # The charts: per-minute counts sum to what ran; the depth series saw the 5 waiting.
    charts = d.get("/api/charts").json()
    sums: dict[str, int] = {}
    for minute in charts["minutes"]:
        for state, n in minute["counts"].items():
            sums[state] = sums.get(state, 0) + n
    assert sums == {"RECEIVED": 4, "STARTED": 4, "SUCCESS": 3, "FAILURE": 1}, sums
    depth = charts["depth"]
    assert depth and depth[-1]["queues"]["web_tasks"] == 5
    assert depth[-1]["queues"]["default.dlq"] == 1
    assert [p["time"] for p in depth] == sorted(p["time"] for p in depth)


def test_sigkill_during_a_5000_task_run_loses_nothing(cfg, worker_factory, dashboard_factory):
    d = dashboard_factory(cfg)  # declares the durable events queue
    worker_factory(cfg, "-Q", "default", "-E", "-n", "w1@dash", "-c", "8")
    app = App(load_config(cfg, env={}))
    try:
        app.send_many(
            [("examples.tasks.add", (i, i), None) for i in range(5000)], ignore_result=True
        )
    finally:
        app.close()
    wait_for(lambda: d.get("/api/stats").json()["events"] > 1500, timeout=60,
             message="the dashboard in the middle of the run")  # fmt: skip
    before = d.get("/api/stats").json()["tasks"]
    d.kill()
    assert before < 5000, "the run finished before the kill: nothing was tested"
    time.sleep(1.0)  # events keep arriving in the durable queue meanwhile
    again = dashboard_factory(cfg, port=d.port)

    def all_in() -> bool:
        page = again.get("/api/task-list?state=SUCCESS&limit=1").json()
        return page["total"] == 5000

    wait_for(all_in, timeout=120, message="all 5,000 tasks SUCCESS in the history")
    stats = again.get("/api/stats").json()
    assert stats["tasks"] == 5000
    print(f"\nkilled with {before} tasks in the history; after the restart: {stats['tasks']}")


def test_dead_letters_replay_and_purge_with_confirmation(cfg, worker_factory, dashboard_factory):
    d = dashboard_factory(cfg)
    worker_factory(cfg, "-Q", "default", "-E", "-n", "w1@dash")
    app = App(load_config(cfg, env={}))
    try:
        ids = [
            app.send_task("testtasks.fail", (f"boom {i}",), queue="default").id for i in range(3)
        ]
    finally:
        app.close()
    letters = wait_for(
        lambda: len(x := d.get("/api/dlq/default").json()["letters"]) == 3 and x,
        message="three dead letters",
    )
    assert {x["id"] for x in letters} == set(ids)
    assert {x["reason"] for x in letters} == {"task-failed"}
    assert letters[0]["exception"].startswith("ValueError: boom")
    r = d.post("/api/dlq/default/replay", {"ids": [ids[0]]}).json()
    assert r == {"replayed": 1, "problems": [], "skipped": {}}
    # the replayed copy fails again and comes back: wait for the third failure event
    wait_for(lambda: len(d.get("/api/dlq/default").json()["letters"]) == 3, message="back")
    assert d.post("/api/dlq/default/purge", {}).status == 400
    assert d.post("/api/dlq/default/purge", {"confirm": "default"}).status == 400
    assert d.post("/api/dlq/default/purge", {"confirm": "default.dlq"}).json() == {"purged": 3}
    assert d.get("/api/dlq/default").json()["letters"] == []
    assert d.get("/api/dlq/nosuchqueue").status == 404


def test_replay_selected_then_all_dead_letters_through_the_api(
    tmp_path, broker, cfg, worker_factory, dashboard_factory
):
    """4 dead letters: replaying 2 selected puts exactly those 2 back on their queue (and
    they run), the other 2 stay in the DLQ; replaying all empties it and they run too. Each
    task runs once."""
    apply_topology(cfg)
    d = dashboard_factory(cfg)
    tags = ["a", "b", "c", "d"]
    ids = put_dead_letters(broker, "default", tags)
    letters = wait_for(
        lambda: len(x := d.get("/api/dlq/default").json()["letters"]) == 4 and x,
        message="four dead letters",
    )
    assert {x["id"] for x in letters} == set(ids)
    assert {x["reason"] for x in letters} == {"task-failed"}
    picked, rest = [ids[0], ids[2]], [ids[1], ids[3]]
    r = d.post("/api/dlq/default/replay", {"ids": picked})
    assert r.status == 200 and r.json() == {"replayed": 2, "problems": [], "skipped": {}}
    # No worker yet: the two wait on their work queue, the others are still dead letters.
    assert broker.depth("default") == 2
    assert sorted(x["id"] for x in d.get("/api/dlq/default").json()["letters"]) == sorted(rest)
    ledger = tmp_path / "ran.log"
    worker_factory(cfg, "-Q", "default", "-E", "-n", "w1@dash", ledger=ledger)
    wait_for(lambda: {"done a", "done c"} <= set(ledger_lines(ledger)), message="a and c ran")
    for task_id in picked:
        wait_for(
            lambda t=task_id: d.get(f"/api/task/info/{t}").json().get("state") == "SUCCESS",
            message=f"{task_id} SUCCESS in the history",
        )
    assert broker.depth("default.dlq") == 2
    assert not {"start b", "start d"} & set(ledger_lines(ledger))
    r = d.post("/api/dlq/default/replay", {"all": True})
    assert r.status == 200 and r.json() == {"replayed": 2, "problems": [], "skipped": {}}
    assert d.get("/api/dlq/default").json()["letters"] == []
    assert broker.depth("default.dlq") == 0
    wait_for(lambda: {f"done {t}" for t in tags} <= set(ledger_lines(ledger)),
             message="every replayed task ran")  # fmt: skip
    assert sorted(line for line in ledger_lines(ledger) if line.startswith("done")) == [
        f"done {t}" for t in tags
    ]
    # Neither 'ids' nor 'all', or both: a 400 naming the choice.
    for body in ({}, {"ids": [ids[0]], "all": True}):
        bad = d.post("/api/dlq/default/replay", body)
        assert bad.status == 400 and "'ids' or 'all'" in bad.json()["error"]


def test_the_schedules_api_shows_each_schedule_with_its_next_fire_times(
    tmp_path, broker, broker_user, dashboard_factory
):
    cfg = write_config(
        tmp_path,
        broker,
        broker={"url": broker_user[2], "publish_timeout": 10},
        schedules=SCHEDULES,
        dashboard={
            "database": str(tmp_path / "dashboard.sqlite3"),
            "basic_auth": [f"{USER}:{hash_password(PASSWORD)}"],
        },
    )
    d = dashboard_factory(cfg)
    before = datetime.now(timezone.utc)
    answer = d.get("/api/schedules").json()
    after = datetime.now(timezone.utc)
    assert answer["source"] == str(cfg)
    shown = {s["name"]: s for s in answer["schedules"]}
    assert sorted(shown) == sorted(SCHEDULES)
    for name, spec in SCHEDULES.items():
        s = shown[name]
        assert s["task"] == spec["task"]
        assert s["timezone"] == spec.get("timezone", "UTC")
        # A fire time can pass between the request and the clock read: either side's is right.
        assert s["next"] in (expected_fires(name, before), expected_fires(name, after)), name
    assert shown["every7m"]["timing"] == "every 7m from 2026-01-01T00:00:03Z"
    assert shown["kathmandu"]["timing"] == "cron '7 9 * * *' (Asia/Kathmandu)"
    # 09:07 in Kathmandu (UTC+5:45) is 03:22 UTC, every day.
    assert {t[11:] for t in shown["kathmandu"]["next"]} == {"03:22:00Z"}


def test_workers_pages_controls_and_commands_the_workers_lack(
    cfg, worker_factory, dashboard_factory
):
    d = dashboard_factory(cfg)
    worker_factory(cfg, "-Q", "default", "-E", "-n", "w1@dash")
    wait_for(lambda: "w1@dash" in d.get("/api/workers").json(), message="w1 online")
    w = d.get("/api/workers").json()["w1@dash"]
    assert w["status"] == "online" and w["queues"] == ["default"] and w["pool"]
    added = d.post("/api/worker/queue/add-consumer/w1@dash?queue=web_tasks")
    assert added.status == 200, added.text
    assert "web_tasks" in added.json()["replies"]["w1@dash"]["queues"]
    bad = d.post("/api/worker/queue/add-consumer/w1@dash?queue=nope")
    assert bad.status == 400 and "UnknownQueue" in bad.json()["error"]
    # The pool buttons: the worker's own reply says what its pool became.
    before = w["concurrency"]
    grow = d.post("/api/worker/pool/grow/w1@dash?n=2")
    assert grow.status == 200, grow.text
    assert grow.json()["replies"]["w1@dash"]["concurrency"] == before + 2
    shrink = d.post("/api/worker/pool/shrink/w1@dash?n=1")
    assert shrink.status == 200, shrink.text
    assert shrink.json()["replies"]["w1@dash"]["concurrency"] == before + 1
    scale = d.post("/api/worker/pool/autoscale/w1@dash?max=6&min=2")
    assert scale.status == 200, scale.text
    assert scale.json()["replies"]["w1@dash"]["autoscale"] == {"max": 6, "min": 2}
    bad_scale = d.post("/api/worker/pool/autoscale/w1@dash?max=2&min=6")
    assert bad_scale.status == 400, bad_scale.text
    assert d.post("/api/worker/shutdown/w9@nowhere").status == 404
    assert d.post("/api/worker/shutdown/w1@dash").json()["message"] == "Shutting down!"
    wait_for(lambda: d.get("/api/workers").json()["w1@dash"]["status"] == "offline",
             message="w1 offline after its shutdown")  # fmt: skip


def test_revoke_and_rate_limit_through_flowers_paths(cfg, worker_factory, dashboard_factory):
    """A revoke from the dashboard is stored in the broker (it holds for a worker started
    after it); a rate limit reaches the running worker."""
    apply_topology(cfg)  # the delay levels and the revocations stream, before any worker
    d = dashboard_factory(cfg)
    # send-task: no worker is up yet to have registered the name (async-apply checks it).
    sent = d.post("/api/task/send-task/examples.tasks.add", {"args": [1, 2], "countdown": 3})
    assert sent.status == 200, sent.text
    task_id = sent.json()["task-id"]
    revoked = d.post(f"/api/task/revoke/{task_id}")  # no worker is up: kept by the broker
    assert revoked.status == 200, revoked.text
    assert revoked.json()["message"] == f"Revoked '{task_id}'"
    worker_factory(cfg, "-Q", "default", "-E", "-n", "w1@dash")
    info = wait_for(
        lambda: (
            (a := d.get(f"/api/task/info/{task_id}")).status == 200
            and a.json()["state"] == "REVOKED"
            and a.json()
        ),
        timeout=30,
        message="the revoked task settled as REVOKED when it came due",
    )
    assert "task-succeeded" not in [e["type"] for e in info["timeline"]]
    limited = d.post("/api/task/rate-limit/examples.tasks.add?ratelimit=10/m")
    assert limited.status == 200, limited.text
    assert limited.json()["replies"]["w1@dash"]["rate_limit"]["rate"] == "10/m"
    bad = d.post("/api/task/rate-limit/examples.tasks.add?ratelimit=fast")
    assert bad.status == 400, bad.text
    timed = d.post("/api/task/timeout/examples.tasks.add?hard=20")
    assert timed.status == 200, timed.text
    assert timed.json()["replies"]["w1@dash"] == {
        "task": "examples.tasks.add",
        "soft_time_limit": 0.0,
        "time_limit": 20.0,
    }


def test_the_openapi_document_is_served_and_holds_against_the_real_server(
    cfg, worker_factory, dashboard_factory
):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation.case import Case
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    from amqptasks.control import COMMANDS

    apply_topology(cfg)
    d = dashboard_factory(cfg)
    served = d.get("/openapi.json").json()
    assert served == document()
    schema = schemathesis.openapi.from_dict(served)
    auth = {"Authorization": http_basic()}
    failures = []
    calls = 0

    for operation in schema.get_all_operations():
        op = operation.ok()
        if op.path in ("/api/live",):  # an endless stream: checked by the browser test
            continue
        if op.path.startswith("/api/worker/shutdown"):
            continue  # would stop the workers of this vhost: covered above

        excluded = []
        if "/send-task/" in op.path or "/async-apply/" in op.path:
            # A route the schema cannot know (a routing key no queue binds) is a 400.
            excluded.append(positive_data_acceptance)
        if op.path.split("/")[-2] in ("shrink", "autoscale", "rate-limit", "timeout"):
            # MIN above MAX, a shrink below one slot, a task no worker has, a soft limit above
            # the hard one: a 400 the schema cannot express.
            excluded.append(positive_data_acceptance)
        missing = {"revoke", "rate-limit", "timeout", "grow", "shrink", "autoscale"}
        command = op.path.split("/")[-2]
        lacking = command in missing and not ({command, f"pool-{command}"} & set(COMMANDS))
        if command == "timeout":
            lacking = "time-limit" not in COMMANDS
        if lacking:
            # 501 until the workers have the command (docs/control.md "Adding a command").
            excluded += [not_a_server_error, positive_data_acceptance]

        @settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)  # fmt: skip
        @given(case=op.as_strategy())
        def check(case: Case) -> None:
            nonlocal calls
            calls += 1
            # check() runs at once, inside this loop turn: the loop variables are current.
            response = case.call_and_validate(
                base_url=d.base,
                headers=auth,
                excluded_checks=excluded,  # noqa: B023
            )
            if lacking:  # noqa: B023
                assert response.status_code in (400, 501), response.text

        try:
            check()
        except (Exception, BaseExceptionGroup) as exc:  # noqa: F821 (py3.11+)
            failures.append(f"{op.method.upper()} {op.path}: {str(exc)[:600]}")
    assert failures == [], "\n".join(failures)
    assert calls >= 60
    assert d.proc.poll() is None


def http_basic() -> str:
    import base64

    return "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def test_with_its_broker_away_it_serves_and_every_answer_names_the_cause(
    tmp_path, broker, dashboard_factory
):
    """A dashboard started while its broker (AMQP and management API) is away keeps
    serving; what needs the broker answers 502 saying why, never aiohttp's bare 500."""
    away = f"amqp://guest:hidden-pw@127.0.0.1:{free_port()}/%2F"
    cfg = write_config(
        tmp_path,
        broker,
        broker={"url": away, "publish_timeout": 2},
        dashboard={
            "database": str(tmp_path / "dashboard.sqlite3"),
            "basic_auth": [f"{USER}:{PASSWORD}"],
            "management_url": f"http://127.0.0.1:{free_port()}",
        },
    )
    d = dashboard_factory(cfg, ready=False)
    wait_for(lambda: "dashboard: http" in d.output(), message="the dashboard listening")
    for method, path, body, cause in (
        ("GET", "/api/task/types", None, "connection refused"),
        ("POST", "/api/task/async-apply/examples.tasks.add", {"args": [1, 2]}, "refused"),
        ("POST", "/api/task/revoke/some-id", {}, "connection refused"),
        ("POST", "/api/worker/shutdown/w1@x", {}, "connection refused"),
        ("GET", "/api/queues/length", None, "management API unreachable"),
        ("GET", "/api/dlq/default.dlq", None, "cannot connect"),
    ):
        a = http(d.base, method, path, auth=(USER, PASSWORD), body=body)
        assert a.status == 502, (path, a.status, a.text)
        assert cause in a.json()["error"], (path, a.text)
        assert "hidden-pw" not in a.text
    assert http(d.base, "GET", "/api/stats", auth=(USER, PASSWORD)).json()["connected"] is False
    assert d.proc.poll() is None
    assert "hidden-pw" not in d.output()
