"""``amqptasks events``: a live tail of the fleet's task and worker events."""

from __future__ import annotations

import signal
import sys
import time
from typing import Any

import click

from ..errors import DecodeError
from ..events import STATES, EventFilter, decode_batch
from ..protocol import dumps
from ..transport.event_listener import EventListener
from . import config_option, friendly_errors, main, settings_for
from .logs import printable


def _interrupt(_sig: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def _short(value: Any, limit: int = 80) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe(e: dict[str, Any]) -> str:
    """One readable line: time, host, type, task[id], the key facts of its type."""
    kind = str(e.get("type", "?"))
    head = f"{e.get('time', '?')} {e.get('hostname', '?')} {kind}"
    if kind.startswith("worker-"):
        queues = ",".join(e.get("queues") or [])
        load = " ".join(f"{x:g}" for x in e.get("loadavg") or [])
        return printable(
            f"{head} queues={queues} pool={e.get('pool')} concurrency={e.get('concurrency')} "
            f"active={e.get('active')} processed={e.get('processed')} load={load}"
        )
    who = f"{e.get('task') or '?'}[{e.get('id') or '?'}]"
    facts: list[str] = []
    where = e.get("queue")
    if where:
        facts.append(f"queue={where}")
    if kind == "task-sent":
        facts.append(f"-> {e.get('exchange') or '(default)'} [{e.get('routing_key')}]")
    if kind in ("task-sent", "task-received"):
        facts.append(f"args={_short(e.get('args'))}")
        if e.get("kwargs") not in (None, "{}"):
            facts.append(f"kwargs={_short(e.get('kwargs'))}")
        for key in ("eta", "expires"):
            if e.get(key):
                facts.append(f"{key}={e[key]}")
    if e.get("retries"):
        facts.append(f"retries={e['retries']}")
    if "runtime" in e:
        facts.append(f"runtime={e['runtime']:.4f}s")
    if kind == "task-succeeded":
        facts.append(f"result={_short(e.get('result'))}")
    exc = e.get("exception")
    if isinstance(exc, dict):
        facts.append(f"{exc.get('type')}: {_short(exc.get('message'))}")
    if kind == "task-retried":
        facts.append(f"retry in {e.get('countdown')}s")
    if e.get("reason"):
        facts.append(f"reason={e['reason']}")
    if e.get("detail"):
        facts.append(_short(e["detail"], 120))
    return printable(f"{head} {who} {' '.join(facts)}".rstrip())


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One event object (JSON) per line.")
@click.option(
    "--dump",
    is_flag=True,
    help="The same as --json (JSON lines; like every listener it exits 0 after --count or "
    "--duration), the name Celery's 'events --dump' users look for.",
)
@click.option("--count", type=click.IntRange(min=1), default=None, help="Exit after N events.")
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Exit after S seconds.",
)
@click.option("--task", "tasks", multiple=True, help="Task name glob(s), e.g. 'examples.*'.")
@click.option(
    "--state",
    "states",
    multiple=True,
    help=f"Comma-separated states: {', '.join(STATES)}.",
)
@click.option("--worker", "workers", multiple=True, help="Worker name glob(s), e.g. 'w1@*'.")
@click.option(
    "--task-queue",
    "task_queues",
    multiple=True,
    help="Only events of tasks taken from these work queues.",
)
@click.option(
    "--queue",
    "durable_queue",
    default=None,
    help="Listen on this DURABLE queue (declared, bound to every event): events published "
    "while no listener runs wait there for the next one.",
)
@config_option
@friendly_errors
def events(
    as_json: bool,
    dump: bool,
    count: int | None,
    duration: float | None,
    tasks: tuple[str, ...],
    states: tuple[str, ...],
    workers: tuple[str, ...],
    task_queues: tuple[str, ...],
    durable_queue: str | None,
    config_path: str | None,
) -> None:
    """Print task and worker events as they happen (Ctrl-C stops, exit 0)."""
    settings = settings_for(config_path)
    try:
        wanted = EventFilter.parse(tasks, states, workers, task_queues)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--state") from None
    keys = wanted.routing_keys()
    if not keys:
        raise click.UsageError("--task/--task-queue match task events only; --state names none")
    listener = EventListener(
        settings.broker.urls,
        queue=durable_queue,
        routing_keys=keys,
        queue_type=settings.topology.default_queue_type,
    )
    signal.signal(signal.SIGTERM, _interrupt)  # like Ctrl-C: close cleanly, exit 0
    json_lines = as_json or dump
    printed = 0
    deadline = None if duration is None else time.monotonic() + duration
    try:
        name = listener.open()
        click.echo(f"listening on {name} (bindings: {', '.join(listener.routing_keys)})", err=True)
        while count is None or printed < count:
            wait = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if wait <= 0:
                break
            for message in listener.poll(wait):
                try:
                    batch = decode_batch(message.body)
                except DecodeError as exc:
                    click.echo(f"warning: undecodable events message dropped: {exc}", err=True)
                    listener.done(message)
                    continue
                cut = False
                for event in batch:
                    if not wanted.matches(event):
                        continue
                    if count is not None and printed >= count:
                        cut = True
                        break
                    click.echo(dumps(event).decode() if json_lines else describe(event))
                    printed += 1
                sys.stdout.flush()
                if cut:
                    listener.give_back(message)  # a durable queue keeps what was not printed
                else:
                    listener.done(message)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # e.g. piped into head
        pass
    finally:
        listener.close()
