"""``python -m bench [--quick] [--only NAMES] [--repeats N] [--out FILE] [--no-peers]``.

Runs amqptasks, Celery, Dramatiq and raw pika / aio-pika on the local broker in one run and
prints median [min–max] per figure with the ratios amqptasks ÷ peer. A full run rewrites
docs/benchmarks.md. Exit status: 0 when every measurement was taken, 1 when one failed (the
harness, not the speed: nothing here asserts a speed), 2 usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from . import cluster, document, measure, measure_results, plots, report, scale
from . import targets as tg
from .broker import RUN_PREFIX, delete_run_vhosts, overview, wait_until_broker_idle
from .frameworks import (
    ROOT,
    STATE,
    AmqpTasks,
    Celery,
    Dramatiq,
    Framework,
    RawAioPika,
    RawPika,
    ensure_venv,
)
from .procs import Procs

PARTS = (
    "consume",
    "publish",
    "latency",
    "rpc",
    "rss",
    "countdown",
    "results",
    "workflows",
    "scale",
    "cluster",
)
#: What a run measures without --only: the cluster group starts a 3-node cluster, so it runs
#: only when asked for (--only cluster).
DEFAULT_PARTS = frozenset(PARTS) - {"cluster"}
FRAMEWORKS = ("amqptasks", "celery", "dramatiq", "raw-pika", "raw-aio-pika")
DOC = ROOT / "docs" / "benchmarks.md"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="amqptasks vs Celery vs Dramatiq vs raw pika/aio-pika on the local broker.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small N, the main configurations only, no RSS-after-1M (checks the harness)",
    )
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(PARTS)}")
    p.add_argument(
        "--frameworks", default="", help=f"comma-separated subset of: {', '.join(FRAMEWORKS)}"
    )
    p.add_argument("--no-peers", action="store_true", help="skip Celery and Dramatiq")
    p.add_argument(
        "--refresh-peers",
        action="store_true",
        help="recreate the Celery/Dramatiq virtualenvs with the latest releases",
    )
    p.add_argument("--repeats", type=int, default=3, help="runs per figure (default 3)")
    p.add_argument("--out", type=Path, help="write the markdown report here")
    p.add_argument("--processes", default="1,2", help="worker process counts for consume")
    p.add_argument("--consume-n", type=int, help="messages per consume run")
    p.add_argument(
        "--consume-window",
        type=float,
        help="seconds the consume measurement window should last (N is calibrated up to it)",
    )
    p.add_argument("--publish-n", type=int, help="messages per publish run")
    p.add_argument("--latency-n", type=int, help="latency samples per run")
    p.add_argument("--rpc-n", type=int, help="delay().get() round trips per run")
    p.add_argument("--rss-tasks", type=int, help="tasks before 'RSS after N tasks' (0 = skip)")
    p.add_argument("--rss-repeats", type=int, default=1, help="runs of RSS after N tasks")
    p.add_argument("--countdowns", type=int, help="pending countdown tasks (10k-100k)")
    p.add_argument(
        "--workflow-n", type=int, help="members of a group / chord, results read back by id"
    )
    p.add_argument("--scale-n", type=int, help="messages per scale cell (published, drained)")
    p.add_argument(
        "--scale-processes", default="1,2,4", help="scale: amqptasks process counts (1,2,4)"
    )
    p.add_argument("--scale-queues", default="1,10,100", help="scale: queue counts (1,10,100)")
    p.add_argument("--scale-repeats", type=int, default=1, help="runs per scale cell (1)")
    p.add_argument("--keep-logs", action="store_true", help="keep worker/client logs")
    p.add_argument(
        "--results-dir",
        type=Path,
        default=STATE,
        help="where each run's results JSON is saved (default .amqptasks/bench)",
    )
    p.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="measure nothing: print (and with --out write) the report of a saved run "
        "(every run saves .amqptasks/bench/results-latest.json)",
    )
    p.add_argument(
        "--comment",
        type=Path,
        metavar="MD",
        help="with --render: a markdown file put under the run's facts in the report "
        "(what the figures mean, what is still in the way)",
    )
    args = p.parse_args(argv)
    if args.comment and not args.render:
        p.error("--comment goes with --render (comment on a run after seeing it)")
    only = {x.strip() for x in args.only.split(",") if x.strip()} or set(DEFAULT_PARTS)
    bad = only - set(PARTS)
    if bad:
        p.error(f"--only: unknown {', '.join(sorted(bad))} (choose from {', '.join(PARTS)})")
    args.parts = only
    fws = {x.strip() for x in args.frameworks.split(",") if x.strip()} or (
        {"amqptasks"} if only == {"cluster"} else set(FRAMEWORKS)  # the group measures us only
    )
    bad = fws - set(FRAMEWORKS)
    if bad:
        p.error(f"--frameworks: unknown {', '.join(sorted(bad))}")
    if args.no_peers:
        fws -= {"celery", "dramatiq"}
    args.fws = fws
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    args.process_counts = _counts(p, "--processes", args.processes)
    scale_processes = _counts(p, "--scale-processes", args.scale_processes)
    scale_queues = _counts(p, "--scale-queues", args.scale_queues)
    if args.scale_repeats < 1:
        p.error("--scale-repeats must be at least 1")
    q = args.quick
    args.sizes = measure.Sizes(
        consume=args.consume_n or (6_000 if q else 50_000),
        publish=args.publish_n or (2_000 if q else 20_000),
        latency=args.latency_n or (200 if q else 500),
        rpc=args.rpc_n or (200 if q else 500),
        rss_tasks=args.rss_tasks if args.rss_tasks is not None else (0 if q else 1_000_000),
        countdowns=args.countdowns or (10_000 if q else 100_000),
        repeats=args.repeats,
        rss_repeats=args.rss_repeats,
        window=args.consume_window or (1.0 if q else 5.0),
        consume_max=100_000 if q else 400_000,
        workflow=args.workflow_n or (300 if q else 10_000),
        workflow_small=100 if q else 1_000,
        scale=args.scale_n or (20_000 if q else 200_000),
        scale_processes=tuple(scale_processes),
        scale_queues=tuple(scale_queues),
        scale_repeats=args.scale_repeats,
    )
    return args


def _counts(p: argparse.ArgumentParser, option: str, text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        p.error(f"{option}: comma-separated integers, e.g. 1,2")
    if not counts or min(counts) < 1:
        p.error(f"{option}: at least one count, each at least 1")
    return counts


def log(msg: str) -> None:
    print(msg, flush=True)


def contenders(args: argparse.Namespace) -> list[Framework]:
    out: list[Framework] = []
    for name in FRAMEWORKS:
        if name not in args.fws:
            continue
        if name == "amqptasks":
            out.append(AmqpTasks(sys.executable))
        elif name == "celery":
            # redis: Celery's redis result backend (the results and workflows groups).
            python = ensure_venv(
                "celery", "celery[redis]", "celery, redis", log, args.refresh_peers
            )
            out.append(Celery(python))
        elif name == "dramatiq":
            python = ensure_venv(
                "dramatiq", "dramatiq[rabbitmq]", "dramatiq", log, args.refresh_peers
            )
            out.append(Dramatiq(python))
        elif name == "raw-pika":
            out.append(RawPika(sys.executable))
        else:
            out.append(RawAioPika(sys.executable))
    return out


def _on_sigterm(_sig: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def show(results: report.Results, info: dict[str, str]) -> None:
    print()
    print(report.text_table(report.SUMMARY_HEADER, report.summary_rows(results)))
    print()
    print(report.text_table(tg.HEADER, [t.row() for t in tg.targets(results)]))
    print()
    costs = report.cost_rows(results)
    if costs:
        print(report.text_table(report.COST_HEADER, costs))
        print()
    print(
        report.text_table(
            ["figure", "contender", "configuration", "median [min–max]"],
            report.detail_rows(results),
        )
    )
    print()
    for k, v in info.items():
        print(f"  {k}: {v}")


def render(args: argparse.Namespace) -> int:
    data = json.loads(args.render.read_text())
    results = report.Results.from_json(data)
    show(results, data["machine"])
    if args.out:
        comment = args.comment.read_text().strip() if args.comment else ""
        write_report(args.out, results, data["machine"], comment)
    return 0


def write_report(out: Path, results: report.Results, info: dict[str, str], comment: str) -> None:
    """The markdown report at ``out`` and its plots next to it."""
    drawn = plots.write(results, out)
    log(drawn if isinstance(drawn, str) else f"plots: {', '.join(p.file for p in drawn)}")
    out.write_text(document.markdown(results, info, results.params, comment, drawn))
    log(f"\nreport written to {out}")


def measure_all(args: argparse.Namespace, ctx: measure.Ctx, fws: list[Framework]) -> None:
    lat_parts = args.parts & {"latency", "rpc", "rss"}
    groups: list[tuple[bool, str, Any, tuple[Any, ...]]] = [
        (
            "consume" in args.parts,
            "consume (no-op tasks, pre-filled queue, depth marks)",
            measure.consume,
            (ctx, fws, args.quick, args.process_counts),
        ),
        ("publish" in args.parts, "publish", measure.publish, (ctx, fws)),
        (
            bool(lat_parts),
            "latency / delay().get() / idle RSS (light load, one worker process)",
            measure.latency,
            (ctx, fws, lat_parts, args.quick),
        ),
        (
            "countdown" in args.parts,
            f"pending countdowns ({args.sizes.countdowns:,})",
            measure.countdowns,
            (ctx, fws),
        ),
        (
            "results" in args.parts,
            "consume with results (no-op tasks, each result store, depth marks)",
            measure_results.consume_with_results,
            (ctx, fws, args.quick),
        ),
        (
            "workflows" in args.parts,
            f"workflows (group and chord of {args.sizes.workflow:,}, results read by id)",
            measure_results.workflows,
            (ctx, fws, args.quick),
        ),
        (
            "rss" in args.parts and args.sizes.rss_tasks > 0,
            f"RSS after {args.sizes.rss_tasks:,} tasks",
            measure.rss_after,
            (ctx, fws),
        ),
        (
            "scale" in args.parts,
            "scale: amqptasks, "
            f"{'/'.join(map(str, args.sizes.scale_processes))} processes × "
            f"{'/'.join(map(str, args.sizes.scale_queues))} queues, "
            f"{args.sizes.scale:,} messages a cell",
            scale.scale,
            (ctx, fws),
        ),
        (
            "cluster" in args.parts,
            "amqptasks: 3-node cluster with quorum queues vs the single node",
            cluster.compare,
            (ctx, args.quick),
        ),
    ]
    # The results and workflows groups before RSS-after-1M and scale, the longest: a run cut
    # short still has the figures the results issue waits on.
    for wanted, title, fn, fargs in groups:
        if wanted:
            waited = wait_until_broker_idle()
            if waited is not None and waited > 1.5:
                log(f"(waited {waited:.0f} s for the broker to go idle)")
            t0 = time.monotonic()
            log(f"== {title} ==")
            fn(*fargs)
            log(f"   ({time.monotonic() - t0:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.render:
        return render(args)
    # SIGINT too: a shell that starts us in the background sets it to "ignore".
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_sigterm)
    try:
        ov = overview()
    except OSError as exc:
        print(
            f"error: the broker's management API does not answer ({exc}); "
            "start it with `deploy/broker.sh start` (./dev bench does)",
            file=sys.stderr,
        )
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="amqptasks-bench-"))
    procs = Procs(workdir, ROOT)
    results = report.Results()
    ctx = measure.Ctx(procs, workdir, results, args.sizes, log, [])
    started = time.monotonic()
    interrupted = False
    fws: list[Framework] = []
    try:
        fws = contenders(args)
        log(
            f"benchmarks: {', '.join(f.name for f in fws)}; parts: "
            f"{', '.join(p for p in PARTS if p in args.parts)}; sizes: {args.sizes}"
        )
        log(f"logs: {workdir}")
        measure_all(args, ctx, fws)
    except KeyboardInterrupt:
        interrupted = True
        log("\ninterrupted: stopping everything that was started")
    except Exception as exc:  # a harness bug: report what was measured, then fail
        results.fail("consume1", "harness", "amqptasks", "harness", traceback.format_exc())
        log(f"error: {type(exc).__name__}: {exc}")
    finally:
        procs.stop_all()
        try:
            for name in delete_run_vhosts():
                log(f"deleted leftover vhost {name}")
        except Exception as exc:
            log(f"warning: could not delete this run's vhosts ({RUN_PREFIX}*): {exc}")
    elapsed = time.monotonic() - started
    info = report.machine(ov, {f.name: f.versions() for f in fws})
    results.params = {
        "quick": args.quick,
        "repeats": args.repeats,
        "consume N (before calibration)": args.sizes.consume,
        "consume window": f"{args.sizes.window} s",
        "publish N": args.sizes.publish,
        "latency samples": args.sizes.latency,
        "round trips": args.sizes.rpc,
        "RSS after tasks": args.sizes.rss_tasks,
        "countdowns": args.sizes.countdowns,
        "workflow N": args.sizes.workflow,
        "workflow n (vs Celery)": args.sizes.workflow_small,
        "scale N": args.sizes.scale,
        "duration": f"{elapsed / 60:.1f} min",
    }
    show(results, info)
    saved = args.results_dir / "results-latest.json"
    try:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({**results.to_json(), "machine": info}, indent=1)
        (args.results_dir / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(payload)
        saved.write_text(payload)
    except OSError as exc:
        log(f"warning: could not save the results: {exc}")
    errors = results.errors()
    partial = args.parts != DEFAULT_PARTS or args.fws != set(FRAMEWORKS) or args.quick
    out = args.out or (None if partial else DOC)
    if out is not None and interrupted:
        log(f"\ninterrupted: {out} not written (python -m bench --render {saved} --out FILE)")
    elif out is not None:
        write_report(out, results, info, "")
    elif not args.quick:
        log(f"\n{DOC.relative_to(ROOT)} not rewritten (partial run); use --out FILE")
    if errors:
        log("\nfailed measurements:\n  " + "\n  ".join(errors))
        log(f"logs kept in {workdir}")
    elif args.keep_logs:
        log(f"logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    log(f"done in {elapsed / 60:.1f} min")
    if interrupted:
        return 130
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
