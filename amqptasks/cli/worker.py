"""``amqptasks worker``: consume queues and run tasks.

The options that shape the process around the worker live here: the pid file
(:mod:`.pidfile`), the log file (:func:`.logs.log_to_file`), ``--purge``, the metrics server
(:mod:`amqptasks.worker.metrics`, imported only with ``--metrics-port``) and the start-up
checks, which exit 2 like any other usage or config error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

from ..config import Settings
from ..errors import AmqpTasksError
from ..loader import load_tasks
from ..scheduler import run_with_beat
from ..transport.aio import declare_topology, purge_queues
from ..worker import Worker, WorkerOptions
from ..worker.observer import Observer
from . import BadUsage, config_option, friendly_errors, main, settings_for
from .logs import echo, log_options, log_to_file
from .pidfile import PidFile, PidFileError

if TYPE_CHECKING:
    from ..worker.metrics import MetricsServer

#: Credentials for a metrics endpoint beyond loopback, when not given on the command line
#: (where ``ps`` would show them): ``USER:PASS``.
METRICS_AUTH_ENV = "AMQPTASKS_METRICS_AUTH"


def _queues(option: str | None, settings: Settings) -> tuple[str, ...]:
    """The queues to consume: ``-Q``'s (each must be a work queue of the config), else all."""
    declared = tuple(q.name for q in settings.topology.work_queues())
    if not option:
        return declared
    names = tuple(q.strip() for q in option.split(",") if q.strip())
    missing = [q for q in names if q not in declared]
    if missing:
        which = ", ".join(repr(q) for q in missing)
        raise BadUsage(
            f"-Q {option}: queue{'s' if len(missing) > 1 else ''} {which} "
            f"{'are' if len(missing) > 1 else 'is'} not declared in {settings.source} "
            f"(declared: {', '.join(declared) or 'none'})"
        )
    return names


def _autoscale(
    option: str | None, concurrency: int | None, multiplier: int
) -> tuple[int, int] | None:
    """``--autoscale MAX,MIN`` -> (MAX, MIN), or a usage error saying what is wrong."""
    if option is None:
        return None
    parts = [p.strip() for p in option.split(",")]
    if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise BadUsage(
            f"--autoscale {option}: expected MAX,MIN (whole numbers of at least 1, e.g. 10,2)"
        )
    maximum, minimum = int(parts[0]), int(parts[1])
    if minimum > maximum:
        raise BadUsage(f"--autoscale {option}: MIN ({minimum}) is above MAX ({maximum})")
    if concurrency is not None:
        raise BadUsage("give -c/--concurrency or --autoscale, not both (the pool starts at MIN)")
    if multiplier < 2:
        raise BadUsage(
            f"--autoscale needs a prefetch multiplier of at least 2 (it is {multiplier}): "
            "with 1 no delivery ever waits for a slot, so there is no backlog to grow on"
        )
    return maximum, minimum


def _limits(settings: Settings, time_limit: float | None, soft: float | None) -> None:
    """The worker-wide limits, checked like the tasks' own ones (exit 2, not at 3 a.m.)."""
    if time_limit is not None and soft is not None and soft >= time_limit:
        raise BadUsage(
            f"--soft-time-limit {soft:g} must be below --time-limit {time_limit:g} (the soft "
            "limit is the task's chance to clean up before the hard one)"
        )
    timeout = settings.broker.consumer_timeout
    if time_limit is not None and time_limit >= timeout:
        raise BadUsage(
            f"--time-limit {time_limit:g}s is not below the broker's consumer_timeout "
            f"({timeout:g}s, broker.consumer_timeout in {settings.source}): the broker would "
            "close the channel and redeliver before the limit fires"
        )


def _purge(settings: Settings, names: tuple[str, ...], declare: bool, yes: bool) -> None:
    """``--purge``: say what would go, ask (unless ``--yes``), purge, say what went."""
    url = settings.broker.urls
    if declare:  # a first start: the queues may not exist yet
        asyncio.run(declare_topology(url, settings.topology.subset(names)))
    counts = asyncio.run(purge_queues(url, list(names), count_only=True))
    listed = ", ".join(f"{q} ({n})" for q, n in counts.items())
    if not any(counts.values()):
        echo(f"purged nothing: {listed} had no ready messages")
        return
    if not yes:
        try:
            click.confirm(
                f"delete the {sum(counts.values())} ready message(s) of {listed}?",
                abort=True,
                err=True,
            )
        except click.Abort:
            raise AmqpTasksError(
                "--purge not confirmed: nothing purged, the worker did not start "
                "(--yes purges without asking)"
            ) from None
    removed = asyncio.run(purge_queues(url, list(names)))
    echo(
        f"purged {sum(removed.values())} message(s) from "
        + ", ".join(f"{q} ({n})" for q, n in removed.items())
    )


def _metrics(
    port: int | None, address: str, auth: str | None
) -> tuple[Observer, Any] | tuple[None, None]:
    """The metrics observer and a factory of its server, or (None, None) without a port."""
    if port is None:
        return None, None
    from ..worker.metrics import MetricsObserver, MetricsServer, is_loopback, parse_auth

    where = "--metrics-auth"
    if auth is None and os.environ.get(METRICS_AUTH_ENV):
        auth, where = os.environ[METRICS_AUTH_ENV], f"${METRICS_AUTH_ENV}"
    try:
        credentials = parse_auth(auth, where) if auth is not None else None
    except ValueError as exc:
        raise BadUsage(str(exc)) from None
    if credentials is None and not is_loopback(address):
        raise BadUsage(
            f"--metrics-address {address} is not loopback: give credentials with "
            f"--metrics-auth USER:PASS or ${METRICS_AUTH_ENV}, or listen on 127.0.0.1"
        )
    observer = MetricsObserver()

    def server(worker: Worker) -> MetricsServer:
        return MetricsServer(worker, observer, port=port, address=address, auth=credentials)

    return observer, server


@contextmanager
def _served(factory: Any, worker: Worker) -> Iterator[None]:
    if factory is None:
        yield
        return
    server = factory(worker)
    try:
        server.start()
    except OSError as exc:
        raise AmqpTasksError(
            f"--metrics-port: cannot listen on {server.address}:{server.port}: {exc.strerror}"
        ) from None
    echo(f"metrics: {server.describe()}")
    try:
        yield
    finally:
        server.close()


@main.command(
    epilog="There is no --detach: run the worker under systemd (deploy/amqptasks-worker@.service, "
    "see deploy/README.md) or another supervisor, which restarts it and keeps its logs."
)
@click.option(
    "-Q",
    "--queues",
    default=None,
    help="Comma-separated queues to consume (default: every queue in the config).",
)
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(min=1),
    default=None,
    help="Tasks run at once (default: worker.concurrency).",
)
@click.option(
    "--pool",
    type=click.Choice(["threads", "asyncio", "processes"]),
    default=None,
    help="threads: sync tasks in a thread pool; asyncio: sync tasks inline on the "
    "event loop (never block!); processes: sync tasks in child processes (CPU-bound work, "
    "hard time limits). async def tasks always run on the loop.",
)
@click.option(
    "--max-tasks-per-child",
    type=click.IntRange(min=1),
    default=None,
    help="--pool processes: replace a child after this many tasks.",
)
@click.option(
    "--max-memory-per-child",
    type=click.IntRange(min=1),
    default=None,
    help="--pool processes: replace a child once its peak RSS passes this many KiB.",
)
@click.option(
    "--prefetch-multiplier",
    type=click.IntRange(min=1),
    default=None,
    help="prefetch = concurrency x this (default: worker.prefetch_multiplier).",
)
@click.option("-n", "--hostname", default=None, help="Worker name (default: amqptasks@HOST).")
@click.option(
    "--declare/--no-declare",
    default=True,
    show_default=True,
    help="Declare the consumed queues (and their DLQs, exchanges, bindings) at start.",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Give up (exit 1) when no broker answered within this many seconds of start "
    "(default: wait for it, with the reconnection backoff).",
)
@click.option(
    # One on/off flag with a None default (neither given: the config decides). Two options
    # sharing a destination made click 8.1 report False when neither was given, which
    # silently overrode events.enabled: true.
    "-E",
    "--events/--no-events",
    "events",
    default=None,
    help="Publish task and worker events, or none (default: events.enabled in the config).",
)
@click.option(
    "--autoscale",
    default=None,
    metavar="MAX,MIN",
    help="Grow the pool with the backlog (deliveries waiting for a slot) up to MAX tasks at "
    "once and shrink it when idle down to MIN; it starts at MIN and prefetch follows "
    "(needs --prefetch-multiplier 2 or more). Instead of -c.",
)
@click.option(
    "--autoscale-idle",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds with unused slots and no backlog before an autoscaling pool shrinks "
    "(--autoscale, or a later 'control autoscale'; default 30).",
)
@click.option(
    "--time-limit",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Hard time limit (s) of every task that sets none (decorator, config 'tasks'); "
    "must be below broker.consumer_timeout.",
)
@click.option(
    "--soft-time-limit",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Soft time limit (s) of every task that sets none: SoftTimeLimitExceeded in the task.",
)
@click.option(
    "--purge",
    is_flag=True,
    help="Before consuming, delete the ready messages of the consumed queues (asks first "
    "unless --yes; prints how many were removed).",
)
@click.option("--yes", is_flag=True, help="--purge without asking.")
@click.option(
    "--heartbeat-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds between worker-heartbeat events (default: events.heartbeat_interval).",
)
@click.option(
    "--pidfile",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the pid here; refuses to start while the pid in it is alive (a stale file "
    "is replaced), removed at exit.",
)
@click.option(
    "-f",
    "--logfile",
    type=click.Path(dir_okay=False),
    default=None,
    help="Log (banner included) to this file instead of stderr, appending, in --log-format; "
    "error lines also go to stderr. Not rotated here: logrotate copytruncate, or systemd's "
    "journal without -f.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus metrics on this port (/metrics; 0 picks a free one).",
)
@click.option(
    "--metrics-address",
    default="127.0.0.1",
    show_default=True,
    help="Address the metrics listen on; beyond loopback --metrics-auth is required.",
)
@click.option(
    "--metrics-auth",
    default=None,
    metavar="USER:PASS",
    help=f"HTTP basic auth for the metrics (or ${METRICS_AUTH_ENV}, which ps does not show).",
)
@click.option(
    "-B",
    "--beat",
    "embed_beat",
    is_flag=True,
    help="Also run the periodic scheduler in this process (development; it joins the same "
    "lock as 'amqptasks beat', so only one scheduler fires).",
)
@config_option
@log_options
@friendly_errors
def worker(
    queues: str | None,
    concurrency: int | None,
    pool: str | None,
    max_tasks_per_child: int | None,
    max_memory_per_child: int | None,
    prefetch_multiplier: int | None,
    hostname: str | None,
    declare: bool,
    connect_timeout: float | None,
    events: bool | None,
    autoscale: str | None,
    autoscale_idle: float | None,
    time_limit: float | None,
    soft_time_limit: float | None,
    purge: bool,
    yes: bool,
    heartbeat_interval: float | None,
    pidfile: str | None,
    logfile: str | None,
    metrics_port: int | None,
    metrics_address: str,
    metrics_auth: str | None,
    embed_beat: bool,
    config_path: str | None,
) -> None:
    """Consume queues and run tasks (manual acks, ack after the outcome is safe)."""
    if logfile is not None:
        try:
            log_to_file(logfile)
        except OSError as exc:
            raise BadUsage(f"-f/--logfile {logfile}: cannot open it: {exc.strerror}") from None
    settings = settings_for(config_path)
    chosen_pool = pool or settings.worker.pool
    if (max_tasks_per_child or max_memory_per_child) and chosen_pool != "processes":
        raise click.UsageError("--max-tasks-per-child/--max-memory-per-child need --pool processes")
    names = _queues(queues, settings)
    if not names:
        raise click.UsageError("no queues to consume: pass -Q or declare queues in the config")
    w = settings.worker
    multiplier = prefetch_multiplier or w.prefetch_multiplier
    scale = _autoscale(autoscale, concurrency, multiplier)
    _limits(settings, time_limit, soft_time_limit)
    observer, metrics_server = _metrics(metrics_port, metrics_address, metrics_auth)
    options = WorkerOptions(
        queues=names,
        concurrency=scale[1] if scale else concurrency or w.concurrency,
        prefetch_multiplier=multiplier,
        pool=chosen_pool,
        hostname=hostname or "",
        declare=declare,
        max_tasks_per_child=max_tasks_per_child or 0,
        max_memory_per_child=max_memory_per_child or 0,
        connect_timeout=connect_timeout,
        events=events,
        heartbeat_interval=heartbeat_interval,
        time_limit=time_limit,
        soft_time_limit=soft_time_limit,
        autoscale=scale,
        autoscale_idle=autoscale_idle,
    )
    tasks = load_tasks(settings.imports, source=settings.source)
    wk = Worker(settings, tasks, options, observers=[observer] if observer else [])
    problems = wk.check_limits()
    if problems:
        raise BadUsage("refusing to start:\n  " + "\n  ".join(problems))
    pid = PidFile(pidfile) if pidfile else None
    if pid is not None:
        try:
            pid.acquire()
        except PidFileError as exc:
            raise BadUsage(str(exc)) from None
    try:
        if purge:
            _purge(settings, names, declare, yes)
        with _served(metrics_server, wk):
            echo(wk.banner())
            wk.on_ready = lambda: echo(f"ready: consuming {', '.join(names)}")
            code = asyncio.run(
                run_with_beat(wk.run(), settings, hostname=wk.hostname) if embed_beat else wk.run()
            )
    finally:
        if pid is not None:
            pid.release()
    if wk.cold:
        # Cold shutdown: do not wait for task threads or children to finish; their
        # deliveries were not acked and are already back in their queues.
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
