"""Imports task modules and finds the tasks they define.

The worker (and ``amqptasks beat``, whose task modules may define schedules) takes its tasks
from the modules named in the config's ``imports``: every module-level :class:`Task` found there
is registered under its name. A module that is missing or raises while importing is a
:class:`TaskImportError` naming the module, its place in the config and the file:line that
raised, not a page of importlib traceback. Two different functions claiming one name is a
start-up error, not a coin toss at run time.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Iterable
from typing import Any

from .errors import AmqpTasksError, TaskImportError
from .tasks import Task

__all__ = ["load_tasks"]


def load_tasks(modules: Iterable[str], *, source: str = "") -> dict[str, Task]:
    """Import ``modules`` (the config's ``imports``, read from ``source``) and return their
    tasks by name."""
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: task modules are found from the CWD
    found: dict[str, Task] = {}
    for i, name in enumerate(modules):
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # anything a module's code raises, SyntaxError included
            raise TaskImportError(name, source, f"imports[{i}]", exc, _raised_at(exc)) from exc
        for value in _tasks_in(module):
            other = found.get(value.name)
            if other is not None and other.fn is not value.fn:
                raise AmqpTasksError(
                    f"task name {value.name!r} is claimed by {other.fn!r} and {value.fn!r}"
                )
            found[value.name] = value
    return found


def _raised_at(exc: BaseException) -> str | None:
    """``file:line`` of the user's code that raised: a SyntaxError's own position, else the
    innermost frame outside importlib and this module (None when the module is just missing)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    machinery = os.path.dirname(importlib.__file__)
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(("<frozen", machinery)) and f.filename != __file__
    ]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else None


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
