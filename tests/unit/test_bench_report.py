"""The benchmark report's arithmetic for the results and workflows figures (bench/report.py):
times invert into "× as fast", a store's cost is measured against the same contender's
no-results figure, and amqptasks' SQLite rows are set against Celery's redis backend."""

from __future__ import annotations

from bench.report import Results, cost_rows, markdown, summary_rows, targets


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


def _target(res: Results, start: str) -> tuple[str, str, str]:
    return next(t for t in targets(res) if t[0].startswith(start))


def test_workflow_times_invert_into_speedups_against_celery():
    res = _results()
    # amqptasks' best is its fastest configuration (2.0 s median), Celery's 6.0 s: 3× as fast.
    assert _target(res, "group of N (Redis store)") == (
        "group of N (Redis store) ≥ 2× as fast as Celery's redis backend",
        "3.00×",
        "yes",
    )
    # The SQLite row is compared with Celery's redis backend: 6.0 / 5.0.
    assert _target(res, "group of N (SQLite store)")[1:] == ("1.20×", "NO")
    # No chord measured: reported as n/a, not as a pass.
    assert _target(res, "chord of N (Redis store)")[1:] == ("n/a", "n/a")
    title = "Group of N no-ops → all results, SQLite"
    row = next(r for r in summary_rows(res) if r[0].startswith(title))
    assert row[1] == "5.00 (1 run)" and row[2] == "6.00 [5.50–6.50]" and row[5] == "0.83×"


def test_store_cost_is_against_the_same_contenders_no_results_figure():
    res = _results()
    assert _target(res, "the SQLite store")[1:] == ("40% lost", "NO")
    assert _target(res, "the Redis store")[1:] == ("25% lost", "yes")
    rows = {(r[0], r[1]): r for r in cost_rows(res)}
    celery = rows[("Consume no-op with results: Redis store", "celery")]
    assert celery[4:] == ["0.40×", "60 %"]
    assert "### What results cost" in markdown(res, {}, {})
