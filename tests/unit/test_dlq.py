"""Dead letters as a person reads them, and replay preparation."""

from __future__ import annotations

from amqptasks.dlq import describe, replay_message, replay_skip_reason
from amqptasks.protocol import Properties, loads


def test_describe_reads_worker_headers():
    props = Properties(
        message_id="m1",
        headers={
            "x-amqptasks-reason": "task-failed",
            "x-amqptasks-attempts": 4,
            "x-amqptasks-exception-type": "ValueError",
            "x-amqptasks-exception-message": "bad",
            "x-amqptasks-original-exchange": "tasks",
            "x-amqptasks-original-routing-key": "task.x",
            "x-amqptasks-last-failed-at": "2026-01-01T00:00:00+00:00",
        },
    )
    d = describe(b'{"task": "a.b", "args": []}', props, "amqptasks.dlx", "q")
    assert (d.id, d.task, d.reason, d.attempts) == ("m1", "a.b", "task-failed", 4)
    assert d.exception == "ValueError: bad"
    assert (d.original_exchange, d.original_routing_key) == ("tasks", "task.x")


def test_describe_reads_broker_dead_lettering_and_undecodable_bodies():
    props = Properties(
        headers={
            "x-death": [
                {
                    "reason": "delivery_limit",
                    "count": 3,
                    "exchange": "tasks",
                    "routing-keys": ["task.default"],
                }
            ]
        }
    )
    d = describe(b"\xff not json", props)
    assert d.reason == "broker:delivery_limit" and d.attempts == 3
    assert (d.original_exchange, d.original_routing_key) == ("tasks", "task.default")
    assert d.task == "<undecodable>"


def test_replay_resets_attempts_and_drops_dead_letter_headers():
    props = Properties(
        message_id="m1",
        reply_to="amq.rabbitmq.reply-to.x",
        headers={"x-amqptasks-reason": "task-failed", "x-death": [], "tenant": "a"},
    )
    body, out = replay_message(b'{"task": "t", "args": [1], "retries": 3}', props)
    assert loads(body) == {"task": "t", "args": [1]}
    assert out.headers == {"tenant": "a"} and out.message_id == "m1"
    assert out.reply_to is None and out.delivery_mode == 2


def test_replay_keeps_undecodable_bodies_untouched():
    body, _ = replay_message(b"{broken", Properties())
    assert body == b"{broken"


# -- one id: the decoder's rule ------------------------------------------------------------
def test_the_id_is_the_body_id_before_the_message_id():
    both = describe(b'{"task": "t", "id": "from-body"}', Properties(message_id="from-prop"))
    assert both.id == "from-body"  # what decode() and therefore the worker's log use
    assert describe(b'{"task": "t"}', Properties(message_id="from-prop")).id == "from-prop"
    assert describe(b'{"task": "t", "id": ""}', Properties(message_id="p")).id == "p"
    assert describe(b'{"task": "t", "id": 5}', Properties(message_id="p")).id == "p"
    assert describe(b"\xff", Properties(message_id="p")).id == "p"
    assert describe(b'{"task": "t"}', Properties()).id == ""


def test_replay_skips_exactly_the_reasons_that_fail_again_unchanged():
    def reason(r: str) -> str | None:
        return replay_skip_reason(describe(b"{}", Properties(headers={"x-amqptasks-reason": r})))

    for r in ("decode-error", "content-type-refused", "too-large", "expired"):
        assert reason(r), r
    for r in ("unknown-task", "task-failed", "time-limit", "worker-lost"):
        assert reason(r) is None, r
    broker_dead = describe(b"{}", Properties(headers={"x-death": [{"reason": "rejected"}]}))
    assert broker_dead.reason == "broker:rejected" and replay_skip_reason(broker_dead) is None
