"""``--only cluster``: amqptasks on the 3-node cluster with quorum queues vs the single node,
in the same run.

Two figures, each for three brokers — the single node with a classic queue (what every other
figure measures), the single node with a quorum queue (the queue type's own cost), and the
3-node cluster of ``deploy/cluster.sh`` with quorum queues (``topology.default_queue_type:
quorum``, three replicas):

* confirmed publish, pipelined (``publish_nowait`` in windows of 500, every confirm awaited);
* no-op consume: the published tasks drained by two ``amqptasks worker`` processes (one per
  node of the cluster: their ``broker.url`` lists the nodes in another order), timed from
  both being ready until the queue is empty.

Not part of a default run (it starts the cluster when it is not running, and stops it again).
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pika
import yaml

from amqptasks import App, Settings
from amqptasks.transport.aio import declare_topology

from .broker import AMQP_PORT, MGMT_PORT
from .frameworks import ROOT
from .measure import Ctx
from .procs import stop_popen

CLUSTER_SCRIPT = ROOT / "deploy" / "cluster.sh"
CLUSTER_AMQP = (5681, 5682, 5683)
CLUSTER_MGMT = 15681
_AUTH = "Basic " + base64.b64encode(b"guest:guest").decode()
QUEUE = "bench_cluster"
#: The workers start on this empty queue and are told to consume QUEUE together (a control
#: add-consumer), so neither drains the backlog while the other is still starting.
GATE = "bench_cluster_gate"


def _mgmt(port: int, method: str, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api{path}",
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Authorization": _AUTH, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        raw = resp.read()
        return json.loads(raw) if raw else None


class _Target:
    """One broker to measure: its vhost, addresses (per worker order) and queue type."""

    def __init__(self, label: str, ports: tuple[int, ...], mgmt: int, queue_type: str) -> None:
        self.label, self.ports, self.mgmt, self.queue_type = label, ports, mgmt, queue_type
        self.vhost = f"bench.cluster.{uuid.uuid4().hex[:8]}"
        self._conn: Any = None

    def urls(self, rotate: int = 0) -> list[str]:
        vh = urllib.parse.quote(self.vhost, safe="")
        ports = self.ports[rotate:] + self.ports[:rotate]
        return [f"amqp://guest:guest@localhost:{p}/{vh}" for p in ports]

    def config(self, rotate: int = 0) -> dict[str, Any]:
        topology: dict[str, Any] = {"default_queue_type": self.queue_type}
        if self.queue_type == "quorum":
            topology["replicas"] = len(self.ports)
        return {
            "broker": {"url": self.urls(rotate), "publish_timeout": 30},
            "imports": ["examples.tasks"],
            "topology": topology,
            "queues": {QUEUE: {}, GATE: {}},
            "routes": {"examples.tasks.add": {"queue": QUEUE}},
            "results": {"ignore_result": True, "backend": "rpc://"},
        }

    def __enter__(self) -> _Target:
        vh = urllib.parse.quote(self.vhost, safe="")
        _mgmt(self.mgmt, "PUT", f"/vhosts/{vh}", {})
        _mgmt(
            self.mgmt,
            "PUT",
            f"/permissions/{vh}/guest",
            {"configure": ".*", "write": ".*", "read": ".*"},
        )
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._conn is not None and self._conn.is_open:
            self._conn.close()
        _mgmt(self.mgmt, "DELETE", f"/vhosts/{urllib.parse.quote(self.vhost, safe='')}")

    def depth(self) -> int:
        """Messages ready (a passive declare: exact, unlike the management API's samples)."""
        if self._conn is None or not self._conn.is_open:
            self._conn = pika.BlockingConnection(pika.URLParameters(self.urls()[0]))
        channel = self._conn.channel()
        try:
            return int(channel.queue_declare(QUEUE, passive=True).method.message_count)
        finally:
            channel.close()


def _cluster_running() -> bool:
    return subprocess.run([str(CLUSTER_SCRIPT), "status"], capture_output=True).returncode == 0


def _publish(app: App, n: int) -> float:
    p = app.prepare("examples.tasks.add", (1, 2), reply_to=None, ignore_result=True)
    ((ex, rk),) = p.destinations
    t0 = time.perf_counter()
    window = []
    for _ in range(n):
        window.append(app.publisher.publish_nowait(ex, rk, p.body, p.props))
        if len(window) >= 500:
            for f in window:
                f.result(60)
            window = []
    for f in window:
        f.result(60)
    return n / (time.perf_counter() - t0)


def _consume(ctx: Ctx, target: _Target, n: int) -> float:
    exe = str(Path(sys.executable).with_name("amqptasks"))
    workers = []
    logs = []
    try:
        for i in range(2):
            cfg = ctx.workdir / f"{target.vhost}-w{i}.yaml"
            cfg.write_text(yaml.safe_dump(target.config(rotate=i % len(target.ports))))
            log = (ctx.workdir / f"{target.vhost}-w{i}.log").open("wb")
            logs.append(log)
            workers.append(
                subprocess.Popen(
                    [exe, "worker", "--config", str(cfg), "-Q", GATE, "-c", "8", "-l", "WARNING"],
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + 60
        while True:
            ready = sum(
                "ready: consuming" in (ctx.workdir / f"{target.vhost}-w{i}.log").read_text()
                for i in range(2)
            )
            if ready == 2:
                break
            if time.monotonic() > deadline or any(w.poll() is not None for w in workers):
                raise RuntimeError(f"workers did not start (logs in {ctx.workdir})")
            time.sleep(0.02)
        held = target.depth()
        if held != n:
            raise RuntimeError(f"{QUEUE} holds {held} messages, not {n}, before the start")
        app = App(Settings.from_mapping(target.config(), source="<bench cluster>"))
        try:
            # Timed from the command that starts both consumers to an empty queue (ready 0;
            # at most the two prefetch windows, 64 messages, are then still in flight).
            t0 = time.perf_counter()
            gate = threading.Thread(target=app.control.add_consumer, args=(QUEUE,), daemon=True)
            gate.start()
            while target.depth() > 0:
                if time.perf_counter() - t0 > 300:
                    raise RuntimeError("the queue did not drain within 300 s")
                time.sleep(0.005)
            elapsed = time.perf_counter() - t0
            gate.join(10)
        finally:
            app.close()
        return n / elapsed
    finally:
        for w in workers:
            w.terminate()  # all at once, then each waited for: their grace overlaps
        for w in workers:
            stop_popen(w)
        for log in logs:
            log.close()


def compare(ctx: Ctx, quick: bool) -> None:
    """Measure both figures on the three targets, ``ctx.sizes.repeats`` times, interleaved."""
    n = 2_000 if quick else 20_000
    started = False
    if not _cluster_running():
        ctx.log("    starting the 3-node cluster (deploy/cluster.sh start)")
        subprocess.run([str(CLUSTER_SCRIPT), "start"], check=True, capture_output=True)
        started = True
    targets = [
        ("single node, classic queue", (AMQP_PORT,), MGMT_PORT, "classic"),
        ("single node, quorum queue", (AMQP_PORT,), MGMT_PORT, "quorum"),
        ("3-node cluster, quorum queues (3 replicas)", CLUSTER_AMQP, CLUSTER_MGMT, "quorum"),
    ]
    try:
        for _ in range(ctx.sizes.repeats):
            for label, ports, mgmt, qtype in targets:
                with _Target(label, ports, mgmt, qtype) as target:
                    settings = Settings.from_mapping(target.config(), source="<bench cluster>")
                    asyncio.run(declare_topology(settings.broker.urls, settings.topology))
                    app = App(settings)
                    try:
                        rate = _publish(app, n)
                    finally:
                        app.close()
                    ctx.results.add("cluster_publish", "amqptasks", "amqptasks", label, rate)
                    ctx.log(f"    {label}: publish {rate:,.0f} msg/s")
                    rate = _consume(ctx, target, n)
                    ctx.results.add("cluster_consume", "amqptasks", "amqptasks", label, rate)
                    ctx.log(f"    {label}: consume {rate:,.0f} tasks/s")
    finally:
        if started:
            subprocess.run([str(CLUSTER_SCRIPT), "stop"], check=False, capture_output=True)
