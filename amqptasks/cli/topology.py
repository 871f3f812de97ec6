"""``amqptasks topology show|apply``."""

from __future__ import annotations

import asyncio
import sys

import click

from ..config import load_config, redact_url
from ..errors import TopologyError
from ..transport.aio import declare_topology
from . import config_option, friendly_errors, main


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
