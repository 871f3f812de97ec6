"""``python -m bench.dashboard_ingest [--tasks N] [--pool asyncio] [--concurrency C]``.

Does ``amqptasks dashboard`` keep up with a worker's events at the top no-op rate? One
vhost, ``amqptasks topology apply``, the real dashboard (loopback, no credentials) reading
its durable events queue, N no-op tasks pre-filled, then one ``amqptasks worker -E``
draining them as fast as it can. Every 0.25 s it samples the worker's queue, the
dashboard's events queue (its backlog: messages ready + unacked, by passive declare and the
management API) and the dashboard's ``/api/stats`` (events handled, lag of the last commit).

Prints the worker's rate, the events/s the dashboard handled while the worker ran, the
backlog at each quarter of the run, the lag, and how long after the worker's last task the
history had every event. Exit 1 when a part failed (not for a speed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pika
import yaml

from amqptasks import App, load_config

from .broker import AMQP_PORT, HOST, mgmt
from .frameworks import ROOT, amqptasks_exe
from .procs import stop_popen

EVENTS_QUEUE = "amqptasks.dashboard"


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stats(base: str) -> dict[str, Any]:
    with urllib.request.urlopen(base + "/api/stats", timeout=5) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def run(tasks: int, pool: str, concurrency: int, prefetch_multiplier: int) -> int:
    vhost = f"bench-dash-{uuid.uuid4().hex[:6]}"
    mgmt("PUT", f"/vhosts/{vhost}", {})
    mgmt("PUT", f"/permissions/{vhost}/guest", {"configure": ".*", "write": ".*", "read": ".*"})
    work = Path(tempfile.mkdtemp(prefix="bench-dash-"))
    url = f"amqp://guest:guest@{HOST}:{AMQP_PORT}/{vhost}"
    config = {
        "broker": {"url": url, "publish_timeout": 30},
        "imports": ["bench.peers.amq_tasks"],
        "queues": {"bench": {}},
        "routes": {"bench.*": {"queue": "bench"}},
        "worker": {
            "concurrency": concurrency,
            "prefetch_multiplier": prefetch_multiplier,
            "pool": pool,
        },
        "dashboard": {"database": str(work / "dashboard.sqlite3")},
    }
    cfg = work / "amqptasks.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = {
        **__import__("os").environ,
        "AMQPTASKS_CONFIG": str(cfg),
        "PYTHONPATH": str(ROOT),
        "BENCH_COUNT_FILE": str(work / "count"),
    }
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        subprocess.run(
            [amqptasks_exe(), "topology", "apply"],
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )
        port = _port()
        base = f"http://127.0.0.1:{port}"
        dash_log = (work / "dashboard.log").open("wb")
        logs.append(dash_log)
        procs.append(
            subprocess.Popen(
                [amqptasks_exe(), "dashboard", "--port", str(port), "-l", "WARNING"],
                env=env,
                cwd=ROOT,
                stdout=dash_log,
                stderr=subprocess.STDOUT,
            )
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if _stats(base)["connected"]:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    "the dashboard did not start:\n" + (work / "dashboard.log").read_text()
                )
            time.sleep(0.1)
        app = App(load_config(cfg, env={}))
        try:
            app.send_many((("bench.noop", (), None) for _ in range(tasks)), ignore_result=True)
        finally:
            app.close()
        conn = pika.BlockingConnection(pika.URLParameters(url))
        ch = conn.channel()

        def depth(queue: str) -> int:
            return int(ch.queue_declare(queue, passive=True).method.message_count)

        def backlog() -> int:
            info = mgmt("GET", f"/queues/{vhost}/{EVENTS_QUEUE}") or {}
            return int(depth(EVENTS_QUEUE) + (info.get("messages_unacknowledged") or 0))

        before = _stats(base)["events"]
        w_log = (work / "worker.log").open("wb")
        logs.append(w_log)
        started = time.monotonic()
        procs.append(
            subprocess.Popen(
                [amqptasks_exe(), "worker", "-Q", "bench", "-E", "-l", "WARNING", "-n", "bench0@l"],
                env=env,
                cwd=ROOT,
                stdout=w_log,
                stderr=subprocess.STDOUT,
            )
        )
        samples: list[tuple[float, int, int, int, float]] = []
        worker_done = None
        expected = before + 3 * tasks
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            now = time.monotonic() - started
            left = depth("bench")
            st = _stats(base)
            samples.append((now, left, backlog(), st["events"] - before, st["lag"]))
            if left == 0 and worker_done is None:
                worker_done = now
            if st["events"] >= expected and left == 0:
                break
            time.sleep(0.25)
        conn.close()
        if worker_done is None or samples[-1][3] < 3 * tasks:
            print(f"error: incomplete: {samples[-1]}", file=sys.stderr)
            return 1
        run_samples = [s for s in samples if s[0] <= worker_done]
        first = next(s for s in samples if s[1] < tasks)  # the worker consuming
        caught_up = samples[-1][0]
        wrate = tasks / max(1e-9, worker_done - first[0])
        during = run_samples[-1][3] - first[3]
        erate = during / max(1e-9, run_samples[-1][0] - first[0])
        quarters = [
            run_samples[min(len(run_samples) - 1, int(len(run_samples) * q))][2]
            for q in (0.25, 0.5, 0.75, 1.0)
        ]
        lags = [s[4] for s in run_samples if s[3] > 0]
        print(
            f"dashboard ingest: {tasks:,} no-op tasks, worker --pool {pool} -c {concurrency} "
            f"prefetch {concurrency * prefetch_multiplier} -E"
        )
        print(f"  worker: {wrate:,.0f} tasks/s ({3 * wrate:,.0f} events/s produced)")
        print(f"  dashboard handled: {erate:,.0f} events/s while the worker ran")
        print(
            "  backlog (events queue messages, each up to 1,000 events) at 25/50/75/100 % "
            f"of the run: {', '.join(str(q) for q in quarters)}; max "
            f"{max(s[2] for s in run_samples)}"
        )
        if lags:
            print(
                f"  lag of the newest event at commit: median {statistics.median(lags):.2f}s, "
                f"max {max(lags):.2f}s"
            )
        tail = caught_up - worker_done
        print(f"  every event in the history {tail:.2f}s after the worker's last task")
        return 0
    finally:
        for p in reversed(procs):
            stop_popen(p)
        for f in logs:
            f.close()
        mgmt("DELETE", f"/vhosts/{vhost}", ok=(404,))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.dashboard_ingest", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--tasks", type=int, default=100_000)
    p.add_argument("--pool", default="asyncio", choices=("asyncio", "threads"))
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--prefetch-multiplier", type=int, default=32)
    a = p.parse_args(argv)
    return run(a.tasks, a.pool, a.concurrency, a.prefetch_multiplier)


if __name__ == "__main__":
    sys.exit(main())
