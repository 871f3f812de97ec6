"""``amqptasks dashboard``: the web UI and REST API (docs/dashboard.md).

Refuses to listen beyond loopback without credentials; ``--hash-password`` and
``--new-token NAME`` make what the config holds instead of a plain secret.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import sys

import click

from ..config import DashboardSettings, Settings
from ..schedule import parse_duration
from . import config_option, friendly_errors, main, settings_for
from .logs import echo, log_options

#: What ``--new-token NAME`` accepts: safe in the YAML line it prints and in the logs.
TOKEN_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")

HOW_TO_AUTH = (
    "set credentials with --basic-auth USER:PASSWORD, dashboard.basic_auth in the config or "
    "$AMQPTASKS_DASHBOARD_AUTH (amqptasks dashboard --hash-password prints a hash to use "
    "instead of the password)"
)


def _hash_password() -> None:
    from ..dashboard.auth import hash_password

    password = click.prompt("password", hide_input=True, confirmation_prompt=True, err=True)
    click.echo(hash_password(password))


def _token_name(_ctx: click.Context, _param: click.Parameter, name: str | None) -> str | None:
    """NAME goes into ``NAME:sha256$...`` in YAML and into the logs that name who called:
    a colon would split it, and quotes or spaces would need escaping in the line printed."""
    if name is not None and not TOKEN_NAME.fullmatch(name):
        raise click.BadParameter(
            f"{name!r}: use letters, digits and . _ - @ only (at most 64), e.g. deploy-bot"
        )
    return name


def _new_token(name: str) -> None:
    from ..dashboard.auth import new_token

    token, digest = new_token()
    click.echo(f"token (give it to the script; it is not stored): {token}")
    click.echo(f'config line:  dashboard: {{api_tokens: ["{name}:{digest}"]}}')


def _effective(
    settings: Settings,
    address: str | None,
    port: int | None,
    basic_auth: tuple[str, ...],
    database: str | None,
    max_tasks: int | None,
    retention: str | None,
    metrics_public: bool | None,
) -> DashboardSettings:
    d = settings.dashboard
    changes: dict[str, object] = {}
    if address is not None:
        changes["address"] = address
    if port is not None:
        changes["port"] = port
    if basic_auth:
        for i, entry in enumerate(basic_auth):
            user, sep, secret = entry.partition(":")
            if not (sep and user and secret):
                what = "is empty" if not entry else "is not USER:PASSWORD"
                raise click.BadParameter(
                    f"entry {i + 1} {what} (the value is not shown)", param_hint="--basic-auth"
                )
        changes["basic_auth"] = basic_auth
        changes["basic_auth_source"] = "--basic-auth"
    if database is not None:
        changes["database"] = database
    if max_tasks is not None:
        changes["max_tasks"] = max_tasks
    if retention is not None:
        try:
            seconds = parse_duration(retention).total_seconds()
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--retention") from None
        if seconds <= 0:
            raise click.BadParameter("must be longer than 0 seconds", param_hint="--retention")
        changes["retention"] = seconds
    if metrics_public is not None:
        changes["metrics_public"] = metrics_public
    return dataclasses.replace(d, **changes)  # type: ignore[arg-type]


def _check_hashes(d: DashboardSettings) -> None:
    """Exit 2 naming the entry (where it came from, and its user) whose password looks
    like a hash but is malformed: it could never match, so its user could never log in."""
    from ..dashboard.auth import hash_problem

    for i, entry in enumerate(d.basic_auth):
        user, _, secret = entry.partition(":")
        problem = hash_problem(secret)
        if problem is not None:
            echo(
                f"error: {d.basic_auth_source}[{i}] (user {user!r}): the password {problem}; "
                "amqptasks dashboard --hash-password prints one (the value is not shown)",
                level=logging.ERROR,
            )
            sys.exit(2)


@main.command()
@click.option(
    "--address", default=None, help="Listen address (default dashboard.address, 127.0.0.1)."
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Port (default dashboard.port, 5555).",
)
@click.option(
    "--basic-auth",
    multiple=True,
    metavar="USER:PASSWORD",
    help="A user (repeat for more); the password may be a hash from --hash-password. "
    "Overrides dashboard.basic_auth and $AMQPTASKS_DASHBOARD_AUTH.",
)
@click.option("--database", default=None, help="History file (default dashboard.database).")
@click.option(
    "--max-tasks", type=click.IntRange(min=1), default=None, help="Tasks kept in the history."
)
@click.option("--retention", default=None, help="How long tasks are kept, e.g. 7d, 12h.")
@click.option(
    "--metrics-public/--metrics-private",
    default=None,
    help="Serve /metrics without credentials (default: dashboard.metrics_public, off).",
)
@click.option(
    "--hash-password", is_flag=True, help="Print a hash of a password (asked for) and exit."
)
@click.option(
    "--new-token",
    metavar="NAME",
    default=None,
    callback=_token_name,
    help="Print a new API token named NAME (letters, digits, . _ - @) and exit.",
)
@config_option
@log_options
@friendly_errors
def dashboard(
    address: str | None,
    port: int | None,
    basic_auth: tuple[str, ...],
    database: str | None,
    max_tasks: int | None,
    retention: str | None,
    metrics_public: bool | None,
    hash_password: bool,
    new_token: str | None,
    config_path: str | None,
) -> None:
    """The web UI and REST API: workers, tasks, queues, dead letters, schedules."""
    if hash_password:
        _hash_password()
        return
    if new_token is not None:
        _new_token(new_token)
        return
    from ..dashboard.server import is_loopback

    settings = settings_for(config_path)
    d = _effective(
        settings, address, port, basic_auth, database, max_tasks, retention, metrics_public
    )
    _check_hashes(d)
    if not is_loopback(d.address) and not (d.basic_auth or d.api_tokens):
        echo(
            f"error: refusing to listen on {d.address} without credentials: {HOW_TO_AUTH}",
            level=logging.ERROR,
        )
        sys.exit(2)
    from ..dashboard.server import serve

    try:
        asyncio.run(serve(dataclasses.replace(settings, dashboard=d), echo))
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {d.address}:{d.port}: {exc.strerror or exc}"
        ) from None
