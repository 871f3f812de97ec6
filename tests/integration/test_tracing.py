"""OpenTelemetry propagation (``amqptasks[otel]``) end to end in one process: a caller inside
a span sends tasks to a real worker (its real event loop, thread pool and consuming
connection) over the real broker, and the SDK's in-memory exporter receives the spans.

The worker continues the caller's trace: its ``run <task>`` span is a child of the caller's
span (the ``traceparent`` header travelled with the message), and spans the task opens are
children of it, from the thread pool as from the event loop.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from broker_fixtures import Broker, write_config

from amqptasks import App, load_config
from amqptasks.worker import Worker, WorkerOptions

trace = pytest.importorskip("opentelemetry.trace", reason="the otel extra is not installed")
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

EXPORTER = InMemorySpanExporter()
PROVIDER = TracerProvider()
PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))


@pytest.fixture
def spans() -> InMemorySpanExporter:
    # The global provider can be set once per process; the test's tracer uses it directly.
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(PROVIDER)
    EXPORTER.clear()
    return EXPORTER


def run_worker_and(broker: Broker, tmp_path: Path, caller: Any, *, tracing: bool) -> Any:
    """Run a worker on the test's vhost; call ``caller(app)`` in a thread once it consumes."""
    cfg = write_config(tmp_path, broker, imports=[], tracing={"enabled": tracing})
    settings = load_config(cfg, env={})
    tasks_app = App(settings)

    @tasks_app.task(name="traced.sync")
    def sync_task(x: int) -> int:
        with trace.get_tracer("test").start_as_current_span("inside sync"):
            return x * 2

    @tasks_app.task(name="traced.coro")
    async def async_task(x: int) -> int:
        with trace.get_tracer("test").start_as_current_span("inside async"):
            await asyncio.sleep(0)
            return x + 1

    @tasks_app.task(name="traced.fails")
    def failing() -> None:
        raise ValueError("no good")

    async def main() -> Any:
        worker = Worker(
            settings, tasks_app.tasks, WorkerOptions(queues=("default",), concurrency=2)
        )
        ready = asyncio.Event()
        worker.on_ready = ready.set
        running = asyncio.ensure_future(worker.run())
        await asyncio.wait_for(ready.wait(), 30)
        app = App(settings)
        try:
            return await asyncio.to_thread(caller, app)
        finally:
            app.close()
            worker.request_stop()
            assert await asyncio.wait_for(running, 30) == 0

    return asyncio.run(main())


def test_the_worker_continues_the_callers_trace_around_each_task(
    broker: Broker, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    tracer = PROVIDER.get_tracer("caller")

    def caller(app: App) -> Any:
        with tracer.start_as_current_span("caller") as parent:
            sync = app.send_task("traced.sync", (21,), queue="default")
            coro = app.send_task("traced.coro", (1,), queue="default")
            bad = app.send_task("traced.fails", queue="default")
            results = (sync.get(timeout=20), coro.get(timeout=20))
            with pytest.raises(ValueError):
                bad.get(timeout=20)
        return parent.get_span_context(), results, (sync.id, coro.id, bad.id)

    parent, results, ids = run_worker_and(broker, tmp_path, caller, tracing=True)
    assert results == (42, 2)
    by_name = {s.name: s for s in spans.get_finished_spans()}
    for name, task_id in zip(("traced.sync", "traced.coro", "traced.fails"), ids, strict=True):
        run = by_name[f"run {name}"]
        assert run.context.trace_id == parent.trace_id  # one trace, caller to task
        assert run.parent is not None and run.parent.span_id == parent.span_id
        assert run.kind == trace.SpanKind.CONSUMER
        assert run.attributes["messaging.message.id"] == task_id
        assert run.attributes["messaging.destination.name"] == "default"
    for inside, task in (("inside sync", "traced.sync"), ("inside async", "traced.coro")):
        span = by_name[inside]
        assert span.parent is not None
        assert span.parent.span_id == by_name[f"run {task}"].context.span_id
    failed = by_name["run traced.fails"]
    assert failed.status.status_code == trace.StatusCode.ERROR
    assert [e.name for e in failed.events] == ["exception"]
    assert failed.events[0].attributes["exception.type"] == "ValueError"


def test_without_tracing_enabled_no_trace_context_travels(
    broker: Broker, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    tracer = PROVIDER.get_tracer("caller")

    def caller(app: App) -> Any:
        with tracer.start_as_current_span("caller"):
            prepared = app.prepare("traced.sync", (1,), reply_to=None, queue="default")
            return prepared.envelope.headers, app.send_task(
                "traced.sync", (1,), queue="default"
            ).get(timeout=20)

    headers, result = run_worker_and(broker, tmp_path, caller, tracing=False)
    assert result == 2 and "traceparent" not in headers
    assert [s.name for s in spans.get_finished_spans()] == ["inside sync", "caller"]
