"""Tasks every worker knows: ``amqptasks.map`` and ``amqptasks.starmap`` (Celery's
``task.map(it)``, ``task.starmap(it)`` and, through a group of them, ``task.chunks(it, n)``).

One message runs the named task in-process over a list of arguments and returns the list of
results: many tiny calls for the price of one delivery. The named task must be registered on
the same worker; an ``async def`` task runs to completion on a loop of its own in the pool's
thread.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Mapping
from typing import Any

from ..canvas import MAP_TASK, STARMAP_TASK
from ..errors import TaskNotRegistered
from ..tasks import Sender, Task

__all__ = ["builtin_tasks"]


def _call(task: Task, args: tuple[Any, ...]) -> Any:
    value = task(*args)
    if inspect.iscoroutine(value):
        value = asyncio.run(value)
    return value


def builtin_tasks(registry: Mapping[str, Task], sender: Sender) -> dict[str, Task]:
    """The built-in tasks, looking up the tasks they run in ``registry``."""

    def lookup(name: str) -> Task:
        task = registry.get(name)
        if task is None:
            raise TaskNotRegistered(f"task {name!r} is not registered on this worker")
        return task

    def xmap(task: str, items: list[Any]) -> list[Any]:
        t = lookup(task)
        return [_call(t, (item,)) for item in items]

    def xstarmap(task: str, items: list[list[Any]]) -> list[Any]:
        t = lookup(task)
        return [_call(t, tuple(item)) for item in items]

    return {
        MAP_TASK: Task(xmap, sender, name=MAP_TASK),
        STARMAP_TASK: Task(xstarmap, sender, name=STARMAP_TASK),
    }
