"""Profile amqptasks' hot paths with py-spy: ``python -m bench.profile worker|publish|countdown``.

* ``worker``: pre-fill N no-op tasks, start ``amqptasks worker`` (``--events``: with events;
  ``--store sqlite|redis``: tasks that keep their result, written to a fresh store) and
  record it with py-spy while it drains the queue;
* ``publish`` / ``countdown``: record the benchmark client publishing N tasks (``--style loop``
  or ``bulk``: ``App.send_many``; ``countdown`` publishes with a 600 s countdown).

Writes a collapsed-stack file (and a flame graph SVG) under ``.amqptasks/bench/profiles/`` and
prints the functions with the most samples, by own time and by inclusive time.
py-spy is not a dependency: ``.venv/bin/pip install py-spy``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import stores
from .broker import VHost, wait_for_broker
from .frameworks import QUEUE, STATE, AmqpTasks, Framework, RawPika
from .procs import Procs, wait_until

_LINE = re.compile(r":\d+\)$")


def py_spy() -> str:
    exe = Path(sys.executable).with_name("py-spy")
    found = str(exe) if exe.exists() else shutil.which("py-spy")
    if not found:
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


def record(pid: int, out: Path, fmt: str, rate: int) -> subprocess.Popen[bytes]:
    argv = [py_spy(), "record", "--pid", str(pid), "--rate", str(rate), "--format", fmt]
    argv += ["--output", str(out), "--nonblocking", "--threads"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def top(collapsed: Path, limit: int) -> str:
    """Own and inclusive sample counts per function from a collapsed-stack file."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = [
            _LINE.sub(")", f) for f in stack.split(";") if not f.startswith(("thread ", "process "))
        ]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count  # per function (line numbers dropped)
        for f in set(frames):
            incl[f] += count
    lines = [f"{total} samples", "", "own time:"]
    lines += [f"  {100 * c / total:5.1f}%  {f}" for f, c in own.most_common(limit)]
    lines += ["", "inclusive:"]
    lines += [f"  {100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(limit)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    p.add_argument("target", choices=["worker", "publish", "countdown", "raw-pika"])
    p.add_argument("--pool", default="asyncio", choices=["asyncio", "threads"])
    p.add_argument("-c", "--concurrency", type=int, default=8)
    p.add_argument("--prefetch-multiplier", type=int, default=32)
    p.add_argument("--style", default="bulk", choices=["loop", "bulk"])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--events", action="store_true", help="worker: with --events")
    p.add_argument(
        "--store",
        default="",
        choices=["", "rpc", "sqlite", "redis"],
        help="worker: tasks keep their result in a fresh store of this kind",
    )
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args(argv)
    if not wait_for_broker(10):
        print("error: the local broker does not answer (deploy/broker.sh start)", file=sys.stderr)
        return 1
    outdir = STATE / "profiles"
    outdir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{args.target}-{args.pool if args.target == 'worker' else args.style}-{stamp}"
    if args.store:
        name = f"{args.target}-{args.pool}-{args.store}-{stamp}"
    raw = outdir / f"{name}.txt"
    svg = outdir / f"{name}.svg"
    workdir = Path(tempfile.mkdtemp(prefix="amqptasks-profile-"))
    procs = Procs(workdir, Path.cwd())
    vh = VHost("profile")
    fw: Framework = (
        RawPika(sys.executable) if args.target == "raw-pika" else AmqpTasks(sys.executable)
    )
    store = contextlib.ExitStack()
    try:
        env = fw.setup(procs, vh, workdir)
        url = store.enter_context(stores.fresh(args.store, fw.redis_db, workdir))
        env.update(fw.backend_env(url))
        if args.target in ("worker", "raw-pika"):
            template = fw.seed(procs, vh, env, "rnoop" if args.store else "noop")
            print(f"pre-filling {args.n:,} messages ...", flush=True)
            vh.prefill(QUEUE, template, args.n, timeout=60 + args.n / 2000)
            if isinstance(fw, AmqpTasks):
                spec = fw._spec(
                    1, args.pool, args.concurrency, args.prefetch_multiplier, events=args.events
                )
            else:
                spec = fw.consume_specs(1)[0]
            worker = procs.start("worker", spec.argvs[0], {**env, **spec.env})
            wait_until(lambda: vh.depth(QUEUE)[0] < args.n, 60, 0.05, "the worker to start")
            t0 = time.monotonic()
            spies = [
                record(worker.pid, raw, "raw", args.rate),
                record(worker.pid, svg, "flamegraph", args.rate),
            ]
            wait_until(lambda: vh.depth(QUEUE)[0] == 0, 60 + args.n / 500, 0.1, "the drain")
            elapsed = time.monotonic() - t0
            print(f"drained in {elapsed:.1f}s ({args.n / elapsed:,.0f} tasks/s under the profiler)")
            procs.stop(worker)
        else:
            mode = "countdown" if args.target == "countdown" else "publish"
            argv = fw.client_argv(mode, "--n", str(args.n), "--warmup", "0", "--style", args.style)
            client = procs.start("client", argv, env)
            spies = [
                record(client.pid, raw, "raw", args.rate),
                record(client.pid, svg, "flamegraph", args.rate),
            ]
            client.popen.wait(60 + args.n / 100)
            print(client.output(500).strip())
            procs.stop(client)
        for s in spies:
            try:
                s.wait(30)
            except subprocess.TimeoutExpired:
                s.kill()
                s.wait(5)
        print(top(raw, args.top))
        print(f"\ncollapsed stacks: {raw}\nflame graph:      {svg}")
    finally:
        procs.stop_all()
        store.close()
        vh.delete()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
