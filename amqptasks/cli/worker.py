"""``amqptasks worker``: consume queues and run tasks."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import click

from ..config import Settings
from ..loader import load_tasks
from ..scheduler import run_with_beat
from ..worker import Worker, WorkerOptions
from . import BadUsage, config_option, friendly_errors, main, settings_for
from .logs import echo, log_options


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


@main.command()
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
    "-E",
    "--events",
    "events",
    flag_value=True,
    default=None,
    help="Publish task and worker events (default: events.enabled in the config).",
)
@click.option("--no-events", "events", flag_value=False, help="Publish no events.")
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
    embed_beat: bool,
    config_path: str | None,
) -> None:
    """Consume queues and run tasks (manual acks, ack after the outcome is safe)."""
    settings = settings_for(config_path)
    chosen_pool = pool or settings.worker.pool
    if (max_tasks_per_child or max_memory_per_child) and chosen_pool != "processes":
        raise click.UsageError("--max-tasks-per-child/--max-memory-per-child need --pool processes")
    names = _queues(queues, settings)
    if not names:
        raise click.UsageError("no queues to consume: pass -Q or declare queues in the config")
    w = settings.worker
    options = WorkerOptions(
        queues=names,
        concurrency=concurrency or w.concurrency,
        prefetch_multiplier=prefetch_multiplier or w.prefetch_multiplier,
        pool=chosen_pool,
        hostname=hostname or "",
        declare=declare,
        max_tasks_per_child=max_tasks_per_child or 0,
        max_memory_per_child=max_memory_per_child or 0,
        connect_timeout=connect_timeout,
        events=events,
    )
    tasks = load_tasks(settings.imports, source=settings.source)
    wk = Worker(settings, tasks, options)
    echo(wk.banner())
    wk.on_ready = lambda: echo(f"ready: consuming {', '.join(names)}")
    code = asyncio.run(
        run_with_beat(wk.run(), settings, hostname=wk.hostname) if embed_beat else wk.run()
    )
    if wk.cold:
        # Cold shutdown: do not wait for task threads or children to finish; their
        # deliveries were not acked and are already back in their queues.
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
