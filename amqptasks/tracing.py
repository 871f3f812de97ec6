"""OpenTelemetry trace propagation, the ``amqptasks[otel]`` extra: the only module that
imports ``opentelemetry``.

With ``tracing.enabled: true`` in the config:

* a caller (:meth:`amqptasks.App.prepare`) puts the current trace context in each message's
  headers — W3C ``traceparent`` (and ``tracestate``, ``baggage`` when set), through the
  globally configured propagator — so a task sent inside a span belongs to that trace. Any
  client can do the same: the headers are plain strings (docs/protocol.md);
* a worker (:mod:`amqptasks.worker.tracing`) continues it: a ``CONSUMER`` span named
  ``run <task>`` around each traced task, a child of the caller's span, current while the task
  runs (so spans the task opens, and the messages of the workflow steps it sends, are its
  children). ``--pool processes`` runs the task in a child process: the span is the parent's,
  the child does not see it.

The application sets the SDK up as for any OpenTelemetry instrumentation (a
``TracerProvider`` with its exporter, or ``opentelemetry-instrument``); without one the API
is a no-op and nothing is sent.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import MutableMapping
from typing import Any

from .errors import ConfigError

__all__ = ["HEADER", "TaskSpan", "inject", "require", "start_task_span"]

#: The W3C trace context header a traced message carries.
HEADER = "traceparent"

INSTALL = "pip install 'amqptasks[otel]'"


def require(source: str) -> None:
    """``ConfigError`` naming the config file when tracing is on but OpenTelemetry is not
    installed (a worker says so at start, a caller at its first publish)."""
    try:
        found = importlib.util.find_spec("opentelemetry.propagate") is not None
    except ImportError:  # not even the opentelemetry namespace
        found = False
    if not found:
        raise ConfigError(
            source,
            "tracing.enabled",
            f"true needs OpenTelemetry, which is not installed ({INSTALL})",
        )


def inject(headers: MutableMapping[str, Any], source: str = "the config") -> None:
    """Add the current trace context to ``headers`` (what the caller set itself wins)."""
    try:
        from opentelemetry import propagate
    except ImportError:
        require(source)
        raise
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    for key, value in carrier.items():
        headers.setdefault(key, value)


class TaskSpan:
    """A task's span, current until :meth:`end` (call both on the same asyncio task)."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: Any, token: Any) -> None:
        self._span = span
        self._token = token

    def end(self, error: BaseException | None = None, retry_in: float | None = None) -> None:
        from opentelemetry import context, trace

        span = self._span
        if retry_in is not None:
            span.set_attribute("amqptasks.retry_countdown", retry_in)
        if error is not None:
            span.record_exception(error)
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(error).__name__}"))
        span.end()
        # Ended from another context than it began in: nothing to undo there.
        with contextlib.suppress(Exception):
            context.detach(self._token)


def start_task_span(
    task: str, headers: MutableMapping[str, Any], attributes: dict[str, Any]
) -> TaskSpan:
    """Start ``run <task>`` as a child of the trace context in ``headers`` and make it
    current in this context (asyncio task)."""
    from opentelemetry import context, propagate, trace

    carrier = {k: v for k, v in headers.items() if isinstance(v, str)}
    parent = propagate.extract(carrier)
    tracer = trace.get_tracer("amqptasks")
    span = tracer.start_span(
        f"run {task}", context=parent, kind=trace.SpanKind.CONSUMER, attributes=attributes
    )
    token = context.attach(trace.set_span_in_context(span, parent))
    return TaskSpan(span, token)
