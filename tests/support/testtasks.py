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


@app.task(name="testtasks.pid")
def pid(tag: str = "") -> int:
    _record(f"pid {tag} {os.getpid()}")
    return os.getpid()


@app.task(name="testtasks.crash_once")
def crash_once(tag: str) -> str:
    """Kills its own process the first time it runs for ``tag`` (a child dying mid-task)."""
    ledger = os.environ.get("TESTTASKS_LEDGER", "")
    seen = Path(ledger).read_text().splitlines() if ledger and Path(ledger).exists() else []
    _record(f"start {tag}")
    if f"start {tag}" not in seen:
        os._exit(17)
    _record(f"done {tag}")
    return tag


@app.task(name="testtasks.hog")
def hog(mb: int) -> int:
    block = bytearray(mb * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    _record(f"hog {os.getpid()}")
    return os.getpid()


@app.task(name="testtasks.busy")
def busy(tag: str, seconds: float) -> str:
    """Pure-Python busy loop (a soft limit can interrupt it in a thread), catching the soft
    limit to record that it could clean up."""
    from amqptasks.errors import SoftTimeLimitExceeded

    _record(f"start {tag}")
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            sum(range(1000))
    except SoftTimeLimitExceeded:
        _record(f"soft {tag}")
        return "cleaned up"
    _record(f"done {tag}")
    return "finished"


@app.task(name="testtasks.flaky", bind=True, max_retries=3)
def flaky(self, tag: str, countdown: float = 1.0) -> str:
    """Always asks for a retry: runs max_retries + 1 times, then lands in the DLQ."""
    _record(f"run {tag} {self.request.retries} {time.time():.3f}")
    raise self.retry(exc=RuntimeError(f"flaky {tag}"), countdown=countdown)


@app.task(
    name="testtasks.auto",
    autoretry_for=(ConnectionError,),
    retry_backoff=1,
    retry_jitter=False,
    max_retries=2,
)
def auto(tag: str) -> None:
    _record(f"run {tag} {time.time():.3f}")
    raise ConnectionError(f"auto {tag}")


@app.task(name="testtasks.when")
def when(tag: str) -> float:
    _record(f"ran {tag} {time.time():.3f}")
    return time.time()


@app.task(name="testtasks.headers", bind=True)
def headers(self) -> dict:
    """The AMQP headers the task saw (``self.request.headers``)."""
    return dict(self.request.headers)


# -- canvas -------------------------------------------------------------------------------------
@app.task(name="testtasks.add")
def add(x: float, y: float) -> float:
    _record(f"add {x} {y}")
    return x + y


@app.task(name="testtasks.when_file")
def when_file(x: float, path: str) -> float:
    """``x`` once the file ``path`` exists, a ValueError before: a chain step that fails
    for good until the operator fixes its cause, then succeeds on replay."""
    if not Path(path).exists():
        raise ValueError(f"{path} is missing")
    return x


@app.task(name="testtasks.as_set")
def as_set(*items: object) -> set[object]:
    """A result JSON cannot hold (a set): stored as an EncodeError failure."""
    return set(items)


@app.task(name="testtasks.mul")
def mul(x: float, y: float) -> float:
    _record(f"mul {x} {y}")
    return x * y


@app.task(name="testtasks.tsum")
def tsum(numbers: list[float]) -> float:
    _record(f"tsum {len(numbers)}")
    return sum(numbers)


@app.task(name="testtasks.collect")
def collect(items: list[object]) -> list[object]:
    """A chord body that records what it got, so a test can count its runs."""
    _record(f"collect {len(items)}")
    return items


@app.task(name="testtasks.boom")
def boom(*args: object) -> None:
    _record(f"boom {args}")
    raise ValueError(f"boom {args}")


@app.task(name="testtasks.on_error")
def on_error(task_id: str) -> str:
    _record(f"errback {task_id}")
    return task_id


@app.task(name="testtasks.gated")
def gated(tag: str, gate: str, limit: float = 60.0) -> str:
    """Runs until the file ``gate`` exists (at most ``limit`` s): a test holds tasks running
    for as long as it looks at them, then lets them all finish by creating one file."""
    return _held(tag, gate, limit)


@app.task(name="testtasks.held")
def held(tag: str, gate: str, limit: float = 60.0) -> str:
    """``gated`` under a second name, for a config entry that names one of them only."""
    return _held(tag, gate, limit)


def _held(tag: str, gate: str, limit: float) -> str:
    _record(f"start {tag} {os.getpid()}")
    deadline = time.monotonic() + limit
    while not Path(gate).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    _record(f"done {tag}")
    return tag


# -- revoke and rate limits ---------------------------------------------------------------------
@app.task(name="testtasks.nap")
async def nap(tag: str, seconds: float) -> str:
    """An ``async def`` task that records being cancelled (a revoke with terminate)."""
    import asyncio

    _record(f"start {tag}")
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        _record(f"cancelled {tag}")
        raise
    _record(f"done {tag}")
    return tag


def _spin(tag: str, seconds: float) -> str:
    from amqptasks.errors import TaskRevoked

    _record(f"start {tag}")
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            sum(range(1000))
    except TaskRevoked:
        _record(f"revoked {tag}")
        raise
    _record(f"done {tag}")
    return tag


@app.task(name="testtasks.spin")
def spin(tag: str, seconds: float) -> str:
    """A pure-Python busy loop (a thread gets TaskRevoked in it at once), full pipeline."""
    return _spin(tag, seconds)


@app.task(name="testtasks.quiet_spin", ignore_result=True)
def quiet_spin(tag: str, seconds: float) -> str:
    """The same without a result: with nothing wanting it, it takes the fast path."""
    return _spin(tag, seconds)


@app.task(name="testtasks.tick", ignore_result=True)
def tick(tag: str) -> str:
    """Records when it started (rate-limit tests measure the pace from these)."""
    _record(f"tick {tag} {time.time():.3f}")
    return tag


@app.task(name="testtasks.nothing", ignore_result=True)
def nothing(tag: str = "") -> None:
    """Does nothing (no ledger line: measuring how fast a rate limit lets tasks through)."""
