"""``amqptasks result ID...``: read task results from the result store, from any shell.

Celery users reach for ``celery result <id>``; the store (``results.backend``: SQLite or
Redis) is what makes a result readable by a process that did not publish the task, so this
command needs one: with ``rpc://`` only the publishing process ever hears a result, and it
says so (exit 2) instead of waiting for nothing.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from ..app import App
from ..errors import ResultsUnavailable
from ..protocol import dumps
from ..results.meta import PENDING, SUCCESS, ResultMeta
from ..results.store import ResultStore
from . import config_option, friendly_errors, main, settings_for
from .logs import echo, log_options, printable

__all__ = ["result"]


def _line(task_id: str, meta: ResultMeta | None) -> str:
    """One human line: id, state, then the value or the error (control characters shown
    escaped: an error message is text a task chose)."""
    return printable(_text(task_id, meta))


def _text(task_id: str, meta: ResultMeta | None) -> str:
    if meta is None:
        return f"{task_id} {PENDING} (no record yet: not run, still running, expired or unknown)"
    if meta.status == SUCCESS:
        return f"{task_id} {SUCCESS} {meta.result!r}"
    if meta.ready:
        kind = meta.error_type or "Error"
        what = f"{kind}: {meta.error_message}" if meta.error_message else kind
        reason = f" [{meta.reason}]" if meta.reason else ""
        return f"{task_id} {meta.status} {what}{reason}"
    return f"{task_id} {meta.status}"


def _json(task_id: str, meta: ResultMeta | None) -> str:
    """The record as schema/result-v1.json has it (``PENDING`` when there is none)."""
    obj: dict[str, Any] = meta.to_dict() if meta is not None else {"id": task_id, "status": PENDING}
    return dumps(obj).decode()


def _read(store: ResultStore, ids: tuple[str, ...]) -> list[tuple[str, ResultMeta | None]]:
    """Each id's record, in the order given (an id given twice is printed twice)."""
    return [(task_id, store.get(task_id)) for task_id in ids]


@main.command()
@click.argument("task_ids", metavar="ID...", nargs=-1, required=True)
@click.option(
    "--wait",
    "wait_seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Wait up to SECONDS for every ID to finish; exit 1 unless each ended in SUCCESS.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON record per line (schema/result-v1.json)."
)
@config_option
@log_options
@friendly_errors
def result(
    task_ids: tuple[str, ...], wait_seconds: float | None, as_json: bool, config_path: str | None
) -> None:
    """Print the state and result of each task ID, from the result store.

    Without --wait it prints what the store holds now (PENDING when it holds nothing) and
    exits 0. With --wait it waits for each to finish and exits 1 when one failed, was
    revoked or did not finish in time.
    """
    settings = settings_for(config_path)
    app = App(settings)
    try:
        try:
            store = app.backend.require_store("reading a result from another process")
        except ResultsUnavailable as exc:
            # A configuration problem, not a failed task: a usage error (exit 2) naming the
            # file; the advice is the one every by-id handle gives (results/handles.py).
            echo(f"error: {settings.source}: {exc}", level=logging.ERROR)
            sys.exit(2)
        records = _read(store, task_ids)
        if wait_seconds is not None:
            waiting = list({i: None for i, m in records if m is None or not m.ready})
            if waiting:
                store.wait(waiting, wait_seconds)
                records = _read(store, task_ids)
        for task_id, meta in records:
            click.echo(_json(task_id, meta) if as_json else _line(task_id, meta))
        if wait_seconds is None:
            return
        failed = False
        for task_id, meta in records:
            if meta is None or not meta.ready:
                echo(
                    f"error: {task_id}: not finished within {wait_seconds:g}s", level=logging.ERROR
                )
                failed = True
            elif meta.status != SUCCESS:
                echo(f"error: {task_id}: ended {meta.status}", level=logging.ERROR)
                failed = True
        if failed:
            sys.exit(1)
    finally:
        app.close()
