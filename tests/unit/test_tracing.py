"""The caller's half of OpenTelemetry propagation: what goes into a message's headers, and
the config key that turns it on."""

from __future__ import annotations

import pytest

from amqptasks import App, Settings
from amqptasks.errors import ConfigError
from amqptasks.tracing import inject

sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="the otel extra is not installed")

TRACER = sdk.TracerProvider().get_tracer("test")


def test_the_current_span_goes_into_the_headers_and_a_callers_own_header_wins() -> None:
    headers: dict[str, object] = {}
    inject(headers)
    assert headers == {}  # no span: nothing to continue
    with TRACER.start_as_current_span("caller") as span:
        inject(headers)
        own = {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
        inject(own)
    ctx = span.get_span_context()
    wanted = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
    assert headers == {"traceparent": wanted}
    assert own == {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}


def test_prepare_injects_only_with_tracing_enabled() -> None:
    base = {"exchanges": {"tasks": {"type": "topic"}}, "queues": {"q": {}}}
    on = App(Settings.from_mapping({**base, "tracing": {"enabled": True}}))
    off = App(Settings.from_mapping(base))
    with TRACER.start_as_current_span("caller"):
        traced = on.prepare("t", reply_to=None, queue="q").envelope.headers
        plain = off.prepare("t", reply_to=None, queue="q").envelope.headers
    assert set(traced) == {"traceparent"} and plain == {}


def test_the_config_key_is_a_bool() -> None:
    with pytest.raises(ConfigError, match=r"tracing\.enabled: expected true or false"):
        Settings.from_mapping({"tracing": {"enabled": "yes"}})
    with pytest.raises(ConfigError, match=r"tracing\.exporter: unknown key \(allowed here"):
        Settings.from_mapping({"tracing": {"exporter": "otlp"}})
