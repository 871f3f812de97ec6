"""A task that records every execution in an SQLite ledger ($LEDGER_DB), for the fault suite.

lost = confirmed publish ids never executed; duplicates = executions beyond one per id.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time

from amqptasks import App

app = App.from_config()
_local = threading.local()


def connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE IF NOT EXISTS runs (id TEXT, pid INTEGER, at REAL, due REAL)")
    db.execute("CREATE TABLE IF NOT EXISTS published (id TEXT PRIMARY KEY, at REAL, due REAL)")
    return db


def _db() -> sqlite3.Connection:
    db = getattr(_local, "db", None)
    if db is None:
        db = _local.db = connect(os.environ["LEDGER_DB"])
    return db


@app.task(name="ledger.hit")
def hit(key: str, work_ms: float = 0.0, due: float = 0.0) -> None:
    if work_ms:
        time.sleep(work_ms / 1000)
    _db().execute("INSERT INTO runs VALUES (?, ?, ?, ?)", (key, os.getpid(), time.time(), due))


@app.task(name="ledger.member")
def member(index: int, work_ms: float = 0.0) -> int:
    """A chord member: records its run, returns its index (so the body can check the order)."""
    if work_ms:
        time.sleep(work_ms / 1000)
    _db().execute(
        "INSERT INTO runs VALUES (?, ?, ?, ?)", (f"m{index}", os.getpid(), time.time(), 0)
    )
    return index


@app.task(name="ledger.body")
def body(results: list[int]) -> int:
    """A chord body: records each run with what it got (count, and whether in order)."""
    in_order = results == list(range(len(results)))
    _db().execute(
        "INSERT INTO runs VALUES (?, ?, ?, ?)",
        (
            f"body {len(results)} {'ordered' if in_order else 'UNORDERED'}",
            os.getpid(),
            time.time(),
            0,
        ),
    )
    return len(results)


def tally(db: sqlite3.Connection) -> tuple[int, int, int, int]:
    """(confirmed, confirmed ids executed, lost = confirmed never executed, duplicates =
    executions beyond one per id)."""
    confirmed = {r[0] for r in db.execute("SELECT id FROM published")}
    runs = [r[0] for r in db.execute("SELECT id FROM runs")]
    executed = set(runs)
    return (
        len(confirmed),
        len(executed & confirmed),
        len(confirmed - executed),
        len(runs) - len(executed),
    )
