"""``python -m bench.dashboard_history [--tasks N] [--repeats R] [--fresh] [--dir D]``.

How fast does the task list answer with a big history, over HTTP, the way a page or a
script asks? The history is built through :meth:`History.apply` (the ingest's own write
path: 3 events a task, 4 workers, 3 task names, 2 queues, 1 % failures), kept in the
temporary directory and reused by the next run with the same size and layout (a million
tasks take about a minute to build). Then the real ``amqptasks dashboard`` runs on it
(loopback, its own vhost, credentials on: every request passes the login check) and each
query of :data:`QUERIES` is asked ``GET /api/tasks`` R times over one keep-alive
connection; the p50 and p99 of each are printed, and how many tasks it answered.

Also printed: the build's events/s and the file's size, and how long the history took to
open (a file written before the search index existed gets it built then, once).

Exit 1 when a part failed (not for a speed): a query answered something else than 200, or
a query that must find tasks found none (or the one that must find none found some).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from amqptasks.dashboard.auth import hash_password
from amqptasks.dashboard.history import LAYOUT, History
from amqptasks.events import rfc3339

from .broker import AMQP_PORT, HOST, mgmt
from .frameworks import ROOT, amqptasks_exe
from .procs import stop_popen

#: The first task's time: fixed, so a cached history keeps meaning the same windows.
T0 = 1_700_000_000.0
NAMES = ("examples.tasks.add", "examples.tasks.reduce", "examples.web.sendmail")
USER = "bench"


def queries(n: int) -> dict[str, tuple[dict[str, str], str]]:
    """The measured queries for a history of ``n`` tasks (see :func:`events_of`): label ->
    (the query string of ``GET /api/tasks``, what it must find: some, one or none)."""
    mid = n // 2
    offset = min(2000, mid)
    return {
        "first page": ({}, "some"),
        "state filter (FAILURE)": ({"state": "FAILURE"}, "some"),
        "name filter": ({"taskname": NAMES[1]}, "some"),
        "worker filter": ({"workername": "w3@h"}, "some"),
        "queue filter": ({"queue": "web_tasks"}, "some"),
        "time window": (
            {
                "received_start": rfc3339(T0 + mid / 100),
                "received_end": rfc3339(T0 + mid / 100 + 10),
            },
            "some",
        ),
        "state + worker": ({"state": "FAILURE", "workername": "w1@h"}, "some"),
        "next page (cursor)": ({"before": "CURSOR"}, "some"),
        f"offset page (offset {offset:,})": ({"offset": str(offset)}, "some"),
        "search by id": ({"search": task_id(mid)}, "one"),
        "search text, common (sendmail)": ({"search": "sendmail"}, "some"),
        "search text, one task": ({"search": f"[{mid},{mid + 1}]"}, "one"),
        "search text, one task + worker": (
            {"search": f"[{mid},{mid + 1}]", "workername": f"w{mid % 4}@h"},
            "one",
        ),
        "search text, nothing matches": ({"search": "no such text 7e1"}, "none"),
        "search text, nothing (common trigrams)": ({"search": "[1,1]"}, "none"),
    }


def task_id(i: int) -> str:
    return f"{i:08x}-bench-{i * 2654435761 % 2**32:08x}"


def events_of(i: int) -> list[dict[str, Any]]:
    """Task ``i``'s three events: received, started, succeeded (failed for 1 in 97)."""
    at = T0 + i / 100
    common = {
        "v": 1,
        "hostname": f"w{i % 4}@h",
        "pid": 1,
        "id": task_id(i),
        "task": NAMES[i % 3],
        "queue": ("default", "web_tasks")[i % 2],
    }
    if i % 97 == 0:
        end = {
            "type": "task-failed",
            "runtime": 0.001,
            "exception": {"type": "ValueError", "message": f"bad input {i}"},
            "traceback": "Traceback (most recent call last):\nValueError: bad input",
        }
    else:
        end = {"type": "task-succeeded", "runtime": 0.001, "result": str(2 * i + 1)}
    return [
        {**common, "type": "task-received", "time": rfc3339(at), "clock": 3 * i,
         "args": f"[{i},{i + 1}]", "kwargs": "{}"},
        {**common, "type": "task-started", "time": rfc3339(at), "clock": 3 * i + 1},
        {**common, **end, "time": rfc3339(at + 0.001), "clock": 3 * i + 2},
    ]  # fmt: skip


def build(path: Path, n: int, batch: int = 2000) -> float:
    """Write ``n`` tasks into a new history at ``path`` as the ingest does (each batch one
    :meth:`History.apply`, then :meth:`History.index_pending` as a busy ingest calls it, the
    rest of the index at the end as an idle one); returns events/s, indexing included."""
    h = History(path, max_tasks=max(n, 1), retention=100 * 365 * 86400)
    try:
        started = time.perf_counter()
        for base in range(0, n, batch):
            events: list[dict[str, Any]] = []
            for i in range(base, min(n, base + batch)):
                events += events_of(i)
            h.apply(events)
            h.index_pending(idle=False)
        while h.index_pending(idle=True):
            pass
        return 3 * n / max(1e-9, time.perf_counter() - started)
    finally:
        h.close()


def cached_history(n: int, fresh: bool, where: Path | None = None) -> tuple[Path, float | None]:
    """The history file of ``n`` tasks for this layout in ``where`` (the temporary
    directory), built when missing (or ``fresh``); returns it and the build's events/s (None
    when it was reused)."""
    folder = where or Path(tempfile.gettempdir())
    path = folder / f"amqptasks-bench-history-{n}-layout{LAYOUT}.sqlite3"
    if path.exists() and not fresh:
        return path, None
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    partial = path.with_name(path.name + ".building")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{partial}{suffix}").unlink(missing_ok=True)
    rate = build(partial, n)
    partial.rename(path)
    return path, rate


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Client:
    """One keep-alive HTTP connection with Basic credentials (what a script sends)."""

    def __init__(self, port: int, password: str) -> None:
        self.conn = http.client.HTTPConnection(HOST, port, timeout=60)
        token = base64.b64encode(f"{USER}:{password}".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}"}

    def get(self, path: str) -> tuple[int, bytes]:
        self.conn.request("GET", path, headers=self.headers)
        r = self.conn.getresponse()
        return r.status, r.read()

    def close(self) -> None:
        self.conn.close()


def _wait_up(client: Client, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 600  # an old file gets its search index built first
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the dashboard exited {proc.returncode}:\n{log.read_text()}")
        try:
            status, _ = client.get("/api/stats")
            if status == 200:
                return
        except OSError:
            client.conn.close()
        time.sleep(0.1)
    raise RuntimeError("the dashboard did not answer:\n" + log.read_text())


def measure(
    client: Client, n: int, repeats: int
) -> Iterator[tuple[str, list[float], int, str | None]]:
    """Each query's timings (ms), the tasks it answered, and a problem (or None)."""
    status, body = client.get("/api/task-list?limit=100")
    cursor = json.loads(body)["next"] if status == 200 else None
    for label, (params, expect) in queries(n).items():
        if params.get("before") == "CURSOR":
            params = {"before": str(cursor)}
        path = "/api/tasks?" + urllib.parse.urlencode(params)
        times: list[float] = []
        found = -1
        problem = None
        for _ in range(repeats + 1):  # the first warms the page cache, as a running one is
            t = time.perf_counter()
            status, body = client.get(path)
            elapsed = (time.perf_counter() - t) * 1000
            if status != 200:
                problem = f"{label}: HTTP {status}: {body[:200]!r}"
                break
            answer = json.loads(body)
            found = len(answer)  # {id: task}
            times.append(elapsed)
        wrong = {"some": found < 1, "none": found != 0, "one": found != 1}[expect]
        if problem is None and wrong:
            problem = f"{label}: expected {expect} task(s), got {found}"
        yield label, times[1:], found, problem


def run(n: int, repeats: int, fresh: bool, where: Path | None = None) -> int:
    print(f"dashboard history: {n:,} tasks (3 events each), GET /api/tasks over HTTP")
    path, rate = cached_history(n, fresh, where)
    size = path.stat().st_size
    if rate is None:
        print(f"  history: {path.name} reused ({size / 1e6:,.0f} MB)")
    else:
        print(f"  history built: {rate:,.0f} events/s through History.apply, {size / 1e6:,.0f} MB")
    vhost = f"bench-dashhist-{uuid.uuid4().hex[:6]}"
    mgmt("PUT", f"/vhosts/{vhost}", {})
    mgmt("PUT", f"/permissions/{vhost}/guest", {"configure": ".*", "write": ".*", "read": ".*"})
    work = Path(tempfile.mkdtemp(prefix="bench-dashhist-"))
    password = uuid.uuid4().hex
    cfg = work / "amqptasks.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "broker": {"url": f"amqp://guest:guest@{HOST}:{AMQP_PORT}/{vhost}"},
                "queues": {"default": {}, "web_tasks": {}},
                "dashboard": {
                    "database": str(path),
                    "basic_auth": [f"{USER}:{hash_password(password)}"],
                    "max_tasks": max(n, 1),
                    "retention": "36500d",
                },
            }
        )
    )
    from .dashboard_ingest import _port

    port = _port()
    log = work / "dashboard.log"
    env = {**os.environ, "AMQPTASKS_CONFIG": str(cfg)}
    env.pop("AMQPTASKS_DASHBOARD_AUTH", None)
    out = log.open("wb")
    started = time.monotonic()
    proc = subprocess.Popen(
        [amqptasks_exe(), "dashboard", "--port", str(port), "-l", "WARNING"],
        env=env,
        cwd=ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    client = Client(port, password)
    problems: list[str] = []
    try:
        _wait_up(client, proc, log)
        print(f"  dashboard answering {time.monotonic() - started:.1f}s after its start")
        print(f"  {'query':<40} {'p50 ms':>8} {'p99 ms':>8}  tasks  ({repeats} repeats)")
        for label, times, found, problem in measure(client, n, repeats):
            if problem:
                problems.append(problem)
                continue
            p50, p99 = statistics.median(times), _percentile(times, 0.99)
            print(f"  {label:<40} {p50:>8.1f} {p99:>8.1f}  {found:>5}")
    finally:
        client.close()
        stop_popen(proc)
        out.close()
        mgmt("DELETE", f"/vhosts/{vhost}", ok=(404,))
        shutil.rmtree(work, ignore_errors=True)  # the config (a password hash) and the log
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.dashboard_history", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--tasks", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--fresh", action="store_true", help="build the history again")
    p.add_argument("--dir", type=Path, default=None, help="where the history file is kept")
    a = p.parse_args(argv)
    if a.tasks < 10 or a.repeats < 1:
        p.error("--tasks must be at least 10 and --repeats at least 1")
    return run(a.tasks, a.repeats, a.fresh, a.dir)


if __name__ == "__main__":
    sys.exit(main())
