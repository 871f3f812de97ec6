"""App wiring that needs no broker."""

from __future__ import annotations

import threading

from amqptasks import App
from amqptasks.topology import delay_route


def test_first_use_of_publisher_loads_settings_without_deadlock(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("broker: {url: 'amqp://guest:guest@127.0.0.1:1/%2F'}\n")
    app = App.from_config(cfg)
    done = threading.Event()

    def first_use() -> None:
        app.publisher  # noqa: B018 - reads settings under the app lock
        done.set()

    t = threading.Thread(target=first_use, daemon=True)
    t.start()
    assert done.wait(5), "App.publisher deadlocked on first use"
    app.close()


def test_delay_enters_at_the_highest_set_bit():
    assert delay_route("q", 1)[0] == "amqptasks.delay.0"
    assert delay_route("q", 5)[0] == "amqptasks.delay.2"
    assert delay_route("q", 600)[0] == "amqptasks.delay.9"
    assert delay_route("q", 600)[1].endswith(".1.0.0.1.0.1.1.0.0.0.q")
