"""``amqptasks control CMD``: act on running workers (shutdown, add-consumer, cancel-consumer,
pool-grow, pool-shrink, autoscale, revoke, rate-limit, time-limit).

Built like ``amqptasks inspect`` (:func:`.inspect.command_group`): one subcommand per
``control`` command of :data:`amqptasks.control.COMMANDS`, the same options and exit codes.
"""

from __future__ import annotations

from . import main
from .inspect import command_group


@main.group()
def control() -> None:
    """Act on running workers: shutdown (warm), add-consumer QUEUE, cancel-consumer QUEUE,
    pool-grow N, pool-shrink N, autoscale MAX MIN, revoke ID... [--terminate] [--expires S],
    rate-limit TASK RATE [--scope worker|fleet], time-limit TASK SOFT HARD."""


command_group(control, "control")
