"""``amqptasks topology show|apply``."""

from __future__ import annotations

import asyncio
import logging
import sys

import click

from ..config import load_config
from ..errors import TopologyError
from ..transport.aio import declare_topology
from . import config_option, friendly_errors, main
from .logs import echo, log_options

every_option = click.option(
    "-v",
    "--all",
    "everything",
    is_flag=True,
    help="List every object, the 22 delay levels' exchanges, queues and bindings included "
    "(default: those summarised in one line).",
)


@main.group()
def topology() -> None:
    """Show or declare exchanges, queues and bindings (dead-letter infrastructure included)."""


@topology.command("show")
@every_option
@config_option
@log_options
@friendly_errors
def topology_show(everything: bool, config_path: str | None) -> None:
    """Print the exchanges, queues, bindings and arguments that will be declared."""
    settings = load_config(config_path)
    click.echo(f"# from {settings.source}, broker {settings.broker.display}")
    click.echo("\n".join(settings.topology.describe(everything=everything)))
    click.echo("routes:")
    for pattern, route in settings.routes.items():
        click.echo(f"  {pattern} -> {route.exchange or '(default)'} [{route.routing_key}]")
    if settings.default_route is not None:
        r = settings.default_route
        click.echo(f"  (default) -> {r.exchange or '(default)'} [{r.routing_key}]")


@topology.command("apply")
@every_option
@config_option
@log_options
@friendly_errors
def topology_apply(everything: bool, config_path: str | None) -> None:
    """Declare the topology idempotently; report objects whose arguments differ."""
    settings = load_config(config_path)
    try:
        declared = asyncio.run(declare_topology(settings.broker.urls, settings.topology))
    except TopologyError as exc:
        echo(f"error: {exc}", level=logging.ERROR)
        sys.exit(1)
    if everything:
        for line in declared:
            click.echo(f"declared {line}")
    else:
        click.echo("\n".join(settings.topology.describe()))
    click.echo(f"topology applied to {settings.broker.display}: {len(declared)} objects")
