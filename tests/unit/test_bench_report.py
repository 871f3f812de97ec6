"""The benchmark report's arithmetic (bench/report.py, bench/targets.py, bench/document.py):
times invert into "× as fast", a store's cost is measured against the same contender's
no-results figure, amqptasks' SQLite rows are set against Celery's redis backend, and every
target is computed from measured figures — a missing one is "not measured", never met."""

from __future__ import annotations

import sys

import pytest

from bench import plots
from bench import targets as tg
from bench.document import markdown, scale_rows
from bench.report import Results, cost_rows, summary_rows


def _results() -> Results:
    res = Results()
    for v in (2.0, 2.2, 1.8):
        res.add("wf_group_redis", "amqptasks", "amqptasks", "Redis store; asyncio", v)
    res.add("wf_group_redis", "amqptasks", "amqptasks", "Redis store; threads", 3.0)
    res.add("wf_group_sqlite", "amqptasks", "amqptasks", "SQLite store; asyncio", 5.0)
    for v in (6.0, 6.5, 5.5):
        res.add("wf_group_redis", "celery", "celery", "redis backend; solo", v)
    res.add("rc_none", "amqptasks", "amqptasks", "ignore_result", 20_000)
    res.add("rc_sqlite", "amqptasks", "amqptasks", "SQLite store", 12_000)
    res.add("rc_redis", "amqptasks", "amqptasks", "Redis store", 15_000)
    res.add("rc_none", "celery", "celery", "ignore_result", 5_000)
    res.add("rc_redis", "celery", "celery", "redis backend", 2_000)
    return res


def _target(res: Results, start: str) -> tg.Target:
    return next(t for t in tg.targets(res) if t.name.startswith(start))


def _earlier(res: Results, start: str) -> list[str]:
    return next(t for t in tg.earlier(res) if t[0].startswith(start))


def test_workflow_times_invert_into_speedups_against_celery():
    res = _results()
    # amqptasks' best is its fastest configuration (2.0 s median), Celery's 6.0 s: 3× as fast.
    t = _target(res, "Group of N no-ops")
    assert (t.ratio, t.status) == ("3.00×", "met")
    assert t.ours.startswith("2.00 s (Redis store; asyncio)")
    assert t.reference.startswith("6.00 s (celery: redis backend; solo)")
    # The SQLite row is compared with Celery's redis backend: 6.0 / 5.0.
    assert _earlier(res, "group of N (SQLite store)")[1:] == ["1.20×", "not met"]
    # No chord measured: reported as not measured, not as a pass.
    t = _target(res, "Chord of N no-ops")
    assert (t.ours, t.ratio, t.status) == ("not measured", "—", "not measured")
    title = "Group of N no-ops → all results, SQLite"
    row = next(r for r in summary_rows(res) if r[0].startswith(title))
    assert row[1] == "5.00 (1 run)" and row[2] == "6.00 [5.50–6.50]" and row[5] == "0.83×"


def test_the_small_workflow_size_gives_the_celery_ratio_the_main_size_could_not():
    # Celery's group of N timed out (an error, no value); at the small n it finished.
    res = _results()
    res.fail("wf_chord_redis", "celery", "celery", "redis backend; solo", "no result within 310s")
    res.add("wf_chord_redis", "amqptasks", "amqptasks", "Redis store; asyncio", 4.0)
    res.add("wf_chord_redis_small", "amqptasks", "amqptasks", "Redis store; asyncio", 0.44)
    res.add("wf_chord_redis_small", "celery", "celery", "redis backend; solo", 2.34)
    res.add("wf_group_redis_small", "amqptasks", "amqptasks", "Redis store; asyncio", 0.31)
    res.add("wf_group_redis_small", "celery", "celery", "redis backend; solo", 0.5)
    assert _target(res, "Chord of N no-ops").status == "not measured"
    t = _target(res, "Chord of n no-ops")
    assert (t.ratio, t.status) == ("5.32×", "met")
    t = _target(res, "Group of n no-ops")
    assert (t.ratio, t.status) == ("1.61×", "not met")
    title = "Chord of n no-ops → body result, Redis store (n: where Celery finishes)"
    row = next(r for r in summary_rows(res) if r[0].startswith(title))
    assert row[1] == "0.44 (1 run)" and row[2] == "2.34 (1 run)"


def test_store_cost_is_against_the_same_contenders_no_results_figure():
    res = _results()
    assert _earlier(res, "the SQLite store")[1:] == ["40% lost", "not met"]
    assert _earlier(res, "the Redis store")[1:] == ["25% lost", "met"]
    rows = {(r[0], r[1]): r for r in cost_rows(res)}
    celery = rows[("Consume no-op with results: Redis store", "celery")]
    assert celery[4:] == ["0.40×", "60 %"]
    assert "### What a feature costs" in markdown(res, {}, {})


def test_nothing_measured_is_never_met():
    for t in tg.targets(Results()):
        assert t.status.startswith("not measured"), t
    for row in tg.earlier(Results()):
        assert row[1:] == ["not measured", "not measured"], row


def _add(res: Results, fig: str, fw: str, config: str, *values: float) -> None:
    group = fw if fw in ("amqptasks", "celery", "dramatiq") else "raw"
    for v in values:
        res.add(fig, fw, group, config, v)


def test_latency_targets_use_each_contenders_best_configuration():
    res = Results()
    _add(res, "lat_p50", "amqptasks", "asyncio pool", 0.70, 0.72, 0.71)
    _add(res, "lat_p50", "amqptasks", "threads pool", 0.90)
    # Dramatiq's best is --threads 1 (its lowest latency), not its first configuration.
    _add(res, "lat_p50", "dramatiq", "--threads 8", 1.0)
    _add(res, "lat_p50", "dramatiq", "--threads 1", 0.80)
    _add(res, "lat_p99", "amqptasks", "asyncio pool", 1.2)
    _add(res, "lat_p99", "dramatiq", "--threads 1", 1.1)
    t = _target(res, "Publish→start latency p50")
    assert (t.ratio, t.status) == ("0.89×", "met")
    assert "--threads 1" in t.reference
    t = _target(res, "Publish→start latency p99")
    assert (t.ratio, t.status) == ("1.09×", "not met")


def test_consume_target_is_against_raw_pika_with_batched_acks():
    res = Results()
    _add(res, "consume1", "amqptasks", "asyncio pool", 20_000)
    _add(res, "consume1", "raw-pika", "BlockingConnection, manual ack", 17_000)
    _add(res, "consume1", "raw-pika", "BlockingConnection, acks batched (multiple=True)", 30_000)
    _add(res, "consume1", "raw-aio-pika", "connect, acks batched", 50_000)  # not raw pika
    t = _target(res, "Consume no-op, 1 process")
    assert (t.ratio, t.status) == ("0.67×", "not met")
    assert "batched" in t.reference and "raw-pika" in t.reference


def test_round_trip_publish_loop_and_events_cost():
    res = Results()
    _add(res, "rpc_p50", "amqptasks", "asyncio pool", 1.0)
    _add(res, "rpc_p50", "raw-pika", "manual ack", 0.8)
    _add(res, "pub_loop_confirmed", "amqptasks", "noop.delay() loop", 1_500)
    _add(res, "pub_loop_confirmed", "raw-pika", "basic_publish loop", 1_600)
    _add(res, "consume1", "amqptasks", "asyncio pool", 20_000)
    _add(res, "consume1_events", "amqptasks", "asyncio pool, events on", 18_400)
    assert _target(res, "delay().get() p50").status == "met"  # 1.25× ≤ 1.3×
    t = _target(res, "Confirmed single-caller")
    assert (t.ratio, t.status) == ("0.94×", "not met")
    t = _target(res, "Events on cost")
    assert t.status == "met" and t.ours.endswith("8% lost")  # 8 % ≤ 10 %
    # An events-on figure never competes for the plain consume figure's best.
    assert res.best("consume1", "amqptasks").median == 20_000


def test_rss_flat_per_pool():
    res = Results()
    for pool, warm, final in (("threads", 39.0, 39.4), ("asyncio", 37.0, 40.0)):
        cfg = f"{pool} pool, -c 8; after 1,000,000 tasks"
        _add(res, "rss_warm", "amqptasks", cfg, warm)
        _add(res, "rss_final", "amqptasks", cfg, final)
        _add(res, "rss_growth", "amqptasks", cfg, final - warm)
    threads = _target(res, "N tasks through one worker, threads pool")
    assert threads.status == "met" and "+0.4 MiB" in threads.ours
    assert _target(res, "N tasks through one worker, asyncio pool").status == "not met"
    assert _target(res, "N tasks through one worker, processes pool").status == "not measured"


def test_scale_cells_are_counted_and_tabled():
    res = Results()
    _add(res, "scale_consume", "amqptasks", tg.scale_label(1, 1), 20_000)
    _add(res, "scale_publish", "amqptasks", tg.scale_label(1, 1), 12_000)
    t = _target(res, "Scale:")
    assert t.status == "not measured (16 of 18 cells)"
    for p in tg.SCALE_PROCESSES:
        for q in tg.SCALE_QUEUES:
            for fig in ("scale_consume", "scale_publish"):
                _add(res, fig, "amqptasks", tg.scale_label(p, q), 1000.0 * p)
    assert _target(res, "Scale:").status == "reported"
    header, rows = scale_rows(res, "scale_consume")
    assert header == ["processes", "1 queue(s)", "10 queue(s)", "100 queue(s)"]
    assert rows[2][0] == "4" and rows[2][3].startswith("4,000")
    # The scale figures have their own table, not summary rows.
    assert not [r for r in summary_rows(res) if r[0].startswith("Scale")]


def test_targets_table_comes_first_and_json_round_trips():
    res = _results()
    res.add("consume1", "amqptasks", "amqptasks", "asyncio pool", 20_000, window=5.4)
    res.add_samples("lat", "amqptasks", "asyncio pool", [0.5, 0.7])
    text = markdown(res, {"date": "2026-12-02 04:00 UTC"}, {"quick": True})
    assert text.index("## Targets (run of 2026-12-02 04:00 UTC") < text.index("## How to run")
    assert "| Chord of N no-ops ≥ 2× as fast as Celery (its Redis backend) |" in text
    assert "* **shortest throughput window**: 5.40 s" in text
    data = res.to_json()
    data["series"].append({**data["series"][0], "figure": "pub_pipelined"})  # older harness
    again = Results.from_json(data)
    assert again.samples == res.samples and again.shortest_window() == 5.4
    assert markdown(again, {}, {}) == markdown(res, {}, {})


def test_plots_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    res = _results()
    drawn = plots.write(res, tmp_path / "report.md")
    assert drawn == "plots skipped: matplotlib missing"
    assert "plots skipped: matplotlib missing" in markdown(res, {}, {}, plots=drawn)
    assert list(tmp_path.iterdir()) == []


def test_plots_are_written_next_to_the_report(tmp_path):
    pytest.importorskip("matplotlib")
    res = Results()
    for p in (1, 2):
        _add(res, "scale_consume", "amqptasks", tg.scale_label(p, 1), 1000.0 * p)
    _add(res, "lat_p50", "amqptasks", "asyncio pool", 0.6)
    res.add_samples("lat", "amqptasks", "asyncio pool", [0.5, 0.6, 0.7, 0.9])
    res.add_samples("rss", "amqptasks", "threads pool", [[0, 30.0], [1000, 31.0]])
    drawn = plots.write(res, tmp_path / "report.md")
    assert isinstance(drawn, list)
    assert sorted(p.file for p in drawn) == [
        "report-latency.png",
        "report-rss.png",
        "report-scale.png",
    ]
    for p in drawn:
        assert (tmp_path / p.file).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = markdown(res, {}, {}, plots=drawn)
    assert "](report-scale.png)" in text and "](report-latency.png)" in text


def test_a_configuration_that_timed_out_is_not_run_again_nor_retried(tmp_path) -> None:
    """A stuck peer costs its timeout once: the harness neither retries it nor runs it in
    later repeats, and its failure stays in the report."""
    from bench import measure
    from bench.procs import Procs, TimedOut

    class Fw:
        name, group = "celery", "celery"

    calls: list[int] = []
    logged: list[str] = []

    def stuck(r: int) -> None:
        calls.append(r)
        raise TimedOut("celery-workflows: no result within 310s")

    res = Results()
    ctx = measure.Ctx(Procs(tmp_path, tmp_path), tmp_path, res, None, logged.append, [])  # type: ignore[arg-type]
    for r in range(3):
        assert measure._try(ctx, "wf_group_redis", Fw(), "solo", stuck, r) is None  # type: ignore[arg-type]
    assert calls == [0]
    assert any("skipped, it timed out" in line for line in logged)
    series = res.series[("wf_group_redis", "celery", "solo")]
    assert len(series.errors) == 1 and "no result within" in series.errors[0]
