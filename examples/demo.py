"""The quickstart (``./dev run``): a worker runs the example tasks and the results are printed.

Expects the broker running and the topology applied (``./dev run`` does both first). Starts
``amqptasks worker -Q default,web_tasks`` as a subprocess, sends three tasks three ways, prints
each result, stops the worker with SIGTERM (warm shutdown) and exits 0 — or 1 if anything failed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pika

from amqptasks import chain, chord
from examples.app import app
from examples.tasks import add, reduce
from examples.web import sendmail

ROOT = Path(__file__).resolve().parents[1]


def start_worker() -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).with_name("amqptasks")
    proc = subprocess.Popen(
        [str(exe), "worker", "-Q", "default,web_tasks", "-l", "WARNING"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    for raw in proc.stderr:  # the banner, then "ready: consuming ..."
        line = raw.decode(errors="replace")
        sys.stderr.write(line)
        if line.startswith("ready: consuming"):
            break
    else:
        raise RuntimeError(f"worker exited early with code {proc.wait()}")
    # Keep draining the worker's output so a full pipe can never block it.
    threading.Thread(target=_drain, args=(proc.stderr,), daemon=True).start()
    return proc


def _drain(stream: IO[bytes]) -> None:
    for raw in stream:
        sys.stderr.write(raw.decode(errors="replace"))


def raw_pika_publish(url: str) -> object:
    """The any-AMQP-client path: plain pika, a minimal JSON body, direct reply-to."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    replies: list[dict[str, object]] = []
    ch.basic_consume(
        "amq.rabbitmq.reply-to",
        lambda _c, _m, _p, body: replies.append(json.loads(body)),
        auto_ack=True,
    )
    body = b'{"task": "examples.tasks.add", "args": [2, 3]}'
    ch.basic_publish(
        "tasks",
        "task.add",
        body,
        pika.BasicProperties(reply_to="amq.rabbitmq.reply-to", correlation_id="demo-raw"),
    )
    print(f"raw pika publish:  exchange=tasks routing_key=task.add body={body.decode()}")
    deadline = time.monotonic() + 20
    while not replies and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.2)
    conn.close()
    if not replies:
        raise TimeoutError("no reply to the raw publish within 20s")
    return replies[0]


def main() -> int:
    ok = True
    worker = start_worker()
    try:
        r1 = add.delay(2, 3)
        print(f"add.delay(2, 3)            -> routed task.add to 'default', id {r1.id}")
        print(f"  result: {r1.get(timeout=20)}")
        r2 = sendmail.delay("newcomer@example.com")
        print(f"sendmail.delay(...)        -> routed web.render to 'web_tasks', id {r2.id}")
        print(f"  result: {r2.get(timeout=20)!r}")
        reply = raw_pika_publish(app.settings.broker.url)
        print(f"  reply: {json.dumps(reply)}")
        flow = chain(add.s(2, 2), add.s(4), add.s(8))()
        print(f"chain(add.s(2, 2), add.s(4), add.s(8))() -> {flow.get(timeout=20)}")
        total = chord(add.s(i, i) for i in range(10))(reduce.s())
        print(f"chord(add.s(i, i) for i in range(10))(reduce.s()) -> {total.get(timeout=20)}")
        stored = app.AsyncResult(r1.id)  # any process could do this: the store has it
        print(f"app.AsyncResult(…{r1.id[-12:]}) -> {stored.state} {stored.get(timeout=20)}")
    except Exception as exc:
        print(f"demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        ok = False
    finally:
        app.close()
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(30)
        print(f"worker stopped (exit {code})")
        ok = ok and code == 0
    return 0 if ok else 1


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
