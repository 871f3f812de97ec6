"""Schedules without a broker: interval and cron fire times (DST both ways, several zones),
catch-up policies, validation with key paths, and the scheduler's state document."""

from __future__ import annotations

import itertools
import sys
import types
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from amqptasks import ConfigError, Settings
from amqptasks.schedule import (
    Cron,
    Interval,
    Schedule,
    ScheduleFieldError,
    build_schedule,
    fires_between,
    format_utc,
    latest_fire,
    parse_duration,
    plan_catch_up,
    schedule,
)
from amqptasks.scheduler import collect_schedules, decode_state, encode_state

UTC = timezone.utc


def at(text: str) -> datetime:
    """An instant from ISO text with an offset (or Z)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def local(fires: list[datetime], tz: str) -> list[str]:
    return [f.astimezone(ZoneInfo(tz)).strftime("%m-%d %H:%M %z") for f in fires]


def cron_fires(expr: str, tz: str, after: str, until: str) -> list[datetime]:
    return list(fires_between(Cron.parse(expr, tz), at(after), at(until)))


# -- durations and intervals ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "seconds"),
    [(30, 30), ("30s", 30), ("5m", 300), ("1h", 3600), ("1h30m", 5400), ("2d", 172800)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "5", "5x", "1.5s", "5ms", "m", True, None, -3, [1]])
def test_bad_durations(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_interval_fires_on_a_grid_anchored_at_the_epoch():
    every = Interval(timedelta(seconds=30))
    assert every.next_after(at("2026-01-01T00:00:07Z")) == at("2026-01-01T00:00:30Z")
    assert every.next_after(at("2026-01-01T00:00:30Z")) == at("2026-01-01T00:01:00Z")
    daily = Interval(timedelta(days=1))
    assert daily.next_after(at("2026-03-08T13:00:00Z")) == at("2026-03-09T00:00:00Z")


def test_interval_does_not_drift_when_a_fire_is_late():
    every = Interval(timedelta(minutes=5))
    # Fired 4 minutes late: the next fire is still on the grid, not "late fire + 5m".
    assert every.next_after(at("2026-01-01T10:04:00Z")) == at("2026-01-01T10:05:00Z")
    fires = list(fires_between(every, at("2026-01-01T10:00:00Z"), at("2026-01-01T11:00:00Z")))
    assert len(fires) == 12 and all(f.minute % 5 == 0 and f.second == 0 for f in fires)


def test_interval_start_anchors_the_grid_and_nothing_fires_before_it():
    s = build_schedule(
        "report",
        {"task": "t", "every": "1h", "start": "2026-05-01T09:15:00", "timezone": "Asia/Shanghai"},
    )
    assert s.next_after(at("2026-01-01T00:00:00Z")) == at("2026-05-01T01:15:00Z")
    assert s.next_after(at("2026-05-01T01:15:00Z")) == at("2026-05-01T02:15:00Z")


def test_intervals_are_real_time_across_dst():
    s = build_schedule("i", {"task": "t", "every": "1h", "timezone": "America/New_York"})
    fires = list(fires_between(s.timing, at("2026-11-01T04:00:00Z"), at("2026-11-01T08:00:00Z")))
    assert [f - a for a, f in itertools.pairwise(fires)] == [timedelta(hours=1)] * 3


# -- cron -------------------------------------------------------------------------------------
def test_cron_in_utc_and_with_a_seconds_field():
    assert Cron.parse("*/15 * * * *").next_after(at("2026-01-01T10:07:00Z")) == at(
        "2026-01-01T10:15:00Z"
    )
    six = Cron.parse("*/10 * * * * *")  # seconds first
    assert six.next_after(at("2026-01-01T10:07:03Z")) == at("2026-01-01T10:07:10Z")
    assert Cron.parse("@daily").next_after(at("2026-01-01T10:00:00Z")) == at("2026-01-02T00:00:00Z")


def test_cron_in_a_zone_without_dst():
    fires = cron_fires(
        "0 9 * * 1-5", "Asia/Shanghai", "2026-11-01T00:00:00Z", "2026-11-04T00:00:00Z"
    )
    assert local(fires, "Asia/Shanghai") == ["11-02 09:00 +0800", "11-03 09:00 +0800"]
    assert fires[0] == at("2026-11-02T01:00:00Z")


@pytest.mark.parametrize(
    ("tz", "after", "until", "expected"),
    [
        # New York, 1 Nov 2026: 02:00 EDT -> 01:00 EST, 01:30 happens twice.
        (
            "America/New_York",
            "2026-10-31T00:00:00Z",
            "2026-11-03T00:00:00Z",
            ["10-31 01:30 -0400", "11-01 01:30 -0400", "11-02 01:30 -0500"],
        ),
        # Berlin, 25 Oct 2026: 03:00 CEST -> 02:00 CET, so 02:30 happens twice.
        (
            "Europe/Berlin",
            "2026-10-24T00:00:00Z",
            "2026-10-27T00:00:00Z",
            ["10-24 02:30 +0200", "10-25 02:30 +0200", "10-26 02:30 +0100"],
        ),
    ],
)
def test_fall_back_fires_a_daily_time_once_at_its_first_occurrence(tz, after, until, expected):
    expr = "30 1 * * *" if tz == "America/New_York" else "30 2 * * *"
    assert local(cron_fires(expr, tz, after, until), tz) == expected


@pytest.mark.parametrize(
    ("tz", "expr", "after", "until", "expected"),
    [
        # New York, 8 Mar 2026: 02:00 EST -> 03:00 EDT; 02:30 does not exist.
        (
            "America/New_York",
            "30 2 * * *",
            "2026-03-07T00:00:00Z",
            "2026-03-10T00:00:00Z",
            ["03-07 02:30 -0500", "03-08 03:00 -0400", "03-09 02:30 -0400"],
        ),
        # Berlin, 29 Mar 2026: 02:00 CET -> 03:00 CEST.
        (
            "Europe/Berlin",
            "30 2 * * *",
            "2026-03-28T00:00:00Z",
            "2026-03-31T00:00:00Z",
            ["03-28 02:30 +0100", "03-29 03:00 +0200", "03-30 02:30 +0200"],
        ),
        # Santiago, 6 Sep 2026: 00:00 -> 01:00, the gap starts at midnight.
        (
            "America/Santiago",
            "15 0 * * *",
            "2026-09-04T12:00:00Z",
            "2026-09-07T12:00:00Z",
            ["09-05 00:15 -0400", "09-06 01:00 -0300", "09-07 00:15 -0300"],
        ),
    ],
)
def test_spring_gap_fires_once_at_the_first_instant_after_it(tz, expr, after, until, expected):
    assert local(cron_fires(expr, tz, after, until), tz) == expected


def test_every_hour_schedules_fire_in_both_copies_of_the_repeated_hour():
    fires = cron_fires(
        "0,30 * * * *", "America/New_York", "2026-11-01T04:00:00Z", "2026-11-01T07:00:00Z"
    )
    assert local(fires, "America/New_York") == [
        "11-01 00:30 -0400",
        "11-01 01:00 -0400",
        "11-01 01:30 -0400",
        "11-01 01:00 -0500",
        "11-01 01:30 -0500",
        "11-01 02:00 -0500",
    ]
    assert [b - a for a, b in itertools.pairwise(fires)] == [timedelta(minutes=30)] * 5


def test_a_fixed_hour_is_not_repeated_even_with_a_minute_step():
    fires = cron_fires(
        "*/15 1 * * *", "America/New_York", "2026-11-01T04:00:00Z", "2026-11-01T08:00:00Z"
    )
    assert local(fires, "America/New_York") == [
        "11-01 01:00 -0400",
        "11-01 01:15 -0400",
        "11-01 01:30 -0400",
        "11-01 01:45 -0400",
    ]


def test_ticks_inside_a_spring_gap_collapse_into_one_firing():
    fires = cron_fires(
        "*/15 * * * *", "America/New_York", "2026-03-08T06:30:00Z", "2026-03-08T07:20:00Z"
    )
    assert local(fires, "America/New_York") == [
        "03-08 01:45 -0500",
        "03-08 03:00 -0400",
        "03-08 03:15 -0400",
    ]


def test_half_hour_dst_shift():
    # Lord Howe Island moves 30 minutes: 02:00 -> 01:30 on 5 Apr 2026.
    fires = cron_fires(
        "45 1 * * *", "Australia/Lord_Howe", "2026-04-03T00:00:00Z", "2026-04-06T00:00:00Z"
    )
    assert local(fires, "Australia/Lord_Howe") == [
        "04-04 01:45 +1100",
        "04-05 01:45 +1100",
        "04-06 01:45 +1030",
    ]


@pytest.mark.parametrize("tz", ["America/New_York", "Europe/Berlin", "Australia/Sydney"])
@pytest.mark.parametrize("expr", ["30 1 * * *", "30 2 * * *", "0 3 * * *"])
def test_a_daily_cron_fires_exactly_once_per_local_day_all_year(tz, expr):
    fires = cron_fires(expr, tz, "2025-12-31T12:00:00Z", "2026-12-31T12:00:00Z")
    days = [f.astimezone(ZoneInfo(tz)).date() for f in fires]
    assert len(days) == len(set(days))
    assert set(days) >= {date(2026, 1, 2) + timedelta(days=n) for n in range(363)}


@pytest.mark.parametrize("tz", ["America/New_York", "Europe/Berlin"])
@pytest.mark.parametrize(
    ("after", "until"),
    [
        ("2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z"),
        ("2026-10-20T00:00:00Z", "2026-11-10T00:00:00Z"),
    ],
)
def test_an_hourly_cron_fires_once_per_real_hour_across_dst(tz, after, until):
    fires = cron_fires("0 * * * *", tz, after, until)
    assert len(fires) == (at(until) - at(after)) // timedelta(hours=1)
    assert all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(fires))


# -- catch-up ---------------------------------------------------------------------------------
def test_catch_up_policies():
    every = Interval(timedelta(minutes=10))
    cursor, now = at("2026-01-01T10:00:00Z"), at("2026-01-01T10:35:00Z")
    assert plan_catch_up(every, cursor, now, "none") == []
    assert plan_catch_up(every, cursor, now, "one") == [at("2026-01-01T10:30:00Z")]
    assert plan_catch_up(every, cursor, now, "all") == [
        at("2026-01-01T10:10:00Z"),
        at("2026-01-01T10:20:00Z"),
        at("2026-01-01T10:30:00Z"),
    ]
    assert plan_catch_up(every, cursor, at("2026-01-01T10:05:00Z"), "all") == []


def test_catch_up_one_after_a_long_outage_does_not_walk_every_tick():
    every_second = Cron.parse("* * * * * *")
    last = latest_fire(every_second, at("2025-01-01T00:00:00Z"), at("2026-01-01T00:00:00.5Z"))
    assert last == at("2026-01-01T00:00:00Z")
    nightly = Cron.parse("30 1 * * *", "America/New_York")
    cursor = at("2026-10-30T00:00:00Z")
    assert plan_catch_up(nightly, cursor, at("2026-11-03T00:00:00Z"), "one") == [
        at("2026-11-02T06:30:00Z")
    ]
    assert len(plan_catch_up(nightly, cursor, at("2026-11-03T00:00:00Z"), "all")) == 4


# -- schedules: ids, jitter, validation -------------------------------------------------------
def test_fire_id_is_the_name_and_the_utc_fire_time():
    s = schedule("cleanup", "app.cleanup", every="1h")
    assert s.fire_id(at("2026-03-08T03:00:00-04:00")) == "cleanup:2026-03-08T07:00:00Z"
    assert format_utc(at("2026-03-08T07:00:00.25Z")) == "2026-03-08T07:00:00.250000Z"


def test_jitter_is_deterministic_and_bounded():
    s = schedule("spread", "app.t", every="1m", jitter="20s")
    fires = list(fires_between(s.timing, at("2026-01-01T00:00:00Z"), at("2026-01-01T02:00:00Z")))
    delays = [s.publish_at(f) - f for f in fires]
    assert all(timedelta(0) <= d <= timedelta(seconds=20) for d in delays)
    assert len(set(delays)) > 10
    again = schedule("spread", "app.t", every="1m", jitter="20s")
    assert [again.publish_at(f) - f for f in fires] == delays  # a successor computes the same


@pytest.mark.parametrize(
    ("fields", "key", "text"),
    [
        ({"every": "1m", "cron": "* * * * *"}, "every", "exactly one of 'every' or 'cron'"),
        ({}, "every", "exactly one of 'every' or 'cron'"),
        ({"cron": "61 * * * *"}, "cron", "invalid cron expression '61 * * * *': "),
        ({"cron": "0 0 31 2 *"}, "cron", "it never fires"),
        ({"cron": "* * *"}, "cron", "expected 5 fields"),
        ({"every": "soon"}, "every", "expected a duration"),
        ({"every": 0}, "every", "at least 1s"),
        (
            {"every": "1m", "timezone": "Asia/Shangai"},
            "timezone",
            "unknown time zone 'Asia/Shangai'",
        ),
        ({"every": "1m", "catch_up": "some"}, "catch_up", "none, one, all"),
        ({"every": "1m", "args": "x"}, "args", "expected a list"),
        ({"every": "1m", "kwargs": [1]}, "kwargs", "mapping"),
        ({"every": "1m", "queue": "q", "routing_key": "k"}, "queue", "either"),
        ({"cron": "* * * * *", "start": "2026-01-01"}, "start", "only applies to 'every'"),
        ({"every": "1m", "expires": "0s"}, "expires", "at least 1s"),
    ],
)
def test_validation_names_the_field(fields, key, text):
    with pytest.raises(ScheduleFieldError) as err:
        build_schedule("s", {"task": "app.t", **fields})
    assert err.value.key == key
    assert text in err.value.problem


def test_names_cannot_hold_the_id_separator():
    with pytest.raises(ScheduleFieldError, match="no ':'"):
        build_schedule("a:b", {"task": "t", "every": "1m"})


def test_python_api_errors_are_config_errors_with_the_key_path():
    with pytest.raises(ConfigError) as err:
        schedule("cleanup", "app.cleanup", cron="61 * * * *")
    assert err.value.key == "schedules.cleanup.cron"
    assert str(err.value).startswith(
        "<python>: schedules.cleanup.cron: invalid cron expression '61 * * * *'"
    )


# -- config -----------------------------------------------------------------------------------
CONFIG = {
    "exchanges": {"tasks": {"type": "topic"}},
    "queues": {"default": {"bindings": [{"exchange": "tasks", "routing_key": "task.#"}]}},
    "default_route": {"exchange": "tasks", "routing_key": "task.default"},
}


def settings(**extra):
    return Settings.from_mapping({**CONFIG, **extra}, source="amqptasks.yaml")


def test_config_schedules_and_default_timezone():
    s = settings(
        timezone="Asia/Shanghai",
        schedules={
            "morning": {"task": "app.report", "cron": "0 9 * * *", "args": [1]},
            "berlin": {"task": "app.report", "cron": "0 9 * * *", "timezone": "Europe/Berlin"},
            "tick": {"task": "app.tick", "every": "30s", "queue": "default", "catch_up": "all"},
        },
    )
    morning, berlin, tick = s.schedules
    assert s.timezone == "Asia/Shanghai"
    assert morning.timezone == "Asia/Shanghai" and morning.args == (1,)
    assert morning.next_after(at("2026-01-01T00:00:00Z")) == at("2026-01-01T01:00:00Z")
    assert berlin.next_after(at("2026-01-01T00:00:00Z")) == at("2026-01-01T08:00:00Z")
    assert tick.queue == "default" and tick.catch_up == "all"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"schedules": {"cleanup": {"task": "app.t", "cron": "61 * * * *"}}},
            "amqptasks.yaml: schedules.cleanup.cron: invalid cron expression '61 * * * *': ",
        ),
        (
            {"schedules": {"cleanup": {"task": "app.t", "cron": "* * * * *", "cronn": 1}}},
            "amqptasks.yaml: schedules.cleanup.cronn: unknown key",
        ),
        (
            {"schedules": {"cleanup": {"task": "app.t", "every": "1m", "queue": "nope"}}},
            "amqptasks.yaml: schedules.cleanup.queue: task 'app.t' would be published to "
            "exchange '' with routing key 'nope', which reaches no declared queue",
        ),
        (
            {"schedules": {"c": {"task": "app.t", "every": "1m", "routing_key": "web.x"}}},
            "amqptasks.yaml: schedules.c.routing_key: task 'app.t' would be published",
        ),
        (
            {"timezone": "Mars/Olympus"},
            "amqptasks.yaml: timezone: unknown time zone 'Mars/Olympus'",
        ),
        ({"schedules": ["x"]}, "amqptasks.yaml: schedules: expected a mapping"),
    ],
)
def test_config_errors_name_file_and_key_path(extra, message):
    with pytest.raises(ConfigError) as err:
        settings(**extra)
    assert str(err.value).startswith(message)


def test_a_schedule_needs_a_route():
    config = {k: v for k, v in CONFIG.items() if k != "default_route"}
    with pytest.raises(ConfigError, match=r"schedules\.x\.task: no route for task 'app\.t'"):
        Settings.from_mapping(
            {**config, "schedules": {"x": {"task": "app.t", "every": "1m"}}}, source="f"
        )


# -- scheduler: state document and Python schedules ------------------------------------------
def test_state_document_round_trip_and_garbage():
    cursors = {"a": at("2026-01-01T00:00:01Z"), "b": at("2026-03-08T07:00:00Z")}
    body = encode_state(cursors, "beat@host", at("2026-03-08T07:00:00.5Z"))
    assert decode_state(body) == cursors
    assert decode_state(None) == {}
    assert decode_state(b"{not json") == {}
    assert decode_state(b'{"v": 99, "cursors": {}}') == {}


def test_python_schedules_are_collected_from_imported_modules(monkeypatch):
    module = types.ModuleType("beat_test_module")
    module.nightly = schedule("nightly", "app.t", cron="0 3 * * *")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "beat_test_module", module)
    s = settings(
        imports=["beat_test_module"],
        schedules={"tick": {"task": "app.t", "every": "1m"}},
    )
    assert [x.name for x in collect_schedules(s)] == ["tick", "nightly"]
    module.tick = schedule("tick", "app.t", every="5m")  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"schedules\.tick: already defined in amqptasks\.yaml"):
        collect_schedules(s)
    assert isinstance(module.nightly, Schedule)
