"""The dashboard in a real headless Chromium: Debian's ``chromium`` driven by Playwright
(no browser download: ``executable_path`` points at the system one; ``./dev test`` installs
it when missing and root). Two workers with ``-E``, the real CLI, the real broker.

``AMQPTASKS_SCREENSHOTS=DIR`` also writes the screenshots there (docs/dashboard/ holds the
committed ones)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from broker_fixtures import ledger_lines, wait_for, write_config
from dashboard_fixtures import PASSWORD, SCHEDULES, USER, expected_fires, put_dead_letters

from amqptasks.dashboard.auth import hash_password

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
XSS_SCRIPT = "<script>window.__xss = 1</script>"
XSS_IMG = '"><img src=x onerror="window.__xss = 2">'


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is missing: apt-get install -y chromium (./dev test does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh user-data-dir
            executable_path=str(CHROMIUM),
            args=FLAGS,
            headless=True,
            viewport={"width": 1280, "height": 820},
        )
        try:
            yield context
        finally:
            context.close()


def shoot(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    out = os.environ.get("AMQPTASKS_SCREENSHOTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(out) / path.name)


def login(page: Any, base: str, password: str) -> Any:
    page.goto(base + "/")
    page.fill("#username", USER)
    page.fill("#password", password)
    with page.expect_navigation():
        page.click("button[type=submit]")
    return page


def test_in_chromium_login_workers_submit_watch_detail_replay_and_no_xss(
    tmp_path, broker, broker_user, worker_factory, dashboard_factory, browser
):
    cfg = write_config(
        tmp_path,
        broker,
        broker={"url": broker_user[2], "publish_timeout": 10},
        events={"heartbeat_interval": 0.5},
        dashboard={
            "database": str(tmp_path / "dashboard.sqlite3"),
            "basic_auth": [f"{USER}:{hash_password(PASSWORD)}"],
        },
    )
    d = dashboard_factory(cfg)
    worker_factory(cfg, "-Q", "default", "-E", "-n", "w1@dash")
    worker_factory(cfg, "-Q", "default,web_tasks", "-E", "-n", "w2@dash")
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    # A wrong password gets nothing: the login form again, no data, no session.
    login(page, d.base, PASSWORD + "-wrong")
    assert "Wrong user or password" in page.inner_text("body")
    assert page.locator("#app").count() == 0
    assert page.evaluate("fetch('/api/workers').then(r => r.status)") == 401
    assert not [c for c in browser.cookies() if c["name"] == "amqptasks_session"]
    shoot(page, tmp_path, "login")

    # The right one: the overview, then both workers online.
    login(page, d.base, PASSWORD)
    assert page.url.rstrip("/") == d.base
    page.goto(d.base + "/workers")
    for name in ("w1@dash", "w2@dash"):
        page.wait_for_selector(f'tr[data-worker="{name}"] .s-online', timeout=20_000)
    shoot(page, tmp_path, "workers")

    # Submit from the page and watch it reach SUCCESS without a reload.
    page.goto(d.base + "/tasks")
    page.wait_for_selector("#submit")
    page.evaluate("window.__same_page = 'yes'")
    page.fill('#submit input[name="name"]', "examples.tasks.add")
    page.fill('#submit input[name="args"]', "[20, 22]")
    page.click("#submit button")
    page.wait_for_selector("#notice[data-submitted]")
    task_id = page.get_attribute("#notice", "data-submitted")
    page.wait_for_selector(f'tr[data-id="{task_id}"][data-state="SUCCESS"]', timeout=20_000)
    assert page.evaluate("window.__same_page") == "yes"  # no reload happened
    assert int(page.get_attribute("body", "data-ticks") or 0) >= 1  # the live stream did it

    # Task args that look like markup are shown as text.
    for tag in (XSS_SCRIPT, XSS_IMG):
        page.evaluate(
            """([tag]) => fetch('/api/task/async-apply/testtasks.record', {method: 'POST',
                 headers: {'X-CSRF-Token': document.querySelector('meta[name=csrf-token]').content,
                           'Content-Type': 'application/json'},
                 body: JSON.stringify({args: [tag, 0]})}).then(r => r.status)""",
            [tag],
        )
    page.wait_for_function(
        "() => document.querySelectorAll('tr[data-state=SUCCESS]').length >= 3", timeout=20_000
    )
    shoot(page, tmp_path, "tasks")
    text = page.inner_text("#list")
    # Shown as the JSON text of the value (events carry previews), markup and all.
    assert json.dumps(XSS_SCRIPT) in text and json.dumps(XSS_IMG) in text
    assert page.evaluate("window.__xss") is None
    assert page.locator("#list img").count() == 0 and page.locator("#list script").count() == 0

    # Its detail page: args, result, the timeline.
    page.click(f'tr[data-id="{task_id}"] a')
    page.wait_for_selector("#result")
    assert page.inner_text("#task-id") == task_id
    assert page.inner_text("#result") == "42"
    assert page.inner_text("#args") == "[20,22]"
    timeline = page.inner_text("main table")
    for kind in ("task-received", "task-started", "task-succeeded"):
        assert kind in timeline
    shoot(page, tmp_path, "task")
    page.goto(d.base + "/tasks?search=record")
    page.goto(d.base + "/tasks")
    page.fill('#filters input[name="search"]', "window.__xss")
    page.click("#filters button")
    page.wait_for_function("() => document.querySelectorAll('#list tr[data-id]').length == 2")
    xss_id = page.get_attribute("#list tr[data-id]", "data-id")
    page.goto(f"{d.base}/task/{xss_id}")
    page.wait_for_selector("#result")
    assert page.inner_text("#result") in (json.dumps(XSS_SCRIPT), json.dumps(XSS_IMG))
    assert page.evaluate("window.__xss") is None and page.locator("main img").count() == 0

    # A dead letter, replayed from the page.
    page.evaluate(
        """() => fetch('/api/task/send-task/testtasks.fail', {method: 'POST',
             headers: {'X-CSRF-Token': document.querySelector('meta[name=csrf-token]').content},
             body: JSON.stringify({args: ['replay me'], queue: 'default'})})
           .then(r => r.json()).then(j => { window.__failed = j['task-id']; })"""
    )
    failed = page.wait_for_function("() => window.__failed").json_value()
    page.goto(d.base + "/dlq")
    page.wait_for_selector(f'tr[data-id="{failed}"]', timeout=20_000)
    shoot(page, tmp_path, "dlq")
    page.click(f'tr[data-id="{failed}"] .replay-one')
    page.wait_for_selector("#notice.ok")
    assert "replayed 1" in page.inner_text("#notice")
    # The replayed copy really ran again: a second task-failed in its timeline.
    page.goto(f"{d.base}/task/{failed}")
    page.wait_for_function(
        "() => document.querySelector('main table') && "
        "(document.querySelector('main table').innerText.match(/task-failed/g) || []).length >= 2",
        timeout=20_000,
        polling=500,
    )

    for path, name in (("/", "overview"), ("/queues", "queues")):
        page.goto(d.base + path)
        page.wait_for_selector("main table, main figure", timeout=20_000)
        page.wait_for_timeout(300)
        shoot(page, tmp_path, name)
    assert errors == []


def test_without_worker_events_the_page_says_to_start_workers_with_E(
    tmp_path, broker, worker_factory, dashboard_factory, browser
):
    cfg = write_config(tmp_path, broker, dashboard={"database": str(tmp_path / "d.sqlite3")})
    d = dashboard_factory(cfg)  # loopback, no credentials: no login
    worker_factory(cfg, "-Q", "default", "-n", "quiet@dash")  # events off (the default)
    page = browser.new_page()
    page.goto(d.base + "/workers")
    page.wait_for_selector("#events-hint:not([hidden])", timeout=15_000)
    assert "amqptasks worker -E" in page.inner_text("#events-hint")


def test_in_chromium_replay_selected_replay_all_purge_and_schedules(
    tmp_path, broker, broker_user, worker_factory, dashboard_factory, browser
):
    """The dead-letter page's buttons: replay two selected (exactly those run, the rest
    stay), replay all (asks first: dismissed, nothing happens), purge (asks first); and the
    schedules page shows each schedule of the config with its next fire times."""
    cfg = write_config(
        tmp_path,
        broker,
        broker={"url": broker_user[2], "publish_timeout": 10},
        events={"heartbeat_interval": 0.5},
        schedules=SCHEDULES,
        dashboard={
            "database": str(tmp_path / "dashboard.sqlite3"),
            "basic_auth": [f"{USER}:{hash_password(PASSWORD)}"],
        },
    )
    d = dashboard_factory(cfg)
    ledger = tmp_path / "ran.log"
    worker_factory(cfg, "-Q", "default", "-E", "-n", "w1@dash", ledger=ledger)  # declares
    tags = ["p1", "p2", "p3", "p4", "p5"]
    ids = put_dead_letters(broker, "default", tags)
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    login(page, d.base, PASSWORD)

    def rows() -> list[str]:
        return page.eval_on_selector_all(
            "#app tbody tr[data-id]", "rs => rs.map(r => r.dataset.id)"
        )

    def letters() -> list[str]:
        return sorted(x["id"] for x in d.get("/api/dlq/default").json()["letters"])

    page.goto(d.base + "/dlq")
    page.wait_for_function("() => document.querySelectorAll('tbody tr[data-id]').length == 5")
    for message_id in ids[:2]:
        page.check(f'tr[data-id="{message_id}"] input[type=checkbox]')
    page.click("button:text-is('replay selected')")
    page.wait_for_selector("#notice.ok")
    assert page.inner_text("#notice") == "replayed 2"
    page.wait_for_function("() => document.querySelectorAll('tbody tr[data-id]').length == 3")
    assert sorted(rows()) == sorted(ids[2:]) == letters()
    wait_for(lambda: {"done p1", "done p2"} <= set(ledger_lines(ledger)), message="p1, p2 ran")
    assert not {"start p3", "start p4", "start p5"} & set(ledger_lines(ledger))

    # "replay all" asks; dismissed, nothing moves.
    asked: list[str] = []

    def answer(accept: bool) -> None:
        def handle(dialog: Any) -> None:
            asked.append(dialog.message)
            dialog.accept() if accept else dialog.dismiss()

        page.once("dialog", handle)

    answer(False)
    page.click("button:text-is('replay all')")
    assert asked == ["Replay every dead letter of default.dlq?"]
    assert letters() == sorted(ids[2:])
    answer(True)
    page.click("button:text-is('replay all')")
    page.wait_for_function("() => document.querySelector('#notice')?.textContent == 'replayed 3'")
    page.wait_for_function("() => document.querySelectorAll('tbody tr[data-id]').length == 0")
    assert letters() == []
    wait_for(lambda: {f"done {t}" for t in tags} <= set(ledger_lines(ledger)),
             message="every replayed task ran")  # fmt: skip
    done = sorted(line for line in ledger_lines(ledger) if line.startswith("done"))
    assert done == [f"done {t}" for t in tags]  # each once
    shoot(page, tmp_path, "dlq-replayed")

    # Purge asks too; dismissed, the letters stay; accepted, they are gone.
    doomed = put_dead_letters(broker, "default", ["x1", "x2"])
    page.goto(d.base + "/dlq")
    page.wait_for_function("() => document.querySelectorAll('tbody tr[data-id]').length == 2")
    answer(False)
    page.click("button.danger:text-is('purge')")
    assert asked[-1] == "Delete every message in default.dlq? This cannot be undone."
    assert letters() == sorted(doomed)
    answer(True)
    page.click("button.danger:text-is('purge')")
    page.wait_for_function("() => document.querySelector('#notice')?.textContent == 'purged 2'")
    page.wait_for_function("() => document.querySelectorAll('tbody tr[data-id]').length == 0")
    assert letters() == []
    assert not {"start x1", "start x2"} & set(ledger_lines(ledger))

    # Schedules: one row per schedule of the config, its next three fire times (UTC).
    before = datetime.now(timezone.utc)
    page.goto(d.base + "/schedules")
    page.wait_for_selector("#app tbody tr")
    after = datetime.now(timezone.utc)
    shown = page.eval_on_selector_all(
        "#app tbody tr", "rs => rs.map(r => [...r.cells].map(c => c.innerText))"
    )
    assert sorted(r[0] for r in shown) == sorted(SCHEDULES)
    for name, task, _timing, zone, fires in shown:
        assert task == SCHEDULES[name]["task"] and zone == SCHEDULES[name].get("timezone", "UTC")
        assert fires in [
            ", ".join(f.replace("T", " ").replace("Z", "") for f in expected_fires(name, t))
            for t in (before, after)
        ], name
    shoot(page, tmp_path, "schedules")
    assert errors == []
