"""amqptasks tasks under Celery-style names (``tasks.add``...), for the Celery ingest tests: a
Celery producer calls them by these names. Each run is appended to $TESTTASKS_LEDGER."""

from __future__ import annotations

import os
import time
from pathlib import Path

from amqptasks import App
from amqptasks.errors import SoftTimeLimitExceeded

app = App.from_config()


def _record(line: str) -> None:
    ledger = os.environ.get("TESTTASKS_LEDGER")
    if ledger:
        with Path(ledger).open("a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


@app.task(name="tasks.add")
def add(x: float, y: float) -> float:
    _record(f"add {x} {y} {time.time():.3f}")
    return x + y


@app.task(name="tasks.fail")
def fail(message: str) -> None:
    _record(f"fail {message}")
    raise ValueError(message)


@app.task(name="tasks.spin")
def spin(seconds: float) -> str:
    """Pure-Python busy loop (a thread's soft limit can interrupt it), reporting which limit
    stopped it."""
    _record(f"spin {seconds}")
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            sum(range(1000))
    except SoftTimeLimitExceeded:
        _record("spin soft")
        return "soft limit"
    _record("spin done")
    return "finished"


@app.task(name="tasks.mended")
def mended(flag: str) -> str:
    """Fails until the file ``flag`` exists (a bug fixed between a failure and its replay)."""
    if not Path(flag).exists():
        _record("mended broken")
        raise RuntimeError(f"{flag} does not exist yet")
    _record("mended ok")
    return "ok"
