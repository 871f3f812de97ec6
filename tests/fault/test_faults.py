"""Fault injection with a ledger: every confirmed publish id must be executed (lost = 0).

Figures (lost, duplicates, recovery times, RSS) are printed in the pytest summary.
"""

from __future__ import annotations

import random
import subprocess
import threading
import time
from pathlib import Path

import pytest
from broker_fixtures import ROOT, Broker, mgmt, wait_for, write_config
from ledgertasks import connect

from amqptasks import AmqpTasksError, App, load_config


def _cfg(tmp_path: Path, broker: Broker, /, **extra):
    cfg = write_config(tmp_path, broker, **extra)
    text = cfg.read_text().replace("- testtasks", "- testtasks\n- ledgertasks")
    cfg.write_text(text)
    return cfg


def _ledger(tmp_path: Path) -> tuple[Path, object]:
    path = tmp_path / "ledger.db"
    return path, connect(str(path))


def _tally(db) -> tuple[int, int, int, int]:
    confirmed = {r[0] for r in db.execute("SELECT id FROM published")}
    runs = [r[0] for r in db.execute("SELECT id FROM runs")]
    executed = set(runs)
    lost = len(confirmed - executed)
    return len(confirmed), len(executed & confirmed), lost, len(runs) - len(executed)


def _publish(app: App, db, n: int, work_ms: float = 1.0) -> None:
    """Pipelined confirmed publishes; an id enters the ledger only once confirmed."""
    batch = []
    for i in range(n):
        key = f"k{i}"
        p = app.prepare(
            "ledger.hit", (key, work_ms), reply_to=None, task_id=key, ignore_result=True
        )
        ex, rk = p.destinations[0]
        batch.append((key, app.publisher.publish_nowait(ex, rk, p.body, p.props)))
        if len(batch) >= 200 or i == n - 1:
            for k, fut in batch:
                fut.result(30)
                db.execute("INSERT INTO published VALUES (?, ?, 0)", (k, time.time()))
            batch = []


def test_kill_9_repeatedly_while_draining(tmp_path, broker, worker_factory, report):
    cfg = _cfg(tmp_path, broker)
    path, db = _ledger(tmp_path)

    def start(*args: str):
        return worker_factory(
            cfg, "-Q", "default", "-l", "WARNING", *args, extra_env={"LEDGER_DB": str(path)}
        )

    app = App(load_config(cfg, env={}))
    w = start("-c", "8")
    w.proc.kill()
    w.proc.wait()
    n = 3000
    _publish(app, db, n, work_ms=10)
    app.close()
    kills = 0
    rng = random.Random(7)
    while broker.depth("default") > 0 and kills < 15:
        w = start("-c", "4")
        time.sleep(rng.uniform(0.5, 1.5))
        w.proc.kill()
        w.proc.wait()
        kills += 1
    w = start("-c", "8")
    try:
        wait_for(lambda: _tally(db)[2] == 0, timeout=120, interval=0.5, message="lost == 0")
    finally:
        w.stop()
    confirmed, executed, lost, dups = _tally(db)
    report(
        f"kill -9 x{kills} while draining {n}: confirmed={confirmed} executed={executed} "
        f"lost={lost} duplicates={dups}"
    )
    assert confirmed == n and lost == 0


def test_broker_stop_app_start_app_while_publishing_and_consuming(
    tmp_path, broker, worker_factory, report
):
    cfg = _cfg(
        tmp_path, broker, broker={"url": broker.url, "publish_timeout": 3, "reconnect_max_delay": 1}
    )
    path, db = _ledger(tmp_path)
    w = worker_factory(
        cfg, "-Q", "default", "-l", "WARNING", "-c", "8", extra_env={"LEDGER_DB": str(path)}
    )
    app = App(load_config(cfg, env={}))
    raised = 0
    stop = threading.Event()

    def publisher() -> None:
        nonlocal raised
        db2 = connect(str(path))  # sqlite connections belong to their thread
        i = 0
        while not stop.is_set():
            key = f"p{i}"
            i += 1
            try:
                app.send_task("ledger.hit", (key,), task_id=key, ignore_result=True)
            except AmqpTasksError:
                raised += 1
                continue
            db2.execute("INSERT INTO published VALUES (?, ?, 0)", (key, time.time()))

    t = threading.Thread(target=publisher)
    t.start()
    ctl = [str(ROOT / "deploy" / "broker.sh"), "ctl"]
    try:
        time.sleep(2)
        subprocess.run([*ctl, "stop_app"], check=True, capture_output=True, timeout=120)
        time.sleep(2)
        subprocess.run([*ctl, "start_app"], check=True, capture_output=True, timeout=120)
        back = time.time()
        time.sleep(4)
    finally:
        stop.set()
        t.join(60)
        app.close()
    try:
        wait_for(lambda: _tally(db)[2] == 0, timeout=120, interval=0.5, message="lost == 0")
        first_after = db.execute("SELECT MIN(at) FROM runs WHERE at > ?", (back,)).fetchone()[0]
    finally:
        w.stop()
    confirmed, executed, lost, dups = _tally(db)
    recovery = (first_after - back) if first_after else float("nan")
    report(
        f"stop_app/start_app: confirmed={confirmed} raised={raised} executed={executed} "
        f"lost={lost} duplicates={dups} worker resumed {recovery:.1f}s after start_app "
        f"({w.output().count('ready: consuming')} consumer attaches)"
    )
    assert lost == 0 and raised > 0 and confirmed > 0
    assert w.output().count("ready: consuming") >= 2
    # broker.reconnect_max_delay: 1 -> attempts at most 1 s apart once the broker is back.
    assert recovery < 5


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ten_thousand_countdowns_wait_in_the_broker(tmp_path, broker, worker_factory, report):
    cfg = _cfg(tmp_path, broker)
    path, db = _ledger(tmp_path)
    w = worker_factory(
        cfg, "-Q", "default", "-l", "WARNING", "-c", "16", extra_env={"LEDGER_DB": str(path)}
    )
    app = App(load_config(cfg, env={}))
    rng = random.Random(3)
    n = 10_000
    pending = []
    start = time.time()
    for i in range(n):
        countdown = rng.uniform(60, 300)
        due = time.time() + countdown
        key = f"d{i}"
        p = app.prepare(
            "ledger.hit",
            (key, 0.0, due),
            reply_to=None,
            task_id=key,
            ignore_result=True,
            countdown=countdown,
        )
        ((ex, rk),) = p.destinations
        pending.append((key, due, app.publisher.publish_nowait(ex, rk, p.body, p.props)))
        if len(pending) >= 500 or i == n - 1:
            for key_, due_, fut in pending:
                fut.result(30)
                db.execute("INSERT INTO published VALUES (?, ?, ?)", (key_, time.time(), due_))
            pending = []
    app.close()
    publish_s = time.time() - start
    vh = broker.vhost.replace("/", "%2F")

    def rss_kib() -> int:
        for line in Path(f"/proc/{w.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    samples = []
    while time.time() - start < 55:  # before the first countdown is due
        info = mgmt("GET", f"/queues/{vh}/default")
        samples.append((rss_kib(), info.get("messages_unacknowledged", 0), info.get("messages", 0)))
        time.sleep(5)
    wait_for(lambda: _tally(db)[1] == n, timeout=420, interval=2, message="all 10k ran")
    w.stop()
    rows = db.execute(
        "SELECT r.at, r.due, p.at FROM runs r JOIN published p ON p.id = r.id"
    ).fetchall()
    late = [at - due for at, due, _ in rows]
    # Each task is due within max(1 s, 5 % of its own countdown).
    misses = [at - due for at, due, sent in rows if abs(at - due) > max(1.0, 0.05 * (due - sent))]
    _, executed, lost, dups = _tally(db)
    rss = [s[0] for s in samples]
    report(
        f"10k countdowns 60-300s: published in {publish_s:.1f}s; while pending: worker "
        f"unacked max={max(s[1] for s in samples)} ready-in-queue max="
        f"{max(s[2] for s in samples)} RSS {min(rss)}-{max(rss)} KiB; lateness "
        f"min={min(late):.2f}s max={max(late):.2f}s, outside max(1s, 5%): {len(misses)}; "
        f"lost={lost} duplicates={dups}"
    )
    assert max(s[1] for s in samples) == 0 and max(s[2] for s in samples) == 0
    assert max(rss) - min(rss) < 20_000
    assert lost == 0 and executed == n
    assert misses == []
