"""``/metrics``: the fleet in Prometheus' text format, from the history (so the counters
survive a dashboard restart) and the last management-API sample.

prometheus-client writes the format (label escaping, ``# HELP``/``# TYPE``); one collector
builds every family at scrape time, nothing is kept in the client's global registry.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .history import RUNTIME_BUCKETS

if TYPE_CHECKING:
    from .server import Dashboard

__all__ = ["render"]


class _Fleet(Collector):
    def __init__(self, dash: Dashboard) -> None:
        self.dash = dash

    def collect(self) -> Iterator[Metric]:
        from .api import _workers

        history = self.dash.history
        tasks = CounterMetricFamily(
            "amqptasks_tasks", "Tasks that reached a state, by task name", labels=["name", "state"]
        )
        for name, state, n, _runtime in history.totals():
            tasks.add_metric([name, state], n)
        yield tasks
        per_name: dict[str, list[int]] = {}
        for name, bucket, n in history.buckets():
            per_name.setdefault(name, [0] * (len(RUNTIME_BUCKETS) + 1))[bucket] += n
        sums: dict[str, float] = {}
        for name, _state, _n, runtime in history.totals():
            sums[name] = sums.get(name, 0.0) + runtime
        runtimes = HistogramMetricFamily(
            "amqptasks_task_runtime_seconds", "Task runtimes, by task name", labels=["name"]
        )
        for name, counts in sorted(per_name.items()):
            cumulative, buckets = 0, []
            for bound, n in zip((*RUNTIME_BUCKETS, float("inf")), counts, strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            runtimes.add_metric([name], buckets, sums.get(name, 0.0))
        yield runtimes
        workers = _workers(self.dash, history.workers())
        online = GaugeMetricFamily("amqptasks_workers_online", "Workers online (heartbeats)")
        online.add_metric([], sum(1 for w in workers if w["status"] == "online"))
        yield online
        up = GaugeMetricFamily(
            "amqptasks_worker_up", "1 when the worker's heartbeats arrive", labels=["worker"]
        )
        for w in workers:
            up.add_metric([w["hostname"]], 1 if w["status"] == "online" else 0)
        yield up
        samples = self.dash.broker.samples
        depth = GaugeMetricFamily(
            "amqptasks_queue_messages",
            "Messages in each queue (management API, sampled every 5 s)",
            labels=["queue"],
        )
        if samples:
            for queue, n in sorted(samples[-1][1].items()):
                depth.add_metric([queue], n)
        yield depth
        st = self.dash.ingestor.stats
        ingested = CounterMetricFamily(
            "amqptasks_dashboard_events", "Events the dashboard ingested since it started"
        )
        ingested.add_metric([], st.events)
        yield ingested
        bad = CounterMetricFamily(
            "amqptasks_dashboard_undecodable_messages", "Events messages that were not events"
        )
        bad.add_metric([], st.undecodable)
        yield bad
        lag = GaugeMetricFamily(
            "amqptasks_dashboard_ingest_lag_seconds",
            "Age of the newest event of the last committed batch when it was committed",
        )
        lag.add_metric([], st.lag)
        yield lag
        rows = GaugeMetricFamily("amqptasks_dashboard_history_tasks", "Tasks in the history")
        rows.add_metric([], history.count())
        yield rows
        scraped = GaugeMetricFamily("amqptasks_dashboard_scrape_time", "POSIX time of this scrape")
        scraped.add_metric([], time.time())
        yield scraped


def render(dash: Dashboard) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fleet(dash))
    return generate_latest(registry)
