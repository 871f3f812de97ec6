"""Imports task modules and finds the tasks they define.

The worker takes its tasks from the modules named in ``imports`` (and ``--import``): every
module-level :class:`Task` found there is registered under its name. Two different functions
claiming one name is a start-up error, not a coin toss at run time.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable
from typing import Any

from .errors import AmqpTasksError
from .tasks import Task

__all__ = ["load_tasks"]


def load_tasks(modules: Iterable[str]) -> dict[str, Task]:
    """Import ``modules`` and return their tasks by name."""
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: task modules are found from the CWD
    found: dict[str, Task] = {}
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise AmqpTasksError(
                f"cannot import task module {name!r} (from 'imports'): {exc}"
            ) from exc
        for value in _tasks_in(module):
            other = found.get(value.name)
            if other is not None and other.fn is not value.fn:
                raise AmqpTasksError(
                    f"task name {value.name!r} is claimed by {other.fn!r} and {value.fn!r}"
                )
            found[value.name] = value
    return found


def _tasks_in(module: Any) -> list[Task]:
    """Module-level tasks, plus those registered on an app object the module holds (tasks
    defined inside functions or under other names)."""
    out: list[Task] = []
    for value in vars(module).values():
        if isinstance(value, Task):
            out.append(value)
        else:
            registry = getattr(value, "tasks", None) if not isinstance(value, type) else None
            if isinstance(registry, dict):
                out.extend(
                    t
                    for t in registry.values()
                    if isinstance(t, Task) and t.fn.__module__ == module.__name__
                )
    return out
