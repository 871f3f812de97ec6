"""``amqptasks send``: publish a task from the shell."""

from __future__ import annotations

import logging
import sys
from datetime import datetime
from typing import Any

import click

from ..app import App
from ..errors import AmqpTasksError, DecodeError, TaskError
from ..protocol import loads, parse_time
from . import config_option, friendly_errors, main, settings_for
from .logs import echo, log_options


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


def _time_arg(value: str | None, what: str, seconds: bool) -> datetime | float | None:
    """An ISO 8601 time (no offset = UTC, as in the wire protocol) or, where ``seconds`` is
    allowed, a number of seconds from now."""
    if value is None:
        return None
    if seconds:
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            if number != number or number in (float("inf"), float("-inf")):
                raise click.BadParameter(f"not a finite number: {value!r}", param_hint=what)
            return number
    try:
        return parse_time(value.strip(), what)
    except DecodeError:
        expected = "seconds or an ISO 8601 time" if seconds else "an ISO 8601 time"
        raise click.BadParameter(
            f"expected {expected} (e.g. 2030-01-31T12:00:00Z), got {value!r}", param_hint=what
        ) from None


@main.command()
@click.argument("task")
@click.option("--args", "args_json", default="[]", help="Positional arguments as a JSON array.")
@click.option("--kwargs", "kwargs_json", default="{}", help="Keyword arguments as a JSON object.")
@click.option("--routing-key", default=None, help="Override the routed routing key.")
@click.option("--exchange", default=None, help="Override the routed exchange.")
@click.option("--queue", default=None, help="Publish straight to this queue (default exchange).")
@click.option("--priority", type=click.IntRange(0, 255), default=None)
@click.option(
    "--countdown",
    type=click.FloatRange(min=0),
    default=None,
    help="Run no earlier than this many seconds from now (the wait is in the broker).",
)
@click.option(
    "--eta",
    default=None,
    help="Run no earlier than this ISO 8601 time (no offset = UTC). Not with --countdown.",
)
@click.option(
    "--expires",
    default=None,
    help="Seconds from now, or an ISO 8601 time, after which a worker dead-letters the task "
    "(reason 'expired') instead of running it.",
)
@click.option(
    "--headers",
    "headers_json",
    default=None,
    help="AMQP headers as a JSON object (the task sees them in self.request.headers).",
)
@click.option(
    "--wait",
    "wait_seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Wait up to SECONDS for the result and print it.",
)
@config_option
@log_options
@friendly_errors
def send(
    task: str,
    args_json: str,
    kwargs_json: str,
    routing_key: str | None,
    exchange: str | None,
    queue: str | None,
    priority: int | None,
    countdown: float | None,
    eta: str | None,
    expires: str | None,
    headers_json: str | None,
    wait_seconds: float | None,
    config_path: str | None,
) -> None:
    """Publish TASK (confirmed, mandatory) and print its id."""
    settings = settings_for(config_path)
    args = _json_arg(args_json, "--args", list)
    kwargs = _json_arg(kwargs_json, "--kwargs", dict)
    headers = _json_arg(headers_json, "--headers", dict) if headers_json is not None else None
    if queue and (routing_key or exchange):
        raise click.UsageError("--queue cannot be combined with --routing-key/--exchange")
    if countdown is not None and eta is not None:
        raise click.UsageError("give --countdown or --eta, not both")
    eta_at = _time_arg(eta, "--eta", seconds=False)
    expires_at = _time_arg(expires, "--expires", seconds=True)
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
            countdown=countdown,
            eta=eta_at,
            expires=expires_at,
            headers=headers,
            ignore_result=None if wait_seconds is not None else True,
        )
        click.echo(result.id)
        if wait_seconds is not None:
            try:
                value = result.get(timeout=wait_seconds)
            except TaskError as exc:
                echo(
                    f"error: task {task}[{result.id}] failed: {exc.exc_type}: {exc.message}",
                    level=logging.ERROR,
                )
                sys.exit(1)
            click.echo(f"result: {value!r}")
    finally:
        app.close()
