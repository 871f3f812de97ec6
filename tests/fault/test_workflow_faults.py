"""Workflows and the result store under kill -9: a chord's body runs exactly once, and a store
cuts the duplicates a redelivery causes (figures printed in the summary)."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest
from broker_fixtures import Broker, wait_for, write_config
from ledgertasks import connect

from amqptasks import App, chord, load_config
from amqptasks.canvas import freeze
from amqptasks.transport.aio import declare_topology


def _cfg(tmp_path: Path, broker: Broker, backend: str, /, **extra):
    """The config, with its topology declared (messages are published before any worker)."""
    cfg = write_config(tmp_path, broker, results={"backend": backend}, **extra)
    cfg.write_text(cfg.read_text().replace("- testtasks", "- testtasks\n- ledgertasks"))
    settings = load_config(cfg, env={})
    asyncio.run(declare_topology(settings.broker.url, settings.topology))
    return cfg


def _runs(db, prefix: str) -> list[str]:
    return [r[0] for r in db.execute("SELECT id FROM runs WHERE id LIKE ?", (prefix + "%",))]


def test_chord_of_1000_with_workers_killed_runs_its_body_once(
    tmp_path, broker, worker_factory, report
):
    cfg = _cfg(tmp_path, broker, f"sqlite:///{tmp_path}/results.db")
    ledger = tmp_path / "ledger.db"
    db = connect(str(ledger))
    env = {"LEDGER_DB": str(ledger)}

    def start(*args: str):
        return worker_factory(cfg, "-Q", "default", "-l", "WARNING", *args, extra_env=env)

    app = App(load_config(cfg, env={}))
    n = 1000
    node = freeze(
        chord(
            [app.signature("ledger.member", (i, 30)) for i in range(n)],
            app.signature("ledger.body"),
        )
    )
    result = node.apply_async()  # the ids frozen here are the ones that run
    kills = 0
    rng = random.Random(11)
    started = time.monotonic()
    while not _runs(db, "body") and kills < 40 and time.monotonic() - started < 150:
        w = start("-c", "4")
        time.sleep(rng.uniform(1.0, 3.0))
        w.proc.kill()
        w.proc.wait()
        kills += 1
    w = start("-c", "8")
    try:
        assert result.get(timeout=120) == n
        time.sleep(1)  # a second body run, if any, would land now
    finally:
        w.stop()
    bodies = _runs(db, "body")
    members = _runs(db, "m")
    store = app.store
    assert store is not None
    ids = [t.options["task_id"] for t in node.header.tasks]
    states = {m.status if m else "PENDING" for m in store.get_many([*ids, result.id])}
    first = bodies[0] if bodies else "-"
    report(
        f"chord of {n} with kill -9 x{kills}: body runs={len(bodies)} ({first}), "
        f"member runs={len(members)} (duplicates {len(members) - len(set(members))}), "
        f"store states {sorted(states)}"
    )
    app.close()
    assert bodies == [f"body {n} ordered"]
    assert set(members) == {f"m{i}" for i in range(n)}
    assert states == {"SUCCESS"}  # nothing left pending in the store


@pytest.mark.parametrize("backend", ["store", "none"])
def test_kill_9_duplicates_with_and_without_a_store(
    tmp_path, broker, worker_factory, report, backend
):
    url = f"sqlite:///{tmp_path}/results.db" if backend == "store" else "rpc://"
    cfg = _cfg(tmp_path, broker, url)
    ledger = tmp_path / "ledger.db"
    db = connect(str(ledger))
    env = {"LEDGER_DB": str(ledger)}
    app = App(load_config(cfg, env={}))
    n = 3000
    for start in range(0, n, 500):  # results are kept: the store is what dedupes
        app.send_many(
            [("ledger.hit", (f"k{i}", 10), None) for i in range(start, start + 500)],
            ignore_result=backend == "none",
        )
    app.close()
    kills = 0
    rng = random.Random(7)
    while broker.depth("default") > 0 and kills < 15:
        w = worker_factory(cfg, "-Q", "default", "-l", "WARNING", "-c", "4", extra_env=env)
        time.sleep(rng.uniform(0.5, 1.5))
        w.proc.kill()
        w.proc.wait()
        kills += 1
    w = worker_factory(cfg, "-Q", "default", "-l", "WARNING", "-c", "8", extra_env=env)
    try:
        wait_for(
            lambda: len(set(_runs(db, "k"))) == n, timeout=120, interval=0.5, message="all ran"
        )
        wait_for(lambda: broker.depth("default") == 0, timeout=30, message="queue drained")
    finally:
        w.stop()
    runs = _runs(db, "k")
    dups = len(runs) - len(set(runs))
    kept = "in a store" if backend == "store" else "not kept"
    report(
        f"kill -9 x{kills} while draining {n}, results {kept}: "
        f"executed={len(set(runs))} lost={n - len(set(runs))} duplicates={dups}"
    )
    assert len(set(runs)) == n


@pytest.mark.parametrize("backend", ["store", "none"])
def test_connection_cut_mid_run_duplicates_with_and_without_a_store(
    tmp_path, broker, worker_factory, report, backend
):
    """Tasks that finish while the worker's connection is down cannot be acked: the broker
    hands them out again. Without a store they run twice; with one, their stored outcome
    settles the redelivery."""
    from broker_fixtures import AMQP_PORT
    from tcpproxy import TcpProxy

    proxy = TcpProxy(AMQP_PORT)
    try:
        url = f"sqlite:///{tmp_path}/results.db" if backend == "store" else "rpc://"
        vhost = broker.url.rsplit("/", 1)[1]
        cfg = _cfg(
            tmp_path,
            broker,
            url,
            broker={"url": proxy.url(vhost), "publish_timeout": 10, "reconnect_max_delay": 1},
        )
        ledger = tmp_path / "ledger.db"
        db = connect(str(ledger))
        env = {"LEDGER_DB": str(ledger)}
        w = worker_factory(cfg, "-Q", "default", "-l", "WARNING", "-c", "8", extra_env=env)
        (tmp_path / "direct").mkdir()
        direct = App(load_config(write_config(tmp_path / "direct", broker), env={}))
        n = 40
        direct.send_many(
            [("ledger.hit", (f"c{i}", 800), None) for i in range(n)],
            ignore_result=backend == "none",
        )
        wait_for(lambda: len(_runs(db, "c")) >= 4, timeout=20, message="the first tasks ran")
        proxy.down()  # the tasks running now finish while nothing can be acked
        time.sleep(2)
        proxy.up()
        wait_for(
            lambda: len(set(_runs(db, "c"))) == n and broker.depth("default") == 0,
            timeout=60,
            interval=0.2,
            message="every task ran and the queue drained",
        )
        time.sleep(1)
        w.stop()
        direct.close()
    finally:
        proxy.close()
    runs = _runs(db, "c")
    dups = len(runs) - len(set(runs))
    kept = "in a store" if backend == "store" else "not kept"
    report(
        f"connection cut for 2 s mid-run ({n} tasks of 0.8 s, -c 8), results {kept}: "
        f"executed={len(set(runs))} duplicates={dups}"
    )
    assert len(set(runs)) == n
    if backend == "store":
        assert dups == 0
    else:
        assert dups > 0  # what the store prevents: the finished-but-unacked ran again
