"""The ``amqptasks`` command line (click): one module per command group; the only package that
imports click.

Errors that are the user's to fix print one ``error: ...`` line (with ``-l debug`` the
traceback follows) and exit 2 (usage/config: a bad option, config file, queue name or task
module) or 1 (runtime: broker, unroutable, topology mismatch, a failed task); no traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from ..config import Settings, load_config
from ..errors import AmqpTasksError, ConfigError
from .logs import FORMATS, LEVELS, debug_traceback, echo, setup

__all__ = ["BadUsage", "config_option", "friendly_errors", "main", "settings_for"]

F = TypeVar("F", bound=Callable[..., Any])

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Config file (default: $AMQPTASKS_CONFIG, else ./config/amqptasks.yaml).",
)


class BadUsage(click.ClickException):
    """A command line that names something the config does not have (``-Q nosuchqueue``):
    one ``error:`` line, exit 2, like a config error."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        echo(f"error: {self.format_message()}", level=logging.ERROR)


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
            echo(f"error: {exc}", level=logging.ERROR)
            debug_traceback(exc)
            sys.exit(2)
        except AmqpTasksError as exc:
            echo(f"error: {exc}", level=logging.ERROR)
            debug_traceback(exc)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


@click.group()
@click.version_option(package_name="amqptasks")
@click.option(
    "-l",
    "--loglevel",
    type=click.Choice(LEVELS, case_sensitive=False),
    default=None,
    help="Log level of every command (a command's own -l wins; default INFO).",
)
@click.option(
    "--log-format",
    type=click.Choice(FORMATS),
    default=None,
    help="text (default) or json, for every command (a command's own option wins).",
)
def main(loglevel: str | None, log_format: str | None) -> None:
    """amqptasks: task routing on RabbitMQ, honest about delivery."""
    setup(loglevel or "INFO", log_format or "text")


def _register() -> None:
    # Command modules attach themselves to ``main`` on import.
    from . import (  # noqa: F401
        beat,
        control,
        dashboard,
        dlq,
        events,
        inspect,
        result,
        send,
        topology,
        worker,
    )


_register()
