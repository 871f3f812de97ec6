"""Helpers shared by every peer process (workers and clients of all frameworks).

Standard library only: this module is imported by the Celery and Dramatiq virtualenvs too.

* :func:`count` — what a no-op task does: one locked increment. A daemon thread (started on
  the first call in each process, fork-safe) writes the running total to
  ``$BENCH_COUNT_DIR/<pid>`` every 0.2 s (``$BENCH_COUNT_INTERVAL``), so the harness can
  check that every message was really *executed* (not dead-lettered or dropped) without
  touching the hot path.
* :func:`record_latency` — publish→start: ``time.time() - sent`` appended to
  ``$BENCH_LAT_FILE`` (one line per sample, taken before any I/O).
* :func:`emit` — a client's result, one ``BENCH-RESULT {json}`` line on stdout.
* :func:`workflows` / :func:`reads` — what the workflow and read-latency clients of every
  framework time, the same way: a group and a chord of N no-ops to their results, then (in a
  fresh process) N results read back by id one at a time.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

#: The id a seed message is published with; the harness replaces it by a fresh UUID per copy.
PLACEHOLDER_ID = "00000000-0000-4000-8000-00000000b0b0"
RESULT_PREFIX = "BENCH-RESULT "
QUEUE = os.environ.get("BENCH_QUEUE", "bench")
URL = os.environ.get("BENCH_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")

_lock = threading.Lock()
_count = 0
_flusher: threading.Thread | None = None
_lat_file: Any = None


def _after_fork() -> None:
    global _count, _flusher, _lat_file
    _count = 0
    _flusher = None
    _lat_file = None


os.register_at_fork(after_in_child=_after_fork)


def _flush_loop(path: str, interval: float) -> None:
    last = -1
    while True:
        value = _count
        if value != last:
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                f.write(str(value))
            os.replace(tmp, path)
            last = value
        time.sleep(interval)


def _start_flusher() -> None:
    global _flusher
    directory = os.environ.get("BENCH_COUNT_DIR")
    if not directory:
        _flusher = threading.Thread()  # counting disabled: never start again
        return
    path = os.path.join(directory, str(os.getpid()))
    # The scale group times its drain from these counts (not from queue depths: 100 queues
    # would take 100 declares per sample), so it asks for a finer flush than the default.
    interval = float(os.environ.get("BENCH_COUNT_INTERVAL", "0.2"))
    _flusher = threading.Thread(
        target=_flush_loop, args=(path, interval), name="bench-count", daemon=True
    )
    _flusher.start()


def count() -> None:
    """Count one execution (thread-safe; a few hundred nanoseconds)."""
    global _count
    with _lock:
        _count += 1
        if _flusher is None:
            _start_flusher()


def record_latency(sent: float) -> None:
    """Record ``now - sent`` (seconds) for a publish→start sample."""
    global _lat_file
    latency = time.time() - sent
    with _lock:
        if _lat_file is None:
            _lat_file = open(os.environ["BENCH_LAT_FILE"], "a", buffering=1)  # noqa: SIM115
        _lat_file.write(f"{latency:.9f}\n")


def emit(**result: Any) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def timed(n: int, warmup: int, fn: Callable[[int], object]) -> float:
    """Call ``fn(i)`` ``warmup`` times untimed, then ``n`` times timed; return calls/s."""
    for i in range(warmup):
        fn(i)
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t0)


def latency_loop(
    n: int, warmup: int, interval: float, send: Callable[[float, bool], object]
) -> None:
    """Light load: one message every ``interval`` seconds; ``send(sent, keep)``."""
    for i in range(n + warmup):
        send(time.time(), i >= warmup)
        time.sleep(interval)


def round_trips(
    n: int, warmup: int, call: Callable[[int], object], min_seconds: float = 0.0
) -> dict[str, float]:
    """Sequential request/reply round trips — at least ``n``, and on until ``min_seconds``
    passed (the rate of a fast contender over a short run spreads widely): p50/p99 (ms),
    round trips per second, and how many were timed."""
    samples = []
    for i in range(warmup):
        call(i)
    t_all = time.perf_counter()
    i = 0
    while i < n or time.perf_counter() - t_all < min_seconds:
        t0 = time.perf_counter()
        call(i)
        samples.append(time.perf_counter() - t0)
        i += 1
    total = time.perf_counter() - t_all
    return {
        "p50_ms": percentile(samples, 50) * 1000,
        "p99_ms": percentile(samples, 99) * 1000,
        "rate": len(samples) / total,
        "n": len(samples),
    }


def workflows(
    n: int,
    warmup: int,
    run_group: Callable[[int], list[Any]],
    run_chord: Callable[[int], Any],
    ids_file: str | None,
) -> dict[str, float]:
    """Time ``run_group(n)`` (apply a group of ``n`` no-ops, return every member's result) and
    ``run_chord(n)`` (apply a chord of ``n`` no-ops whose body counts what it got, return the
    body's result), each from the call to the last result, after an untimed warm-up of size
    ``warmup``. The results are checked (``n`` Nones; the body saw ``n``): a run whose
    results are wrong fails instead of reporting a time. ``run_group`` may leave the member
    ids in ``LAST_IDS``; they are written to ``ids_file`` (one a line) for :func:`reads`."""
    if warmup:
        _check_group(run_group(warmup), warmup)
        _check_chord(run_chord(warmup), warmup)
    LAST_IDS.clear()
    t0 = time.perf_counter()
    out = run_group(n)
    group_s = time.perf_counter() - t0
    _check_group(out, n)
    if ids_file:
        if len(LAST_IDS) != n:
            raise RuntimeError(f"the group left {len(LAST_IDS)} member ids, expected {n}")
        with open(ids_file, "w") as f:
            f.write("\n".join(LAST_IDS) + "\n")
    t0 = time.perf_counter()
    body = run_chord(n)
    chord_s = time.perf_counter() - t0
    _check_chord(body, n)
    return {"group_s": group_s, "chord_s": chord_s}


#: Member ids of the last group :func:`workflows` ran (filled by the framework's client).
LAST_IDS: list[str] = []


def _check_group(results: list[Any], n: int) -> None:
    if len(results) != n or any(r is not None for r in results):
        bad = [r for r in results if r is not None][:3]
        raise RuntimeError(f"group of {n}: got {len(results)} results, non-None: {bad!r}")


def _check_chord(body: Any, n: int) -> None:
    if body != n:
        raise RuntimeError(f"chord of {n}: the body counted {body!r} member results")


def reads(ids_file: str, read: Callable[[str], object]) -> dict[str, float]:
    """Read every id of ``ids_file`` once, one at a time (``read(id)`` must return the stored
    result: None for the no-ops); p50/p99 of one read in ms, and reads per second."""
    with open(ids_file) as f:
        ids = [line.strip() for line in f if line.strip()]
    if not ids:
        raise RuntimeError(f"{ids_file}: no ids to read")
    samples = []
    t_all = time.perf_counter()
    for task_id in ids:
        t0 = time.perf_counter()
        value = read(task_id)
        samples.append(time.perf_counter() - t0)
        if value is not None:
            raise RuntimeError(f"result of {task_id} read back as {value!r}, expected None")
    total = time.perf_counter() - t_all
    return {
        "n": len(ids),
        "p50_ms": percentile(samples, 50) * 1000,
        "p99_ms": percentile(samples, 99) * 1000,
        "rate": len(ids) / total,
    }


def arg_parser(description: str) -> Any:
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("mode")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--interval", type=float, default=0.005)
    p.add_argument("--window", type=int, default=1000)
    p.add_argument("--confirm", action="store_true")
    p.add_argument("--style", default="loop")
    p.add_argument("--countdown", type=float, default=600.0)
    p.add_argument("--task", default="noop", help="seed: which bench task (noop, rnoop)")
    p.add_argument("--ids", help="workflows: write the group's ids here; read: read them")
    p.add_argument(
        "--min-seconds", type=float, default=0.0, help="rpc: go on until this many seconds"
    )
    p.add_argument("--queues", default="", help="scale-publish: comma-separated queues")
    p.add_argument(
        "--start-at", type=float, default=0.0, help="scale-publish: wall-clock start (barrier)"
    )
    return p
