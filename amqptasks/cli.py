"""The ``amqptasks`` command line (click). The only module that imports click.

Errors that are the user's to fix (config, routing, topology, broker unreachable) print one
``error: ...`` line and exit 2 (usage/config) or 1 (runtime); no traceback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from .app import App
from .config import Settings, load_config, redact_url
from .errors import AmqpTasksError, ConfigError, TopologyError
from .loader import load_tasks
from .protocol import loads
from .transport.aio import declare_topology
from .worker import Worker, WorkerOptions

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Config file (default: $AMQPTASKS_CONFIG, else ./config/amqptasks.yaml).",
)


def _settings(config_path: str | None) -> Settings:
    settings = load_config(config_path)
    # Task modules build their app with App.from_config(); point them at the same file.
    if config_path:
        os.environ["AMQPTASKS_CONFIG"] = os.path.abspath(config_path)
    return settings


def friendly_errors(fn: F) -> F:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except AmqpTasksError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


@click.group()
@click.version_option(package_name="amqptasks")
def main() -> None:
    """amqptasks: task routing on RabbitMQ, honest about delivery."""


# -- worker ------------------------------------------------------------------------------------
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
    "event loop (never block!). async def tasks always run on the loop.",
)
@click.option(
    "--prefetch-multiplier",
    type=click.IntRange(min=1),
    default=None,
    help="prefetch = concurrency x this (default: worker.prefetch_multiplier).",
)
@click.option(
    "-l",
    "--loglevel",
    default="INFO",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.option("-n", "--hostname", default=None, help="Worker name (default: amqptasks@HOST).")
@click.option(
    "--declare/--no-declare",
    default=True,
    show_default=True,
    help="Declare the consumed queues (and their DLQs, exchanges, bindings) at start.",
)
@config_option
@friendly_errors
def worker(
    queues: str | None,
    concurrency: int | None,
    pool: str | None,
    prefetch_multiplier: int | None,
    loglevel: str,
    hostname: str | None,
    declare: bool,
    config_path: str | None,
) -> None:
    """Consume queues and run tasks (manual acks, ack after the outcome is safe)."""
    settings = _settings(config_path)
    if pool == "processes":
        raise click.UsageError(
            "--pool processes is not available in this version; use threads (default) or asyncio"
        )
    logging.basicConfig(
        level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    names = (
        tuple(q.strip() for q in queues.split(",") if q.strip())
        if queues
        else tuple(q.name for q in settings.topology.work_queues())
    )
    if not names:
        raise click.UsageError("no queues to consume: pass -Q or declare queues in the config")
    w = settings.worker
    options = WorkerOptions(
        queues=names,
        concurrency=concurrency or w.concurrency,
        prefetch_multiplier=prefetch_multiplier or w.prefetch_multiplier,
        pool=pool or w.pool,
        hostname=hostname or "",
        declare=declare,
    )
    tasks = load_tasks(settings.imports)
    wk = Worker(settings, tasks, options)
    click.echo(wk.banner(), err=True)
    wk.on_ready = lambda: click.echo(f"ready: consuming {', '.join(names)}", err=True)
    sys.exit(asyncio.run(wk.run()))


# -- send --------------------------------------------------------------------------------------
def _json_arg(value: str, what: str, kind: type) -> Any:
    try:
        parsed = loads(value)
    except AmqpTasksError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint=what) from None
    if not isinstance(parsed, kind):
        raise click.BadParameter(
            f"must be a JSON {'array' if kind is list else 'object'}", param_hint=what
        )
    return parsed


@main.command()
@click.argument("task")
@click.option("--args", "args_json", default="[]", help="Positional arguments as a JSON array.")
@click.option("--kwargs", "kwargs_json", default="{}", help="Keyword arguments as a JSON object.")
@click.option("--routing-key", default=None, help="Override the routed routing key.")
@click.option("--exchange", default=None, help="Override the routed exchange.")
@click.option("--queue", default=None, help="Publish straight to this queue (default exchange).")
@click.option("--priority", type=click.IntRange(0, 255), default=None)
@click.option(
    "--wait",
    "wait_seconds",
    type=float,
    default=None,
    help="Wait this many seconds for the result and print it.",
)
@config_option
@friendly_errors
def send(
    task: str,
    args_json: str,
    kwargs_json: str,
    routing_key: str | None,
    exchange: str | None,
    queue: str | None,
    priority: int | None,
    wait_seconds: float | None,
    config_path: str | None,
) -> None:
    """Publish TASK (confirmed, mandatory) and print its id."""
    settings = _settings(config_path)
    args = _json_arg(args_json, "--args", list)
    kwargs = _json_arg(kwargs_json, "--kwargs", dict)
    if queue and (routing_key or exchange):
        raise click.UsageError("--queue cannot be combined with --routing-key/--exchange")
    app = App(settings)
    try:
        result = app.send_task(
            task,
            tuple(args),
            kwargs,
            routing_key=routing_key,
            exchange=exchange,
            queue=queue,
            priority=priority,
            ignore_result=None if wait_seconds is not None else True,
        )
        click.echo(result.id)
        if wait_seconds is not None:
            value = result.get(timeout=wait_seconds)
            click.echo(f"result: {value!r}")
    finally:
        app.close()


# -- topology ----------------------------------------------------------------------------------
@main.group()
def topology() -> None:
    """Show or declare exchanges, queues and bindings (dead-letter infrastructure included)."""


@topology.command("show")
@config_option
@friendly_errors
def topology_show(config_path: str | None) -> None:
    """Print every exchange, queue, binding and argument that will be declared."""
    settings = load_config(config_path)
    click.echo(f"# from {settings.source}, broker {redact_url(settings.broker.url)}")
    click.echo("\n".join(settings.topology.describe()))
    click.echo("routes:")
    for pattern, route in settings.routes.items():
        click.echo(f"  {pattern} -> {route.exchange or '(default)'} [{route.routing_key}]")
    if settings.default_route is not None:
        r = settings.default_route
        click.echo(f"  (default) -> {r.exchange or '(default)'} [{r.routing_key}]")


@topology.command("apply")
@config_option
@friendly_errors
def topology_apply(config_path: str | None) -> None:
    """Declare the topology idempotently; report objects whose arguments differ."""
    settings = load_config(config_path)
    try:
        declared = asyncio.run(declare_topology(settings.broker.url, settings.topology))
    except TopologyError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    for line in declared:
        click.echo(f"declared {line}")
    click.echo(f"topology applied to {redact_url(settings.broker.url)}: {len(declared)} objects")
