"""``amqptasks beat``: the periodic scheduler (any number may run; one fires)."""

from __future__ import annotations

import asyncio
import logging
import sys
from datetime import datetime, timezone

import click

from ..config import Settings
from ..loader import load_tasks
from ..schedule import Schedule, format_utc, zone
from ..scheduler import LOCK_QUEUE, Scheduler, collect_schedules
from . import config_option, friendly_errors, main, settings_for
from .logs import echo, log_options


def _parse_from(value: str | None) -> datetime:
    if value is None:
        return datetime.now(timezone.utc)
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"not an ISO 8601 time: {value!r}", param_hint="--from") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _listing(settings: Settings, schedules: list[Schedule], start: datetime, count: int) -> str:
    lines = [f"# schedules from {settings.source}; fire times after {format_utc(start)}"]
    for s in schedules:
        route = settings.router().route(
            s.task, exchange=s.exchange, routing_key=s.routing_key, queue=s.queue
        )
        tz = zone(s.timezone)
        lines.append(
            f"{s.name}: {s.task} -> {route.exchange or '(default)'} [{route.routing_key}]"
            f"  {s.timing.describe()}  catch_up={s.catch_up}"
            + (f"  jitter={s.jitter.total_seconds():g}s" if s.jitter else "")
            + (f"  expires={s.expires.total_seconds():g}s" if s.expires else "")
        )
        fire = start
        for _ in range(count):
            fire = s.next_after(fire)
            local = fire.astimezone(tz)
            delay = (s.publish_at(fire) - fire).total_seconds()
            lines.append(
                f"    {local:%Y-%m-%d %H:%M:%S} {local.tzname()} ({local:%z})"
                f"  =  {format_utc(fire)}  id {s.fire_id(fire)}"
                + (f"  (published +{delay:.1f}s)" if s.jitter else "")
            )
    return "\n".join(lines)


@main.command()
@click.option(
    "--list",
    "list_only",
    is_flag=True,
    help="Print each schedule with its next fire times (its zone and UTC) and exit; "
    "no broker needed.",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="With --list: fire times per schedule.",
)
@click.option(
    "--from",
    "from_time",
    default=None,
    help="With --list: list fire times after this ISO 8601 time instead of now.",
)
@click.option("-n", "--hostname", default=None, help="Scheduler name (default: beat@HOST).")
@click.option(
    "--heartbeat",
    type=click.IntRange(1, 60),
    default=5,
    show_default=True,
    help="AMQP heartbeat (s) of the lock connection: a hung or cut-off scheduler loses the "
    "lock after about 2-2.5 times this (a killed one at once).",
)
@click.option(
    "--declare/--no-declare",
    default=True,
    show_default=True,
    help="Declare the config's topology at start (exchanges, queues, bindings).",
)
@config_option
@log_options
@friendly_errors
def beat(
    list_only: bool,
    count: int,
    from_time: str | None,
    hostname: str | None,
    heartbeat: int,
    declare: bool,
    config_path: str | None,
) -> None:
    """Run the periodic scheduler: one active per broker vhost, the others on standby."""
    settings = settings_for(config_path)
    start = _parse_from(from_time)
    tasks = load_tasks(settings.imports, source=settings.source)  # may define schedules too
    schedules = collect_schedules(settings)
    if list_only:
        click.echo(_listing(settings, schedules, start, count))
        return
    if not schedules:
        raise click.UsageError(
            f"no schedules: add 'schedules:' to {settings.source} (see docs/scheduler.md)"
        )
    log = logging.getLogger("amqptasks.beat")
    for s in schedules:
        if s.task not in tasks:
            log.warning(
                "schedule %s: task %r is not defined in any module under 'imports' "
                "(the workers that consume its queue must know it)",
                s.name,
                s.task,
            )
    scheduler = Scheduler(
        settings, schedules, hostname=hostname or "", heartbeat=heartbeat, declare=declare
    )
    echo(
        f"amqptasks beat {scheduler.hostname}\n"
        f"  broker:    {settings.broker.display}\n"
        f"  config:    {settings.source}\n"
        f"  lock:      {LOCK_QUEUE} (single active consumer; heartbeat {heartbeat}s)\n"
        "  schedules:\n" + "\n".join(f"    {s.describe()}" for s in schedules)
    )
    scheduler.on_role = lambda role: echo(f"beat: {role}")
    sys.exit(asyncio.run(scheduler.run()))
