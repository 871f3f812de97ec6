"""``amqptasks send``: publish a task from the shell."""

from __future__ import annotations

from typing import Any

import click

from ..app import App
from ..errors import AmqpTasksError
from ..protocol import loads
from . import config_option, friendly_errors, main, settings_for


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
    settings = settings_for(config_path)
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
