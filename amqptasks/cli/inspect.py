"""``amqptasks inspect CMD``: ask running workers what they hold and how they are doing.

One subcommand per ``inspect`` command of :data:`amqptasks.control.COMMANDS` (``control``
commands are in :mod:`.control`, built the same way by :func:`command_group`). Tables for
people, ``--json`` for scripts. Exit 0 when a worker answered (with ``--destination``: every
named one) and none answered with an error; 1 otherwise.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import click

from ..app import App
from ..control import COMMANDS, CommandSpec, ControlReply, Option, check_arguments, encode_reply
from . import config_option, friendly_errors, main, settings_for

__all__ = ["command_group", "print_table"]


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in header], *([str(c) for c in r] for r in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _short(text: Any, limit: int = 60) -> str:
    s = str(text)
    return s if len(s) <= limit else s[: limit - 1] + "…"


# -- how each command's answers are shown -------------------------------------------------------
def _show_ping(replies: dict[str, ControlReply]) -> None:
    for name, r in replies.items():
        click.echo(f"{name}: pong (pid {r.pid}, up {r.result.get('uptime', 0):.1f}s)")


def _show_held(replies: dict[str, ControlReply], when: str) -> None:
    rows = []
    for name, r in replies.items():
        for h in r.result:
            rows.append(
                (
                    name,
                    h["id"],
                    h["task"],
                    h["queue"],
                    h.get(when, ""),
                    f"{h['runtime']:.1f}s" if "runtime" in h else "",
                    h.get("pid", ""),
                    _short(h["args"], 40),
                )
            )
    if rows:
        print_table(("worker", "id", "task", "queue", when, "runtime", "pid", "args"), rows)
    for name, r in replies.items():
        if not r.result:
            click.echo(f"{name}: none")


def _show_stats(replies: dict[str, ControlReply]) -> None:
    for name, r in replies.items():
        s = r.result
        click.echo(
            f"{name}: pid {s['pid']}, up {s['uptime']:.0f}s, pool {s['pool']} "
            f"concurrency {s['concurrency']} prefetch {s['prefetch']}"
            f"{_autoscale_text(s.get('autoscale'))}, queues "
            f"{', '.join(s['queues']) or '-'}, processed {s['processed']}, running "
            f"{s['running']}, reserved {s['reserved']}, reconnects {s['reconnects']}, "
            f"events {'on' if s['events']['enabled'] else 'off'} (published "
            f"{s['events']['published']}, dropped {s['events']['dropped']}), cpu "
            f"{s['rusage']['utime'] + s['rusage']['stime']:.1f}s, maxrss "
            f"{s['rusage']['maxrss_kib']} KiB"
        )
        rows = [
            (f"  {task}", *(counts.get(o, 0) for o in _OUTCOMES))
            for task, counts in s["by_task"].items()
        ]
        if rows:
            print_table(("  task", *_OUTCOMES), rows)


def _autoscale_text(scale: dict[str, int] | None) -> str:
    return f" (autoscale {scale['min']}..{scale['max']})" if scale else ""


_OUTCOMES = ("succeeded", "failed", "retried", "rejected", "expired", "revoked")


def _show_registered(replies: dict[str, ControlReply]) -> None:
    for name, r in replies.items():
        click.echo(f"{name}:")
        for task, info in r.result.items():
            p = info["policy"]
            limits = (f" time_limit={p['time_limit']:g}s" if p.get("time_limit") else "") + (
                f" soft_time_limit={p['soft_time_limit']:g}s" if p.get("soft_time_limit") else ""
            )
            flags = "".join(f" {flag}" for flag in ("acks_early", "ignore_result") if p.get(flag))
            kind = " (async)" if info["async"] else ""
            click.echo(f"  {task}{kind}  max_retries={p['max_retries']}{limits}{flags}")


def _show_conf(replies: dict[str, ControlReply]) -> None:
    for name, r in replies.items():
        click.echo(f"{name}:")
        for line in json.dumps(r.result, indent=2, sort_keys=True).splitlines()[1:-1]:
            click.echo(line)


def _show_query(replies: dict[str, ControlReply]) -> None:
    rows = []
    for name, r in replies.items():
        for task_id, info in r.result.items():
            rows.append((name, task_id, info["state"]))
    print_table(("worker", "id", "state"), rows)


def _pool_text(result: dict[str, Any]) -> str:
    """``pool 6, prefetch 24 per consumer, autoscale 1..6`` (pool-grow/-shrink, autoscale)."""
    scale = result.get("autoscale")
    bounds = f", autoscale {scale['min']}..{scale['max']}" if scale else ""
    return f"pool {result['concurrency']}, prefetch {result['prefetch']} per consumer{bounds}"


def _limit_text(limit: dict[str, Any] | None) -> str:
    if not limit:
        return "none"
    burst = f", burst {limit['burst']}" if limit.get("burst", 1) != 1 else ""
    return f"{limit['rate']} per {limit['scope']}{burst}"


def _show_revoke(replies: dict[str, ControlReply]) -> None:
    for name, r in replies.items():
        res = r.result
        stopped = f", terminated {', '.join(res['terminated'])}" if res["terminated"] else ""
        click.echo(f"{name}: revoked {len(res['revoked'])} id(s) until {res['expires']}{stopped}")


def _show_rate_limit(replies: dict[str, ControlReply]) -> None:
    for name, r in replies.items():
        res = r.result
        click.echo(
            f"{name}: {res['task']} rate limit {_limit_text(res['rate_limit'])} "
            f"(was {_limit_text(res['was'])})"
        )


def _show_time_limit(replies: dict[str, ControlReply]) -> None:
    for name, r in replies.items():
        res = r.result
        click.echo(
            f"{name}: {res['task']} soft_time_limit {res['soft_time_limit']:g}s, time_limit "
            f"{res['time_limit']:g}s (0: none)"
        )


def _show_plain(replies: dict[str, ControlReply]) -> None:
    for name, r in replies.items():
        result = r.result
        if isinstance(result, dict) and "queues" in result:
            click.echo(f"{name}: consuming {', '.join(result['queues']) or 'nothing'}")
        elif isinstance(result, dict) and "concurrency" in result:
            click.echo(f"{name}: {_pool_text(result)}")
        elif isinstance(result, dict) and result.get("shutdown"):
            click.echo(f"{name}: warm shutdown started ({result['running']} task(s) running)")
        else:
            click.echo(f"{name}: {json.dumps(result)}")


SHOW: dict[str, Callable[[dict[str, ControlReply]], None]] = {
    "ping": _show_ping,
    "active": lambda replies: _show_held(replies, "started"),
    "reserved": lambda replies: _show_held(replies, "received"),
    "stats": _show_stats,
    "registered": _show_registered,
    "conf": _show_conf,
    "query-task": _show_query,
    "revoke": _show_revoke,
    "rate-limit": _show_rate_limit,
    "time-limit": _show_time_limit,
}


def _as_json(r: ControlReply) -> Any:
    """The reply as it came over the wire (schema/control-v1.json ``$defs.reply``)."""
    return json.loads(encode_reply(r))


def run_command(
    spec: CommandSpec,
    values: Sequence[str],
    timeout: float,
    destination: str | None,
    as_json: bool,
    config_path: str | None,
    options: dict[str, Any] | None = None,
) -> None:
    """Send ``spec`` to the workers, print their answers, exit with the documented code."""
    try:
        arguments = check_arguments(spec.name, values, options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    names = [d.strip() for d in (destination or "").split(",") if d.strip()] or None
    app = App(settings_for(config_path))
    try:
        try:
            replies = app.control.send(spec.name, arguments, destination=names, timeout=timeout)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    finally:
        app.close()
    if spec.stored and not as_json:
        click.echo(
            f"stored: {spec.name} holds for every worker, those started later included "
            f"({len(arguments.get('ids', []))} id(s))"
        )
    good = {n: r for n, r in replies.items() if r.ok}
    bad = {n: r for n, r in replies.items() if not r.ok}
    if as_json:
        click.echo(json.dumps({n: _as_json(r) for n, r in replies.items()}, indent=2))
    else:
        if good:
            SHOW.get(spec.name, _show_plain)(good)
        for n, r in bad.items():
            click.echo(f"{n}: error {r.error_type}: {r.error_message}")
    missing = [n for n in names or () if n not in {r.hostname for r in replies.values()}]
    if not replies and spec.stored and not names:
        click.echo(f"no worker answered within {timeout}s (none running?)", err=True)
        return  # kept in the broker: it holds when they start
    if not replies:
        click.echo(f"error: no worker answered within {timeout}s", err=True)
        sys.exit(1)
    if missing:
        click.echo(f"error: no answer from {', '.join(missing)} within {timeout}s", err=True)
        sys.exit(1)
    if bad:
        sys.exit(1)


def command_group(group: click.Group, kind: str) -> None:
    """Add one subcommand to ``group`` for each command of ``kind`` in COMMANDS."""
    for spec in COMMANDS.values():
        if spec.group == kind:
            group.add_command(_subcommand(spec))


def _subcommand(spec: CommandSpec) -> click.Command:
    params: list[click.Parameter] = [
        click.Argument(
            [p.replace("-", "_")],
            nargs=-1 if spec.variadic and p == spec.params[-1] else 1,
            required=True,
        )
        for p in spec.params
    ]
    params += [
        click.Option(
            ["--timeout"],
            type=click.FloatRange(min=0, min_open=True),
            default=1.0,
            show_default=True,
            help="Seconds to wait for answers.",
        ),
        click.Option(
            ["--destination", "-d"],
            default=None,
            help="Comma-separated worker names (default: every worker).",
        ),
        click.Option(["--json", "as_json"], is_flag=True, help="The answers as JSON."),
    ]
    params += [_option(o) for o in spec.options]

    @friendly_errors
    def callback(**kw: Any) -> None:
        values: list[str] = []
        for p in spec.params:
            value = kw.pop(p.replace("-", "_"))
            values.extend(value if isinstance(value, tuple) else [value])
        options = {o.name: kw.pop(o.name.replace("-", "_")) for o in spec.options}
        run_command(
            spec,
            values,
            kw["timeout"],
            kw["destination"],
            kw["as_json"],
            kw["config_path"],
            {k: v for k, v in options.items() if v is not None and v is not False},
        )

    cmd = click.Command(spec.name, callback=callback, params=params, help=spec.summary + ".")
    return config_option(cmd)


def _option(option: Option) -> click.Option:
    flag = "--" + option.name
    if option.kind == "flag":
        return click.Option([flag], is_flag=True, default=False, help=option.help)
    if option.kind == "seconds":
        return click.Option(
            [flag], type=click.FloatRange(min=0, min_open=True), default=None, help=option.help
        )
    if option.kind == "choice":
        return click.Option(
            [flag], type=click.Choice(option.choices), default=None, help=option.help
        )
    return click.Option([flag], default=None, help=option.help)


@main.group()
def inspect() -> None:
    """Ask running workers: ping, active, reserved, stats, registered, conf, query-task."""


command_group(inspect, "inspect")
