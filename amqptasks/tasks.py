"""Tasks: registered functions and the options that travel with them.

A :class:`Task` wraps a function. Calling it runs the function in-process (no broker);
``delay``/``apply_async`` publish a message through the task's application. The task does not
know how publishing works: it asks its owner, anything implementing :class:`Sender`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar

if TYPE_CHECKING:
    from .results import AsyncResult

__all__ = ["Sender", "Task", "task_name"]

P = ParamSpec("P")
R = TypeVar("R")


class Sender(Protocol):
    """What a task needs from its application to be published."""

    def send_task(
        self,
        name: str,
        args: tuple[Any, ...] = ...,
        kwargs: Mapping[str, Any] | None = ...,
        **options: Any,
    ) -> AsyncResult: ...

    async def send_task_async(
        self,
        name: str,
        args: tuple[Any, ...] = ...,
        kwargs: Mapping[str, Any] | None = ...,
        **options: Any,
    ) -> AsyncResult: ...


def task_name(fn: Callable[..., Any]) -> str:
    """The default task name: ``module.function``."""
    return f"{fn.__module__}.{fn.__qualname__}"


class Task(Generic[P, R]):
    """A registered function.

    ``acks_early=True`` acks the message before running it (at-most-once: a crash mid-task
    loses it); the default acks only after the task returned. ``ignore_result=None`` follows
    the config's ``results.ignore_result``.
    """

    def __init__(
        self,
        fn: Callable[P, R],
        sender: Sender,
        *,
        name: str | None = None,
        ignore_result: bool | None = None,
        acks_early: bool = False,
    ) -> None:
        self.fn = fn
        self.sender = sender
        self.name = name or task_name(fn)
        self.ignore_result = ignore_result
        self.acks_early = acks_early
        self.is_async = inspect.iscoroutinefunction(fn)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run in this process, like calling the function itself (an ``async def`` task
        returns its coroutine)."""
        return self.fn(*args, **kwargs)

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult:
        """Publish with the routed defaults; returns a result handle."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Publish with options: ``queue``, ``routing_key``, ``exchange``, ``priority``,
        ``headers``, ``task_id``, ``ignore_result``, ``timeout`` (confirm wait, seconds)."""
        options.setdefault("ignore_result", self.ignore_result)
        return self.sender.send_task(self.name, tuple(args), kwargs, **options)

    async def delay_async(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult:
        """``delay`` for asyncio callers: the publish is awaited, never blocks the loop."""
        return await self.apply_async_async(args, kwargs)

    async def apply_async_async(
        self,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        options.setdefault("ignore_result", self.ignore_result)
        return await self.sender.send_task_async(self.name, tuple(args), kwargs, **options)
