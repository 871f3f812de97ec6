"""Tasks used by the end-to-end tests. Each execution is appended to $TESTTASKS_LEDGER, so a
test can count how many times a task really ran (read at call time, not import time)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from amqptasks import App

app = App.from_config()


def _record(line: str) -> None:
    ledger = os.environ.get("TESTTASKS_LEDGER")
    if ledger:
        with Path(ledger).open("a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


@app.task(name="testtasks.record")
def record(tag: str, seconds: float = 0.0) -> str:
    _record(f"start {tag}")
    time.sleep(seconds)
    _record(f"done {tag}")
    return tag


@app.task(name="testtasks.fail")
def fail(message: str) -> None:
    raise ValueError(message)


@app.task(name="testtasks.early", acks_early=True)
def early(tag: str, seconds: float = 0.0) -> str:
    _record(f"start {tag}")
    time.sleep(seconds)
    _record(f"done {tag}")
    return tag


@app.task(name="testtasks.quiet", ignore_result=True)
def quiet(tag: str) -> str:
    _record(f"done {tag}")
    return tag
