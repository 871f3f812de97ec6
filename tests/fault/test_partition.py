"""A worker in its own network namespace, cut off from the broker for 60 s, then healed.

The test makes a namespace and a veth pair (link-local addresses it assigns itself) and runs
``amqptasks worker`` inside it with ``ip netns exec``. The shared single broker listens on
loopback only, so a TCP proxy on the host end of the veth forwards to it: the worker's only
way to the broker is the veth. Cutting the link (the namespace end down) is a silent
partition — no RST, no FIN — that both sides must detect by heartbeats. Needs root and
iproute2; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from datetime import datetime

import pytest
from broker_fixtures import amqptasks_exe, cli_env, wait_for, write_config
from ledgertasks import connect
from ledgertasks import tally as _tally
from tcpproxy import TcpProxy

from amqptasks import App, load_config

HOST_IP, NS_IP = "169.254.213.1", "169.254.213.2"  # link-local, on a veth this test makes
CUT_SECONDS = 60


def _cfg(tmp_path, broker, /, **extra):
    cfg = write_config(tmp_path, broker, **extra)
    cfg.write_text(cfg.read_text().replace("- testtasks", "- testtasks\n- ledgertasks"))
    return cfg


def _publish(app: App, db, n: int, work_ms: float) -> None:
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


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def netns():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 ('ip netns', veth) to make a network namespace")
    tag = uuid.uuid4().hex[:6]
    ns, host_end, ns_end = f"amqpt-{tag}", f"vat{tag}", f"vbt{tag}"
    try:
        ip("netns", "add", ns)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create a network namespace here: {exc.stderr.decode().strip()}")
    try:
        ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        ip("link", "set", ns_end, "netns", ns)
        ip("addr", "add", f"{HOST_IP}/30", "dev", host_end)
        ip("link", "set", host_end, "up")
        ip("netns", "exec", ns, "ip", "addr", "add", f"{NS_IP}/30", "dev", ns_end)
        ip("netns", "exec", ns, "ip", "link", "set", ns_end, "up")
        ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, ns_end
    finally:
        subprocess.run(["ip", "link", "del", host_end], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _consuming_again(log: str, after: float) -> float | None:
    for line in log.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            if "consuming again" in rec.get("message", ""):
                t = datetime.fromisoformat(rec["time"].replace("Z", "+00:00")).timestamp()
                if t >= after:
                    return t
    return None


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_worker_cut_off_for_60s_rejoins_and_loses_nothing(tmp_path, broker, netns, report):
    ns, ns_end = netns
    proxy = TcpProxy(5672, listen_host=HOST_IP)
    vhost = broker.url.rsplit("/", 1)[1]
    through_veth = f"amqp://guest:guest@{HOST_IP}:{proxy.port}/{vhost}"
    # heartbeat 5: both sides notice the silent link within ~10-20 s; reconnect attempts at
    # most 2 s apart once it is back.
    worker_cfg = _cfg(
        tmp_path,
        broker,
        broker={"url": through_veth, "heartbeat": 5, "reconnect_max_delay": 2},
    )
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    host_cfg = _cfg(host_dir, broker)  # the same vhost, over loopback
    ledger = tmp_path / "ledger.db"
    db = connect(str(ledger))
    log_path = tmp_path / "worker.log"
    log = log_path.open("wb")
    env = {**cli_env(worker_cfg), "LEDGER_DB": str(ledger)}
    worker = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            ns,
            amqptasks_exe(),
            "worker",
            "--config",
            str(worker_cfg),
            "-Q",
            "default",
            "-c",
            "4",
            "--log-format",
            "json",
            "-l",
            "WARNING",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    app = App(load_config(host_cfg, env={}))
    try:
        wait_for(lambda: "ready: consuming" in log_path.read_text(), timeout=60, message="ready")
        _publish(
            app, db, 2000, work_ms=20
        )  # ~20 s of work for 4 threads: some in flight at the cut
        wait_for(lambda: _tally(db)[1] >= 200, timeout=60, message="200 ran before the cut")
        cut_at = time.time()
        ip("netns", "exec", ns, "ip", "link", "set", ns_end, "down")
        ran_at_cut = _tally(db)[1]
        # Published while the worker is away (over loopback): they wait in the queue.
        more = 1000
        for i in range(more):
            key = f"cut{i}"
            app.send_task("ledger.hit", (key,), task_id=key, ignore_result=True)
            db.execute("INSERT INTO published VALUES (?, ?, 0)", (key, time.time()))
        # The cut lasts CUT_SECONDS: wait out the rest of it (the thing under test is time).
        time.sleep(max(0.0, cut_at + CUT_SECONDS - time.time()))
        ran_during_cut = _tally(db)[1] - ran_at_cut
        healed_at = time.time()
        ip("netns", "exec", ns, "ip", "link", "set", ns_end, "up")
        wait_for(
            lambda: _consuming_again(log_path.read_text(), healed_at) is not None,
            timeout=30,
            message="the worker consuming again",
        )
        rejoined = _consuming_again(log_path.read_text(), healed_at) - healed_at
        wait_for(lambda: _tally(db)[2] == 0, timeout=120, interval=0.5, message="lost == 0")
    finally:
        app.close()
        worker.terminate()
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(5)
        log.close()
        proxy.close()
    confirmed, executed, lost, dups = _tally(db)
    output = log_path.read_text()
    report(
        f"worker in a netns cut off {CUT_SECONDS}s (veth down; shared single broker through a "
        f"proxy on the veth's host end): ran {ran_at_cut} before the cut, {ran_during_cut} "
        f"during it (in-flight work finishing, acks lost); rejoined {rejoined:.1f}s after the "
        f"heal; confirmed={confirmed} executed={executed} lost={lost} duplicates={dups} "
        f"(deliveries run before the cut whose acks never reached the broker, run again)"
    )
    assert lost == 0 and confirmed == 2000 + more
    assert rejoined < 15, output[-3000:]
    assert "connection to the broker lost" in output
