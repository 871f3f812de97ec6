"""The measurements. Each group gets fresh vhosts; every worker is stopped in a ``finally``.

A failed sample is retried once after the broker answers again (other people's tests may stop
the local node for a moment); a sample that ran but is wrong (:class:`Invalid`: not every task
executed, dead letters, early countdowns) is never retried. Failures are recorded and the run
goes on; they make the exit status 1.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import stores
from .broker import Template, VHost, drain_marks, poll_depth, wait_for_broker
from .frameworks import QUEUE, AmqpTasks, Framework, PublishSpec, RawPika, WorkerSpec
from .peers.common import percentile
from .procs import BenchError, Invalid, Proc, Procs, TimedOut, wait_until
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
    #: Seconds a throughput measurement (consume drain window, timed publish) lasts at
    #: least: shorter runs of the fast contenders spread by ±30 % (an independent rerun).
    window: float = 5.0
    consume_max: int = 400_000
    workflow: int = 10_000  # members of a group / chord (and results read back by id)
    #: A second, smaller group / chord (Redis store only) for the ratio against Celery: its
    #: group and chord of 10,000 gave no result within their 310 s, so the N figures alone
    #: leave the "≥ 2× Celery" targets unmeasured. 0 (or >= workflow): not run.
    workflow_small: int = 1_000
    scale: int = 200_000  # messages per scale cell (published, then drained)
    scale_processes: tuple[int, ...] = (1, 2, 4)
    scale_queues: tuple[int, ...] = (1, 10, 100)
    scale_repeats: int = 1
    rss_warmup: float = 0.1  # fraction of --rss-tasks counted as warm-up


@dataclass
class Ctx:
    procs: Procs
    workdir: Path
    results: Results
    sizes: Sizes
    log: Callable[[str], None]
    vhosts: list[VHost]
    #: (framework, figure, configuration, step) that timed out once: not run again this run.
    timed_out: set[tuple[str, str, str, str]] = field(default_factory=set)

    @contextmanager
    def vhost(self, label: str) -> Iterator[VHost]:
        vh = VHost(label)
        self.vhosts.append(vh)
        try:
            yield vh
        finally:
            try:
                vh.delete()
                self.vhosts.remove(vh)
            except Exception as exc:  # retried once more at the very end
                self.log(f"    warning: deleting vhost {vh.name} failed: {exc}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def attempt(ctx: Ctx, what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, retried once after a failure that was neither :class:`Invalid` nor
    :class:`TimedOut` (once the broker answers again). Raises the last error."""
    for retry in (True, False):
        try:
            return fn(*args)
        except (Invalid, TimedOut):
            raise
        except Exception as exc:
            if not retry:
                raise
            ctx.log(f"    ~ {what}: {_first_line(exc)}; retrying once")
            if not wait_for_broker(180):
                raise BenchError("the broker did not come back within 180 s") from exc
    raise AssertionError("unreachable")


def _label_note(spec: WorkerSpec | str) -> tuple[str, str]:
    return (spec, "") if isinstance(spec, str) else (spec.label, spec.note)


def _setup_failed(ctx: Ctx, fig: str, fw: Framework, what: str, exc: BaseException) -> None:
    """Record a contender's failed setup under ``fig`` and wait for the broker to answer."""
    ctx.log(f"    ! {fw.name} {what}: {_first_line(exc)}")
    ctx.results.fail(fig, fw.name, fw.group, "setup", traceback.format_exc())
    wait_for_broker(180)


def _try(
    ctx: Ctx, fig: str, fw: Framework, spec: WorkerSpec | str, fn: Callable[..., Any], *args: Any
) -> Any:
    """``attempt(fn, *args)``; a failure is recorded under ``fig`` and None returned. A
    configuration that timed out before is skipped (its failure is already recorded)."""
    label, note = _label_note(spec)
    # The callable too: a group may call _try for a worker start and, inside it, for its
    # client under the same figure; a client's timeout must not skip the whole start.
    key = (fw.name, fig, label, getattr(fn, "__qualname__", repr(fn)))
    if key in ctx.timed_out:
        ctx.log(f"    - {fw.name} {fig} [{label}]: skipped, it timed out in an earlier repeat")
        return None
    try:
        return attempt(ctx, f"{fw.name} {fig} [{label}]", fn, *args)
    except Exception as exc:
        if isinstance(exc, TimedOut):
            ctx.timed_out.add(key)
        ctx.log(f"    ! {fw.name} {fig} [{label}]: {_first_line(exc)}")
        ctx.results.fail(fig, fw.name, fw.group, label, f"{_first_line(exc)}\n{exc}", note)
        return None


def per_framework(ctx: Ctx, fig: str, fw: Framework, fn: Callable[..., Any], *args: Any) -> None:
    """Run one framework's share of a group; a setup failure is recorded and the next
    framework goes on."""
    try:
        attempt(ctx, f"{fw.name} {fig} setup", fn, *args)
    except Exception as exc:
        _setup_failed(ctx, fig, fw, fig, exc)


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


def _stop(ctx: Ctx, workers: list[Proc], grace: float) -> None:
    for w in workers:
        ctx.procs.stop(w, grace)


def _wait_ready(vh: VHost, spec: WorkerSpec, workers: list[Proc], timeout: float = 60) -> None:
    def ready() -> bool:
        problem = _died(workers)
        if problem:
            raise BenchError(problem)
        return vh.depth(QUEUE)[1] >= spec.consumers

    wait_until(ready, timeout, 0.1, f"{spec.framework} worker to consume")


def _tree_rss_mib(workers: list[Proc]) -> float:
    """Summed VmRSS of the workers' process trees (for growth over time)."""
    return sum(w.tree_rss_kib() for w in workers) / 1024


def _tree_pss_mib(workers: list[Proc]) -> float:
    """Summed PSS of the workers' process trees: the memory figure compared between
    contenders (a prefork pool's shared pages are counted once, not once per child)."""
    return sum(w.tree_pss_kib() for w in workers) / 1024


# -- consume ------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """One contender set up on its own vhost for a group."""

    fw: Framework
    vh: VHost
    env: dict[str, str]
    template: Template | None


def prepare_all(
    ctx: Ctx, stack: ExitStack, frameworks: list[Framework], group: str, fig: str, seed: bool
) -> list[Prepared]:
    """Each contender's vhost (closed with ``stack``), environment and, with ``seed``, its
    message template. A contender whose setup fails is recorded and left out."""
    out = []
    for fw in frameworks:
        try:
            vh = stack.enter_context(ctx.vhost(f"{group}-{fw.name}"))
            env = attempt(ctx, f"{fw.name} setup", fw.setup, ctx.procs, vh, ctx.workdir)
            template = (
                attempt(ctx, f"{fw.name} seed", fw.seed, ctx.procs, vh, env) if seed else None
            )
        except Exception as exc:
            _setup_failed(ctx, fig, fw, f"{group} setup", exc)
            continue
        out.append(Prepared(fw, vh, env, template))
    return out


@dataclass
class _Item:
    """One configuration's runs in a consume-style group. ``template`` overrides the
    contender's seed message and ``once`` the single run (the results group runs each with
    a fresh result store around :func:`_consume_once`)."""

    p: Prepared
    fig: str
    spec: WorkerSpec
    n: int
    done: int = 0
    recalibrated: int = 0
    template: Template | None = None
    once: Callable[..., tuple[float, float]] | None = None


def consume(ctx: Ctx, frameworks: list[Framework], quick: bool, process_counts: list[int]) -> None:
    """Repeats run round-robin over every contender and configuration (repeat 1 of all, then
    repeat 2 of all, ...), so a drift in background load does not favour anyone."""
    with ExitStack() as stack:
        prepared = prepare_all(ctx, stack, frameworks, "consume", "consume1", seed=True)
        items = [
            _Item(p, _consume_fig(procs, spec), spec, ctx.sizes.consume)
            for procs in process_counts
            for p in prepared
            for spec in p.fw.consume_specs(procs)
            if spec.quick or not quick
        ]
        ours = next((p for p in prepared if isinstance(p.fw, AmqpTasks)), None)
        raw = next((p for p in prepared if type(p.fw) is RawPika), None)
        if ours is not None and raw is not None and 1 in process_counts:
            # Raw pika on amqptasks' vhost, queue and messages (RawPika.same_messages_spec).
            same = Prepared(raw.fw, ours.vh, ours.env, ours.template)
            spec = raw.fw.same_messages_spec()
            items.append(_Item(same, _consume_fig(1, spec), spec, ctx.sizes.consume))
        run_items(ctx, items)


def _consume_fig(processes: int, spec: WorkerSpec) -> str:
    """``consume1``, or ``consume1_events`` for a cost variant (its own figure)."""
    return f"consume{processes}" + (f"_{spec.variant}" if spec.variant else "")


def run_items(ctx: Ctx, items: list[_Item]) -> None:
    """A calibration pass, then ``repeats`` round-robin passes over ``items``."""
    for item in items:  # first pass: calibrate N where the window is too short
        _consume_item(ctx, item, calibrate=True)
    for _ in range(ctx.sizes.repeats):
        for item in items:
            if item.done < ctx.sizes.repeats:
                _consume_item(ctx, item, calibrate=False)


def _consume_item(ctx: Ctx, item: _Item, calibrate: bool) -> None:
    fw, spec = item.p.fw, item.spec
    template = item.template or item.p.template
    assert template is not None
    res = _try(
        ctx,
        item.fig,
        fw,
        spec,
        item.once or _consume_once,
        ctx,
        fw,
        item.p.vh,
        item.p.env,
        spec,
        template,
        item.n,
    )
    if res is None:  # recorded as a failed repeat
        item.done += 1
        return
    rate, window = res
    # Too short a window measures the poll interval and the noise, not the worker: a run
    # whose window is under --consume-window only calibrates N (the first run always may;
    # a counted one too, when the rate rose since) and is not counted. Only N capped at
    # consume_max lets a shorter window count (its window is reported with the figure).
    wanted = _consume_n(rate, spec, ctx.sizes)
    if window < ctx.sizes.window and wanted > item.n and item.recalibrated < 3:
        ctx.log(
            f"    {fw.name} {item.fig} [{spec.label}]: {rate:,.0f} tasks/s over {window:.2f}s "
            f"with N={item.n:,} ({'calibration' if calibrate else 'window too short'}); "
            f"N={wanted:,} from now"
        )
        item.n = wanted
        item.recalibrated += 0 if calibrate else 1
        if not calibrate:  # run it again now, so the repeat count stays what was asked
            _consume_item(ctx, item, calibrate=False)
        return
    item.done += 1
    ctx.results.add(item.fig, fw.name, fw.group, spec.label, rate, spec.note, window=window)
    ctx.log(
        f"    {fw.name} {item.fig} [{spec.label}] #{item.done}: {rate:,.0f} tasks/s "
        f"(N={item.n:,}, window {window:.2f}s)"
    )


def _consume_n(rate: float, spec: WorkerSpec, sizes: Sizes) -> int:
    """N whose measured window (from the skip mark down to 10 %) lasts ``sizes.window`` s."""
    skip = 2 * spec.prefetch_total
    n = (rate * sizes.window + skip) / 0.8
    n = min(sizes.consume_max, int(n * 1.1 / 1000 + 1) * 1000)
    return n if n > sizes.consume else sizes.consume


def _consume_once(
    ctx: Ctx,
    fw: Framework,
    vh: VHost,
    env: dict[str, str],
    spec: WorkerSpec,
    template: Template,
    n: int,
) -> tuple[float, float]:
    """Pre-fill N, start the worker(s), time the drain between the depth marks; (rate,
    window seconds)."""
    vh.purge(QUEUE)
    vh.prefill(QUEUE, template, n, timeout=60 + n / 2000)
    count_dir = Path(tempfile.mkdtemp(prefix="count-", dir=ctx.workdir))
    workers = _start(ctx, spec, env, {"BENCH_COUNT_DIR": str(count_dir)})
    try:
        samples = poll_depth(vh, QUEUE, 60 + n / 300, 0.01, lambda: _died(workers))
        marks = drain_marks(samples, n, max(n // 10, 2 * spec.prefetch_total))
        if marks is None:
            raise Invalid(
                f"drained too fast to measure between the marks ({len(samples)} samples): "
                "use a larger --consume-n"
            )
        t_hi, t_lo, count = marks
        rate = count / (t_lo - t_hi)
        wait_until(lambda: _count_total(count_dir) >= n, 30 + n / 1000, 0.1, f"{n} executions")
        time.sleep(0.3)
        done = _count_total(count_dir)
        if done != n:
            raise Invalid(f"{done} executions for {n} messages")
    finally:
        _stop(ctx, workers, spec.stop_grace)
    for q in fw.dead_queues:
        dead = vh.depth(q)[0]
        if dead:
            raise Invalid(f"{dead} messages dead-lettered into {q}")
    return rate, t_lo - t_hi


# -- publish ------------------------------------------------------------------------------------


def publish(ctx: Ctx, frameworks: list[Framework]) -> None:
    """Round-robin repeats like consume. N starts at ``--publish-n`` and grows (that run
    not counted) until the timed part lasts at least the measuring window."""
    with ExitStack() as stack:
        prepared = prepare_all(ctx, stack, frameworks, "publish", "pub_loop_confirmed", False)
        sizes: dict[tuple[str, str], int] = {}
        for r in range(ctx.sizes.repeats):
            for p in prepared:
                for spec in p.fw.publish_specs():
                    _publish_item(ctx, p, spec, sizes, r)


def _publish_item(
    ctx: Ctx, p: Prepared, spec: PublishSpec, sizes: dict[tuple[str, str], int], r: int
) -> None:
    fw = p.fw
    key = (fw.name, spec.label)
    for _ in range(4):
        n = sizes.get(key, ctx.sizes.publish)
        rate = _try(ctx, spec.figure, fw, spec.label, _publish_once, ctx, fw, p.vh, p.env, spec, n)
        if rate is None:
            return
        seconds = n / rate
        wanted = int(rate * ctx.sizes.window * 1.2 / 1000 + 1) * 1000
        if seconds >= ctx.sizes.window or wanted <= n:
            break
        ctx.log(
            f"    {fw.name} {spec.figure} [{spec.label}]: {rate:,.0f}/s over {seconds:.2f}s "
            f"with N={n:,} (window too short); N={wanted:,} from now"
        )
        sizes[key] = wanted
    ctx.results.add(spec.figure, fw.name, fw.group, spec.label, rate, window=seconds)
    ctx.log(f"    {fw.name} {spec.figure} [{spec.label}] #{r + 1}: {rate:,.0f}/s (N={n:,})")


def _publish_once(
    ctx: Ctx, fw: Framework, vh: VHost, env: dict[str, str], spec: PublishSpec, n: int
) -> float:
    vh.purge(QUEUE)
    argv = fw.client_argv("publish", "--n", str(n), "--warmup", str(max(100, n // 10)), *spec.args)
    res = ctx.procs.run(f"{fw.name}-publish", argv, env, 60 + n / 200)
    return float(res["rate"])


# -- latency, delay().get(), idle RSS ------------------------------------------------------------


def latency(ctx: Ctx, frameworks: list[Framework], parts: set[str], quick: bool) -> None:
    """Every plain one-process configuration of each contender (``--quick``: those marked
    quick), round-robin repeats."""
    fws = [fw for fw in frameworks if fw.latency_specs()]
    fig = "rss_idle" if "rss" in parts else "lat_p50"
    with ExitStack() as stack:
        prepared = prepare_all(ctx, stack, fws, "latency", fig, False)
        for r in range(ctx.sizes.repeats):  # round-robin, like consume
            for p in prepared:
                for spec in p.fw.latency_specs():
                    if quick and not spec.quick:
                        continue
                    _try(
                        ctx, fig, p.fw, spec, _latency_once, ctx, p.fw, p.vh, p.env, spec, parts, r
                    )


def _latency_once(
    ctx: Ctx,
    fw: Framework,
    vh: VHost,
    env: dict[str, str],
    spec: WorkerSpec,
    parts: set[str],
    r: int,
) -> None:
    """One worker start: idle RSS, then light-load latency, then delay().get() round trips
    (each recorded on its own; returns None so the caller records nothing more)."""
    with ExitStack() as stack:  # stops the workers, then empties the store
        url = stack.enter_context(stores.fresh(spec.store, fw.redis_db, ctx.workdir))
        # Workers and clients see the same store (an rpc:// client must not wait on SQLite).
        env = {**env, **fw.backend_env(url)}
        lat_file = Path(tempfile.mkstemp(prefix="lat-", suffix=".txt", dir=ctx.workdir)[1])
        tag = f"{fw.name} [{spec.label}] #{r + 1}"
        workers = _start(ctx, spec, env, {"BENCH_LAT_FILE": str(lat_file)})
        stack.callback(_stop, ctx, workers, spec.stop_grace)
        env = {**env, **spec.client_env}  # the clients' view (raw pika: BENCH_RPC_CONFIRM)
        _wait_ready(vh, spec, workers)
        if "rss" in parts:
            time.sleep(2)
            v = _tree_pss_mib(workers)
            ctx.results.add("rss_idle", fw.name, fw.group, spec.label, v, spec.note)
            ctx.log(f"    {tag} idle memory {v:.1f} MiB (PSS)")
        if "latency" in parts:
            vals = _try(ctx, "lat_p50", fw, spec, _latency_samples, ctx, fw, env, lat_file)
            if vals is not None:
                p50, p99 = percentile(vals, 50) * 1000, percentile(vals, 99) * 1000
                ctx.results.add_samples("lat", fw.name, spec.label, [v * 1000 for v in vals])
                ctx.results.add("lat_p50", fw.name, fw.group, spec.label, p50, spec.note)
                ctx.results.add("lat_p99", fw.name, fw.group, spec.label, p99, spec.note)
                ctx.log(f"    {tag} publish→start p50 {p50:.2f} ms, p99 {p99:.2f} ms")
        if "rpc" in parts and fw.has_rpc:
            n = ctx.sizes.rpc
            secs = ctx.sizes.window
            argv = fw.client_argv(
                "rpc", "--n", str(n), "--warmup", "20", "--min-seconds", str(secs)
            )
            timeout = 60 + n * 0.1 + secs
            res = _try(
                ctx, "rpc_p50", fw, spec, ctx.procs.run, f"{fw.name}-rpc", argv, env, timeout
            )
            if res is not None:
                for key in ("p50", "p99"):
                    ctx.results.add(
                        f"rpc_{key}", fw.name, fw.group, spec.label, res[f"{key}_ms"], spec.note
                    )
                ctx.results.add(
                    "rpc_rate",
                    fw.name,
                    fw.group,
                    spec.label,
                    res["rate"],
                    spec.note,
                    window=res["n"] / res["rate"],
                )
                ctx.log(
                    f"    {tag} delay().get() p50 {res['p50_ms']:.2f} ms, "
                    f"p99 {res['p99_ms']:.2f} ms, {res['rate']:,.0f}/s"
                )


def _latency_samples(ctx: Ctx, fw: Framework, env: dict[str, str], lat_file: Path) -> list[float]:
    """One light-load run of the client; the latencies (s) the tasks recorded."""
    n = ctx.sizes.latency
    lat_file.write_text("")
    argv = fw.client_argv("latency", "--n", str(n), "--warmup", "50")
    ctx.procs.run(f"{fw.name}-latency", argv, env, 60 + n * 0.05)

    def samples() -> list[float] | None:
        vals = [float(x) for x in lat_file.read_text().split()]
        return vals if len(vals) >= n else None

    vals: list[float] = wait_until(samples, 30, 0.1, f"{n} latency samples")
    return vals


# -- RSS after many tasks ----------------------------------------------------------------------


def rss_after(ctx: Ctx, frameworks: list[Framework]) -> None:
    for fw in frameworks:
        if fw.rss_specs():
            per_framework(ctx, "rss_after", fw, _rss_fw, ctx, fw)


def _rss_fw(ctx: Ctx, fw: Framework) -> None:
    n = ctx.sizes.rss_tasks
    with ctx.vhost(f"rss-{fw.name}") as vh:
        env = fw.setup(ctx.procs, vh, ctx.workdir)
        template = fw.seed(ctx.procs, vh, env)
        for spec in fw.rss_specs():
            label = f"{spec.label}; after {n:,} tasks"
            for r in range(ctx.sizes.rss_repeats):
                got = _try(ctx, "rss_after", fw, label, _rss_once, ctx, vh, env, spec, template)
                if got is None:
                    continue
                pss, samples = got
                warm, final = _rss_growth(samples, int(n * ctx.sizes.rss_warmup))
                for fig, v in (
                    ("rss_after", pss),
                    ("rss_warm", warm),
                    ("rss_final", final),
                    ("rss_growth", final - warm),
                ):
                    ctx.results.add(fig, fw.name, fw.group, label, v, spec.note)
                ctx.results.add_samples(
                    "rss", fw.name, label + (f" #{r + 1}" if r else ""), samples
                )
                ctx.log(
                    f"    {fw.name} [{label}] #{r + 1}: {pss:.1f} MiB PSS; RSS after warm-up "
                    f"{warm:.1f} MiB, final {final:.1f} MiB, growth {final - warm:+.1f} MiB "
                    f"({len(samples)} samples)"
                )


def _rss_growth(samples: list[list[float]], warmup_tasks: int) -> tuple[float, float]:
    """(RSS at the first sample once ``warmup_tasks`` ran, RSS of the last sample)."""
    warm = next((rss for done, rss in samples if done >= warmup_tasks), samples[-1][1])
    return warm, samples[-1][1]


def _rss_once(
    ctx: Ctx, vh: VHost, env: dict[str, str], spec: WorkerSpec, template: Template
) -> tuple[float, list[list[float]]]:
    """Feed N tasks through one worker while sampling its tree's RSS about once a second;
    (PSS once all ran, [[tasks executed, RSS MiB], ...])."""
    n = ctx.sizes.rss_tasks
    vh.purge(QUEUE)
    count_dir = Path(tempfile.mkdtemp(prefix="count-", dir=ctx.workdir))
    workers = _start(ctx, spec, env, {"BENCH_COUNT_DIR": str(count_dir)})
    samples: list[list[float]] = []
    last = 0.0

    def sample(force: bool = False) -> None:
        nonlocal last
        now = time.monotonic()
        if force or now - last >= 1.0:
            last = now
            samples.append([float(_count_total(count_dir)), _tree_rss_mib(workers)])

    try:
        _wait_ready(vh, spec, workers)
        sample(force=True)
        sent = 0
        chunk = min(20_000, max(1000, n // 10))
        deadline = time.monotonic() + 300 + n / 300
        while sent < n:  # keep the queue topped up while the worker drains it
            problem = _died(workers)
            if problem:
                raise BenchError(problem)
            if time.monotonic() > deadline:
                raise BenchError(f"only {sent} of {n} tasks fed in time")
            sample()
            if vh.depth(QUEUE)[0] < 2 * chunk:
                k = min(chunk, n - sent)
                vh.publish_copies(QUEUE, template, k)
                sent += k
            else:
                time.sleep(0.2)

        def finished() -> bool:
            problem = _died(workers)
            if problem:
                raise BenchError(problem)
            sample()
            return _count_total(count_dir) >= n

        wait_until(finished, 120 + n / 300, 0.2, f"{n} executions")
        time.sleep(1)
        sample(force=True)
        done = _count_total(count_dir)
        if done != n:
            raise Invalid(f"{done} executions for {n} messages")
        return _tree_pss_mib(workers), samples
    finally:
        _stop(ctx, workers, spec.stop_grace)


# -- pending countdowns ------------------------------------------------------------------------


def countdowns(ctx: Ctx, frameworks: list[Framework]) -> None:
    fws = [fw for fw in frameworks if fw.has_countdown]
    for r in range(ctx.sizes.repeats):  # round-robin, like consume; a fresh vhost per run
        for fw in fws:
            spec = fw.countdown_spec()
            label = f"{spec.label}; {ctx.sizes.countdowns:,} tasks due in 600 s"
            res = _try(ctx, "cd_rss", fw, label, _countdown_once, ctx, fw, spec)
            if res is None:
                continue
            rss, unacked, rate = res
            ctx.results.add("cd_rss", fw.name, fw.group, label, rss, spec.note)
            ctx.results.add("cd_unacked", fw.name, fw.group, label, unacked, spec.note)
            ctx.results.add("cd_rate", fw.name, fw.group, label, rate, spec.note)
            ctx.log(
                f"    {fw.name} [{label}] #{r + 1}: RSS {rss:.1f} MiB, {unacked:,.0f} unacked, "
                f"published at {rate:,.0f}/s"
            )


def _countdown_once(ctx: Ctx, fw: Framework, spec: WorkerSpec) -> tuple[float, float, float]:
    """A fresh vhost: start the worker, publish N countdown tasks through the framework's API,
    wait for the management stats to settle, read RSS and unacked."""
    n = ctx.sizes.countdowns
    with ctx.vhost(f"countdown-{fw.name}") as vh:
        env = fw.setup(ctx.procs, vh, ctx.workdir)
        count_dir = Path(tempfile.mkdtemp(prefix="count-", dir=ctx.workdir))
        workers = _start(ctx, spec, env, {"BENCH_COUNT_DIR": str(count_dir)})
        try:
            _wait_ready(vh, spec, workers)
            argv = fw.client_argv("countdown", "--n", str(n), "--countdown", "600")
            res = ctx.procs.run(f"{fw.name}-countdown", argv, env, 120 + n / 100)
            # The management stats lag ~5 s: wait until every message is counted and the
            # figures stopped moving for two samples 3 s apart (bounded).
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
            rss = _tree_pss_mib(workers)
            executed = _count_total(count_dir)
            if executed:
                raise Invalid(f"{executed} countdown tasks ran early")
            return rss, float(unacked), float(res["rate"])
        finally:
            _stop(ctx, workers, spec.stop_grace)
