"""The ``amqptasks`` command line (click): one module per command group; the only package that
imports click.

Errors that are the user's to fix (config, routing, topology, broker unreachable) print one
``error: ...`` line and exit 2 (usage/config) or 1 (runtime); no traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from ..config import Settings, load_config
from ..errors import AmqpTasksError, ConfigError

__all__ = ["config_option", "friendly_errors", "main", "settings_for"]

F = TypeVar("F", bound=Callable[..., Any])

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Config file (default: $AMQPTASKS_CONFIG, else ./config/amqptasks.yaml).",
)


def settings_for(config_path: str | None) -> Settings:
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


def _register() -> None:
    # Command modules attach themselves to ``main`` on import.
    from . import beat, control, dlq, events, inspect, send, topology, worker  # noqa: F401


_register()
