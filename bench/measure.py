"""The measurements. Each group gets fresh vhosts; every worker is stopped in a ``finally``."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .broker import VHost, drain_marks, poll_depth
from .frameworks import QUEUE, Framework, PublishSpec, WorkerSpec
from .peers.common import percentile
from .procs import BenchError, Proc, Procs, wait_until
from .report import Results


@dataclass
class Sizes:
    consume: int
    publish: int
    latency: int
    rpc: int
    rss_tasks: int  # 0 = skip
    countdowns: int
    repeats: int
    rss_repeats: int


@dataclass
class Ctx:
    procs: Procs
    workdir: Path
    results: Results
    sizes: Sizes
    log: Callable[[str], None]
    vhosts: list[VHost]

    @contextmanager
    def vhost(self, label: str) -> Iterator[VHost]:
        vh = VHost(label)
        self.vhosts.append(vh)
        try:
            yield vh
        finally:
            self.vhosts.remove(vh)
            vh.delete()


def _count_total(directory: Path) -> int:
    total = 0
    for f in directory.iterdir():
        if f.suffix == ".tmp":
            continue
        try:
            total += int(f.read_text() or 0)
        except (OSError, ValueError):
            continue
    return total


def _died(workers: list[Proc]) -> str | None:
    for w in workers:
        if not w.running():
            return f"{w.name} exited {w.popen.returncode}:\n{w.output()}"
    return None


def _start(ctx: Ctx, spec: WorkerSpec, env: dict[str, str], extra: dict[str, str]) -> list[Proc]:
    full = {**env, **spec.env, **extra}
    return [
        ctx.procs.start(f"{spec.framework}-worker{i}", argv, full)
        for i, argv in enumerate(spec.argvs)
    ]


def _stop(ctx: Ctx, workers: list[Proc]) -> None:
    for w in workers:
        ctx.procs.stop(w, 20)


def _wait_ready(vh: VHost, spec: WorkerSpec, workers: list[Proc], timeout: float = 60) -> None:
    def ready() -> bool:
        problem = _died(workers)
        if problem:
            raise BenchError(problem)
        return vh.depth(QUEUE)[1] >= spec.consumers

    wait_until(ready, timeout, 0.1, f"{spec.framework} worker to consume")


def _tree_rss_mib(workers: list[Proc]) -> float:
    return sum(w.tree_rss_kib() for w in workers) / 1024


def _record(
    ctx: Ctx, fig: str, fw: Framework, spec: WorkerSpec | str, fn: Callable[..., Any], *args: Any
) -> Any:
    """``fn(*args)`` recorded under ``fig`` (a BenchError is recorded as a failure)."""
    label = spec if isinstance(spec, str) else spec.label
    note = "" if isinstance(spec, str) else spec.note
    try:
        value = fn(*args)
    except BenchError as exc:
        ctx.log(f"    ! {fw.name} {fig} [{label}]: {str(exc).splitlines()[0]}")
        ctx.results.fail(fig, fw.name, fw.group, label, str(exc), note)
        return None
    if value is not None:
        ctx.results.add(fig, fw.name, fw.group, label, value, note)
    return value


# -- consume ------------------------------------------------------------------------------------


def consume(ctx: Ctx, frameworks: list[Framework], quick: bool, process_counts: list[int]) -> None:
    n = ctx.sizes.consume
    for fw in frameworks:
        with ctx.vhost(f"consume-{fw.name}") as vh:
            env = fw.setup(ctx.procs, vh, ctx.workdir)
            template = fw.seed(ctx.procs, vh, env)
            for procs in process_counts:
                fig = f"consume{procs}"
                for spec in fw.consume_specs(procs):
                    if quick and not spec.quick:
                        continue
                    for r in range(ctx.sizes.repeats):
                        rate = _record(
                            ctx,
                            fig,
                            fw,
                            spec,
                            _consume_once,
                            ctx,
                            fw,
                            vh,
                            env,
                            spec,
                            template,
                            n,
                        )
                        if rate is not None:
                            ctx.log(
                                f"    {fw.name} {fig} [{spec.label}] #{r + 1}: {rate:,.0f} tasks/s"
                            )


def _consume_once(
    ctx: Ctx, fw: Framework, vh: VHost, env: dict[str, str], spec: WorkerSpec, template: Any, n: int
) -> float:
    vh.purge(QUEUE)
    vh.prefill(QUEUE, template, n, timeout=60 + n / 2000)
    count_dir = Path(tempfile.mkdtemp(prefix="count-", dir=ctx.workdir))
    workers = _start(ctx, spec, env, {"BENCH_COUNT_DIR": str(count_dir)})
    try:
        samples = poll_depth(vh, QUEUE, 60 + n / 300, 0.02, lambda: _died(workers))
        skip = max(n // 10, 2 * spec.prefetch_total)
        marks = drain_marks(samples, n, skip)
        if marks is None:
            raise BenchError(
                f"drained too fast to measure between the marks ({len(samples)} samples): "
                "use a larger --consume-n"
            )
        t_hi, t_lo, count = marks
        rate = count / (t_lo - t_hi)
        wait_until(lambda: _count_total(count_dir) >= n, 30, 0.1, f"{n} executions")
        time.sleep(0.3)
        done = _count_total(count_dir)
        if done != n:
            raise BenchError(f"{done} executions for {n} messages")
    finally:
        _stop(ctx, workers)
    for q in fw.dead_queues:
        dead = vh.depth(q)[0]
        if dead:
            raise BenchError(f"{dead} messages dead-lettered into {q}")
    return rate


# -- publish ------------------------------------------------------------------------------------


def publish(ctx: Ctx, frameworks: list[Framework]) -> None:
    for fw in frameworks:
        with ctx.vhost(f"publish-{fw.name}") as vh:
            env = fw.setup(ctx.procs, vh, ctx.workdir)
            for spec in fw.publish_specs():
                for r in range(ctx.sizes.repeats):
                    rate = _record(
                        ctx, spec.figure, fw, spec.label, _publish_once, ctx, fw, vh, env, spec
                    )
                    if rate is not None:
                        ctx.log(
                            f"    {fw.name} {spec.figure} [{spec.label}] #{r + 1}: {rate:,.0f}/s"
                        )


def _publish_once(
    ctx: Ctx, fw: Framework, vh: VHost, env: dict[str, str], spec: PublishSpec
) -> float:
    n = ctx.sizes.publish
    vh.purge(QUEUE)
    argv = fw.client_argv("publish", "--n", str(n), "--warmup", str(max(100, n // 10)), *spec.args)
    res = ctx.procs.run(f"{fw.name}-publish", argv, env, 60 + n / 200)
    return float(res["rate"])


# -- latency, delay().get(), idle RSS ------------------------------------------------------------


def latency(ctx: Ctx, frameworks: list[Framework], parts: set[str]) -> None:
    for fw in frameworks:
        specs = fw.latency_specs()
        if not specs:
            continue
        with ctx.vhost(f"latency-{fw.name}") as vh:
            env = fw.setup(ctx.procs, vh, ctx.workdir)
            for spec in specs:
                for r in range(ctx.sizes.repeats):
                    _latency_once(ctx, fw, vh, env, spec, parts, r)


def _latency_once(
    ctx: Ctx,
    fw: Framework,
    vh: VHost,
    env: dict[str, str],
    spec: WorkerSpec,
    parts: set[str],
    r: int,
) -> None:
    lat_file = Path(tempfile.mkstemp(prefix="lat-", suffix=".txt", dir=ctx.workdir)[1])
    workers: list[Proc] = []
    tag = f"{fw.name} [{spec.label}] #{r + 1}"

    def failed(figure: str, what: str, exc: BenchError) -> None:
        ctx.results.fail(figure, fw.name, fw.group, spec.label, str(exc), spec.note)
        ctx.log(f"    ! {tag} {what}: {str(exc).splitlines()[0]}")

    try:
        workers = _start(ctx, spec, env, {"BENCH_LAT_FILE": str(lat_file)})
        try:
            _wait_ready(vh, spec, workers)
        except BenchError as exc:
            failed("rss_idle" if "rss" in parts else "lat_p50", "start", exc)
            return
        if "rss" in parts:
            time.sleep(2)
            v = _tree_rss_mib(workers)
            ctx.results.add("rss_idle", fw.name, fw.group, spec.label, v, spec.note)
            ctx.log(f"    {tag} idle RSS {v:.1f} MiB")
        if "latency" in parts:
            try:
                p50, p99 = _latency_samples(ctx, fw, env, lat_file)
            except BenchError as exc:
                failed("lat_p50", "latency", exc)
            else:
                ctx.results.add("lat_p50", fw.name, fw.group, spec.label, p50, spec.note)
                ctx.results.add("lat_p99", fw.name, fw.group, spec.label, p99, spec.note)
                ctx.log(f"    {tag} publish→start p50 {p50:.2f} ms, p99 {p99:.2f} ms")
        if "rpc" in parts and fw.has_rpc:
            n = ctx.sizes.rpc
            argv = fw.client_argv("rpc", "--n", str(n), "--warmup", "20")
            try:
                res = ctx.procs.run(f"{fw.name}-rpc", argv, env, 60 + n * 0.1)
            except BenchError as exc:
                failed("rpc_p50", "delay().get()", exc)
            else:
                for key in ("p50", "p99"):
                    ctx.results.add(
                        f"rpc_{key}", fw.name, fw.group, spec.label, res[f"{key}_ms"], spec.note
                    )
                ctx.results.add("rpc_rate", fw.name, fw.group, spec.label, res["rate"], spec.note)
                ctx.log(
                    f"    {tag} delay().get() p50 {res['p50_ms']:.2f} ms, "
                    f"p99 {res['p99_ms']:.2f} ms, {res['rate']:,.0f}/s"
                )
    finally:
        _stop(ctx, workers)


def _latency_samples(
    ctx: Ctx, fw: Framework, env: dict[str, str], lat_file: Path
) -> tuple[float, float]:
    """One light-load run of the client; (p50, p99) in ms of what the tasks recorded."""
    n = ctx.sizes.latency
    lat_file.write_text("")
    argv = fw.client_argv("latency", "--n", str(n), "--warmup", "50")
    ctx.procs.run(f"{fw.name}-latency", argv, env, 60 + n * 0.05)

    def samples() -> list[float] | None:
        vals = [float(x) for x in lat_file.read_text().split()]
        return vals if len(vals) >= n else None

    vals: list[float] = wait_until(samples, 30, 0.1, f"{n} latency samples")
    return percentile(vals, 50) * 1000, percentile(vals, 99) * 1000


# -- RSS after many tasks ----------------------------------------------------------------------


def rss_after(ctx: Ctx, frameworks: list[Framework]) -> None:
    n = ctx.sizes.rss_tasks
    for fw in frameworks:
        specs = fw.rss_specs()
        if not specs:
            continue
        with ctx.vhost(f"rss-{fw.name}") as vh:
            env = fw.setup(ctx.procs, vh, ctx.workdir)
            template = fw.seed(ctx.procs, vh, env)
            for spec in specs:
                label = f"{spec.label}; after {n:,} tasks"
                for r in range(ctx.sizes.rss_repeats):
                    v = _record(
                        ctx,
                        "rss_after",
                        fw,
                        label,
                        _rss_once,
                        ctx,
                        vh,
                        env,
                        spec,
                        template,
                        n,
                    )
                    if v is not None:
                        ctx.log(f"    {fw.name} [{label}] #{r + 1}: {v:.1f} MiB")


def _rss_once(
    ctx: Ctx, vh: VHost, env: dict[str, str], spec: WorkerSpec, template: Any, n: int
) -> float:
    vh.purge(QUEUE)
    count_dir = Path(tempfile.mkdtemp(prefix="count-", dir=ctx.workdir))
    workers = _start(ctx, spec, env, {"BENCH_COUNT_DIR": str(count_dir)})
    try:
        _wait_ready(vh, spec, workers)
        sent = 0
        chunk = 20_000
        deadline = time.monotonic() + 300 + n / 300
        while sent < n:  # keep the queue topped up while the worker drains it
            problem = _died(workers)
            if problem:
                raise BenchError(problem)
            if time.monotonic() > deadline:
                raise BenchError(f"only {sent} of {n} tasks fed in time")
            if vh.depth(QUEUE)[0] < 2 * chunk:
                k = min(chunk, n - sent)
                vh.publish_copies(QUEUE, template, k)
                sent += k
            else:
                time.sleep(0.2)
        wait_until(
            lambda: _died(workers) is None and _count_total(count_dir) >= n,
            120 + n / 300,
            0.5,
            f"{n} executions",
        )
        time.sleep(1)
        return _tree_rss_mib(workers)
    finally:
        _stop(ctx, workers)


# -- pending countdowns ------------------------------------------------------------------------


def countdowns(ctx: Ctx, frameworks: list[Framework]) -> None:
    n = ctx.sizes.countdowns
    for fw in frameworks:
        if not fw.has_countdown:
            continue
        spec = fw.countdown_spec()
        label = f"{spec.label}; {n:,} tasks due in 600 s"
        for r in range(ctx.sizes.repeats):
            with ctx.vhost(f"countdown-{fw.name}") as vh:
                env = fw.setup(ctx.procs, vh, ctx.workdir)
                try:
                    rss, unacked, rate = _countdown_once(ctx, fw, vh, env, spec, n)
                except BenchError as exc:
                    ctx.results.fail("cd_rss", fw.name, fw.group, label, str(exc))
                    ctx.log(f"    ! {fw.name} countdowns: {str(exc).splitlines()[0]}")
                    continue
                ctx.results.add("cd_rss", fw.name, fw.group, label, rss, spec.note)
                ctx.results.add("cd_unacked", fw.name, fw.group, label, unacked, spec.note)
                ctx.results.add("cd_rate", fw.name, fw.group, label, rate, spec.note)
                ctx.log(
                    f"    {fw.name} [{label}] #{r + 1}: RSS {rss:.1f} MiB, {unacked:,.0f} unacked, "
                    f"published at {rate:,.0f}/s"
                )


def _countdown_once(
    ctx: Ctx, fw: Framework, vh: VHost, env: dict[str, str], spec: WorkerSpec, n: int
) -> tuple[float, float, float]:
    count_dir = Path(tempfile.mkdtemp(prefix="count-", dir=ctx.workdir))
    workers = _start(ctx, spec, env, {"BENCH_COUNT_DIR": str(count_dir)})
    try:
        _wait_ready(vh, spec, workers)
        argv = fw.client_argv("countdown", "--n", str(n), "--countdown", "600")
        res = ctx.procs.run(f"{fw.name}-countdown", argv, env, 120 + n / 100)
        # The management stats lag ~5 s: wait until every message is counted and the unacked
        # figure has stopped moving for two samples 3 s apart (bounded).
        deadline = time.monotonic() + 120 + n / 1000
        last: tuple[int, int] | None = None
        stable = 0
        while True:
            problem = _died(workers)
            if problem:
                raise BenchError(problem)
            total, unacked = vh.totals()
            if total >= n and (total, unacked) == last:
                stable += 1
                if stable >= 2:
                    break
            else:
                stable = 0
            last = (total, unacked)
            if time.monotonic() > deadline:
                raise BenchError(f"stats did not settle: {total} messages, {unacked} unacked")
            time.sleep(3)
        rss = _tree_rss_mib(workers)
        executed = _count_total(count_dir)
        if executed:
            raise BenchError(f"{executed} countdown tasks ran early")
        return rss, float(unacked), float(res["rate"])
    finally:
        _stop(ctx, workers)
