"""The worker's half of OpenTelemetry propagation (amqptasks/tracing.py has the other and
the library): a middleware that runs a traced task inside a span continuing its caller's
trace.

Only messages that carry ``traceparent`` leave the fast path for it (:meth:`wants`): an
untraced message costs nothing more. The span begins in ``before_run`` and ends in
``after_run`` — the first middleware, so its ``after_run`` comes last and the workflow steps a
task sends (published in their ``after_run``) are still inside it.
"""

from __future__ import annotations

from ..protocol import Envelope
from ..tracing import HEADER, TaskSpan, start_task_span
from .middleware import Context, Middleware, Outcome

__all__ = ["TracingMiddleware"]

_KEY = "otel.span"


class TracingMiddleware(Middleware):
    """A ``CONSUMER`` span around each task whose message carries a trace context."""

    def wants(self, envelope: Envelope) -> bool:
        return HEADER in envelope.headers

    async def before_run(self, ctx: Context) -> None:
        env = ctx.envelope
        if HEADER not in env.headers:
            return
        ctx.extra[_KEY] = start_task_span(
            env.task,
            env.headers,
            {
                "messaging.system": "rabbitmq",
                "messaging.operation": "process",
                "messaging.destination.name": ctx.queue,
                "messaging.message.id": env.id,
                "amqptasks.task": env.task,
                "amqptasks.retries": env.retries,
                "amqptasks.hostname": ctx.hostname,
            },
        )

    async def after_run(self, ctx: Context, outcome: Outcome) -> None:
        span: TaskSpan | None = ctx.extra.pop(_KEY, None)
        if span is not None:
            span.end(None if outcome.ok else outcome.exc, outcome.retry_countdown)
