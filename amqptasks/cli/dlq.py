"""``amqptasks dlq list|show|replay|purge``: see, replay and clear dead letters."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import click

from ..config import Settings
from ..deadletters import ReplayLedger, browse, browse_counted, purge, replay
from ..errors import AmqpTasksError
from ..topology import DLQ_SUFFIX, dlq_name
from . import config_option, friendly_errors, main, settings_for
from .logs import printable


def _dlq(settings: Settings, queue: str) -> str:
    name = queue if queue.endswith(DLQ_SUFFIX) else dlq_name(queue)
    work = name[: -len(DLQ_SUFFIX)]
    if settings.topology.queue(work) is None:
        declared = ", ".join(q.name for q in settings.topology.work_queues())
        raise click.BadParameter(
            f"{queue!r} is not a queue in {settings.source} (declared: {declared})",
            param_hint="QUEUE",
        )
    return name


@main.group()
def dlq() -> None:
    """Dead-letter queues: list, show, replay, purge."""


@dlq.command("list")
@click.argument("queue")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="List at most this many, oldest first (the last line says how many were left out).",
)
@config_option
@friendly_errors
def dlq_list(queue: str, limit: int, config_path: str | None) -> None:
    """A table of the dead letters of QUEUE (a work queue, or its .dlq)."""
    settings = settings_for(config_path)
    name = _dlq(settings, queue)
    letters, count = asyncio.run(browse_counted(settings.broker.urls, name, limit))
    if not letters:
        click.echo(f"{name}: empty")
        return
    rows: list[tuple[str, ...]] = [
        ("ID", "TASK", "REASON", "ATTEMPTS", "LAST FAILURE", "EXCEPTION", "ROUTE")
    ]
    rows += [
        tuple(
            printable(cell)  # from the message: no escape sequence reaches the terminal
            for cell in (
                d.id or "-",
                d.task or "-",
                d.reason,
                str(d.attempts),
                d.last_failed_at[:19] or "-",
                (d.exception or d.detail)[:60] or "-",
                f"{d.original_exchange or '(default)'}/{d.original_routing_key}",
            )
        )
        for d in letters
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if count > len(letters):
        click.echo(
            f"the oldest {len(letters)} of {count} dead letter(s) in {name} (--limit {limit})"
        )
    else:
        click.echo(f"{len(letters)} dead letter(s) in {name}")


@dlq.command("show")
@click.argument("queue")
@click.argument("message_id")
@config_option
@friendly_errors
def dlq_show(queue: str, message_id: str, config_path: str | None) -> None:
    """Every detail of one dead letter, traceback included."""
    settings = settings_for(config_path)
    name = _dlq(settings, queue)
    for d in asyncio.run(browse(settings.broker.urls, name, 1_000_000)):
        if d.id == message_id:
            for field in (
                "id",
                "task",
                "reason",
                "detail",
                "exception",
                "attempts",
                "first_failed_at",
                "last_failed_at",
                "original_exchange",
                "original_routing_key",
                "worker",
            ):
                click.echo(printable(f"{field}: {getattr(d, field)}"))
            if d.traceback:
                click.echo("traceback:\n" + printable(d.traceback, newlines=True))
            return
    raise AmqpTasksError(f"no dead letter with id {message_id!r} in {name}")


@dlq.command("replay")
@click.argument("queue")
@click.argument("ids", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Replay every dead letter (see --task).")
@click.option("--task", default=None, help="Only dead letters of this task.")
@click.option(
    "--force",
    is_flag=True,
    help="Also replay dead letters whose reason means they fail again unchanged "
    "(decode-error, content-type-refused, too-large, expired).",
)
@click.option(
    "--ledger",
    "ledger_path",
    type=click.Path(dir_okay=False),
    default=".amqptasks/dlq-replay.log",
    show_default=True,
    help="Where an interrupted replay is remembered, so re-running it does not publish it again.",
)
@config_option
@friendly_errors
def dlq_replay(
    queue: str,
    ids: tuple[str, ...],
    every: bool,
    task: str | None,
    force: bool,
    ledger_path: str,
    config_path: str | None,
) -> None:
    """Move dead letters back to their original exchange and routing key, attempts reset.

    Dead letters that would fail the same way again (reasons decode-error,
    content-type-refused, too-large, expired) are left in place and counted,
    unless --force; a skipped id named on the command line makes the exit status 1.

    Each copy is confirmed by the broker before its dead letter is acked (never lost); a
    replay interrupted in between is finished by running it again (at most the one message
    in flight at a kill -9 can be published twice; both copies carry the same
    x-amqptasks-replay marker and a worker that sees both runs it once).
    """
    if not ids and not every:
        raise click.UsageError("give message ids or --all")
    if ids and every:
        raise click.UsageError("give message ids or --all, not both")
    settings = settings_for(config_path)
    name = _dlq(settings, queue)
    ledger = ReplayLedger(Path(ledger_path))
    bar: Any = None

    def progress(total: int, done: int) -> None:
        nonlocal bar
        if bar is None:
            bar = click.progressbar(length=total, label=f"replaying {name}", file=sys.stderr)
            bar.__enter__()
        if done:
            bar.update(1)

    try:
        moved, problems, skipped = asyncio.run(
            replay(settings, name, set(ids), every, task, ledger, force, progress=progress)
        )
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
        ledger.close()
    click.echo(f"replayed {moved} message(s) from {name}")
    if skipped:
        per_reason = ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items()))
        click.echo(
            f"skipped {sum(skipped.values())} message(s) that would fail the same way again "
            f"({per_reason}); they stay in {name}; --force replays them too",
            err=True,
        )
    for p in problems:
        click.echo(f"not replayed: {p}", err=True)
    if problems:
        sys.exit(1)


@dlq.command("purge")
@click.argument("queue")
@click.option("--yes", is_flag=True, help="Do not ask.")
@config_option
@friendly_errors
def dlq_purge(queue: str, yes: bool, config_path: str | None) -> None:
    """Delete every dead letter of QUEUE (asks first)."""
    settings = settings_for(config_path)
    name = _dlq(settings, queue)
    if not yes:
        click.confirm(f"delete every message in {name}?", abort=True)

    click.echo(f"purged {asyncio.run(purge(settings.broker.urls, name))} message(s) from {name}")
