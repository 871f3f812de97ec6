"""Every process the harness starts: tracked, bounded, and stopped by its PID.

Children run in their own session, so a Ctrl-C in the terminal reaches only the harness,
which then stops them (SIGTERM to the PID, SIGKILL to it and to the descendants it had after a
bounded wait) from a ``finally``. Nothing is ever killed by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH-RESULT "


class BenchError(Exception):
    """A measurement could not be taken (its figure is reported as failed, the run goes on)."""


class TimedOut(BenchError):
    """A client gave no result within its time: never retried, and the same configuration
    is not run again in later repeats (a stuck peer would cost its timeout every time)."""


class Invalid(BenchError):
    """A measurement ran but its result is wrong (not every task ran, dead letters...): never
    retried, always reported."""


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            continue
    return out


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (children first, bounded depth)."""
    found: list[int] = []
    frontier = [pid]
    for _ in range(16):
        nxt: list[int] = []
        for p in frontier:
            nxt.extend(_children(p))
        if not nxt:
            break
        found.extend(nxt)
        frontier = nxt
    return found


def proc_stats() -> Iterator[tuple[int, str, list[str]]]:
    """(pid, command name, the fields after the name) of every process in ``/proc/*/stat``
    (state, ppid, pgrp, ..., utime at [11], stime at [12]); vanished processes are skipped."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        head, sep, tail = text.rpartition(")")
        if sep:
            yield int(entry), head[head.find("(") + 1 :], tail.split()


def group_members(pgid: int) -> list[int]:
    """Live processes in process group ``pgid``. Every child is started in its own session,
    so its group id is its PID and descendants orphaned by a dead parent are still found."""
    return [
        pid
        for pid, _name, fields in proc_stats()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X")
    ]


def rss_kib(pid: int) -> int:
    """VmRSS of one process in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kib(pid: int) -> int:
    """Proportional set size of one process in KiB (``/proc/PID/smaps_rollup``; 0 if it is
    gone): its private pages plus its share of the pages it shares. Summed over a process
    tree it counts a page shared by a parent and its forked children once, where summed
    VmRSS counts it once per process (a prefork pool would look N times as big)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return False


class Proc:
    """One started process, its output in a log file."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], cwd: Path, log: Path
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log
        self._log = log.open("wb")
        self.popen = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def output(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def tree_rss_kib(self) -> int:
        """VmRSS of the process and all its descendants, summed (shared pages counted once
        per process: the growth of one process tree over time, not a size to compare)."""
        if not self.running():
            return 0
        return sum(rss_kib(p) for p in [self.pid, *descendants(self.pid)])

    def tree_pss_kib(self) -> int:
        """PSS of the process and all its descendants, summed: what the tree costs in memory,
        comparable between a single process and a multi-process pool."""
        if not self.running():
            return 0
        return sum(pss_kib(p) for p in [self.pid, *descendants(self.pid)])

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL the PID and its leftover descendants."""
        tree = descendants(self.pid) if self.running() else []
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                tree = list(dict.fromkeys(tree + descendants(self.pid)))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(5)
        for pid in dict.fromkeys(tree + group_members(self.pid)):
            if pid != self.pid and alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if not self._log.closed:
            self._log.close()
        return self.popen.returncode


def stop_popen(popen: subprocess.Popen[Any], grace: float = 20.0) -> int | None:
    """Stop a plain child (one the harness did not start through :class:`Procs`): SIGTERM,
    up to ``grace`` s for it to exit, then SIGKILL. Returns its exit code (None: still
    there 5 s after SIGKILL, which only a process stuck in the kernel manages)."""
    if popen.poll() is None:
        popen.terminate()
        try:
            popen.wait(grace)
        except subprocess.TimeoutExpired:
            popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(5)
    return popen.returncode


class Procs:
    """The registry: ``start`` long-running processes, ``run`` bounded clients, ``stop_all``."""

    def __init__(self, logdir: Path, cwd: Path) -> None:
        self.logdir = logdir
        self.cwd = cwd
        self.live: list[Proc] = []
        self._n = 0

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        self._n += 1
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        p = Proc(name, argv, env, self.cwd, self.logdir / f"{self._n:04d}-{safe}.log")
        self.live.append(p)
        return p

    def stop(self, p: Proc, timeout: float = 15.0) -> int | None:
        try:
            return p.stop(timeout)
        finally:
            if p in self.live:
                self.live.remove(p)

    def run(
        self, name: str, argv: list[str], env: dict[str, str], timeout: float
    ) -> dict[str, Any]:
        """Run a client to completion (killed after ``timeout`` s); return its BENCH-RESULT."""
        return self.finish(self.start(name, argv, env), timeout)

    def finish(self, p: Proc, timeout: float) -> dict[str, Any]:
        """Wait for started client ``p`` (killed after ``timeout`` s); its BENCH-RESULT."""
        name = p.name
        try:
            p.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop(p, 5)
            raise TimedOut(f"{name}: no result within {timeout:.0f}s\n{p.output()}") from None
        self.stop(p, 5)
        code = p.popen.returncode
        text = p.log_path.read_text(errors="replace")
        for line in reversed(text.splitlines()):
            if line.startswith(RESULT_PREFIX):
                result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
                return result
        raise BenchError(f"{name}: exited {code} without a result\n{text[-3000:]}")

    def stop_all(self) -> None:
        for p in reversed(list(self.live)):
            try:
                self.stop(p, 10)
            except Exception as exc:  # keep stopping the others
                print(f"warning: stopping {p.name} (pid {p.pid}) failed: {exc}")


def wait_until(predicate: Any, timeout: float, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``predicate`` until truthy or ``timeout`` s pass (then BenchError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
