"""After a bad publish argument, ``.delay()`` in the same process still works end to end: the
next task is confirmed at once and a real worker runs it (no timeout, no duplicate)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from broker_fixtures import write_config

from amqptasks import App, load_config

BAD: list[dict[str, Any]] = [
    {"priority": 300},
    {"priority": -1},
    {"priority": True},
    {"headers": {"k": object()}},
    {"headers": {"k": 2**70}},
    {"headers": {1: "x"}},
    {"routing_key": "k" * 256},
    {"task_id": "i" * 256},
    {"countdown": float("nan")},
]


def test_delay_after_each_bad_option_is_confirmed_and_runs(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker)
    worker_factory(cfg, "-Q", "default")
    app = App(load_config(cfg, env={}))

    @app.task(name="examples.tasks.add")
    def add(x: int, y: int) -> int:
        return x + y

    try:
        assert add.delay(0, 0).get(timeout=20) == 0
        for i, options in enumerate(BAD):
            with pytest.raises(Exception) as err:
                add.apply_async((i, i), **options)
            start = time.monotonic()
            result = add.delay(i, 1)
            assert time.monotonic() - start < 3, options  # confirmed at once
            assert result.get(timeout=10) == i + 1, options
            # Refused by App.prepare, by name, before the wire (not a client library's error).
            assert isinstance(err.value, (TypeError, ValueError)), repr(err.value)
    finally:
        app.close()
    assert broker.depth("default") == 0 and broker.depth("default.dlq") == 0
