"""Arithmetic tasks: routed ``task.*`` to the ``default`` queue by ``config/amqptasks.yaml``."""

from __future__ import annotations

import functools
import operator
import time

from examples.app import app


@app.task
def add(x: float, y: float) -> float:
    return x + y


@app.task
def reduce(numbers: list[float], op: str = "add") -> float:
    """Fold ``numbers`` with ``add`` or ``mul``; an unknown ``op`` raises ValueError."""
    ops = {"add": operator.add, "mul": operator.mul}
    if op not in ops:
        raise ValueError(f"unknown op {op!r} (expected one of {', '.join(ops)})")
    return functools.reduce(ops[op], numbers)


@app.task
def sum_all(*numbers: float) -> float:
    return sum(numbers)


@app.task
def other(seconds: float = 0.0) -> str:
    """Sleeps ``seconds`` (used to show a long-running task finishing on warm shutdown)."""
    time.sleep(seconds)
    return f"slept {seconds}s"
