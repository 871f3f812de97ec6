"""Cluster-readiness in the pure layers: several broker addresses (YAML list or the
comma-separated form, each checked and redacted on its own), the failover order, quorum
queues everywhere with ``topology.default_queue_type``, and the text of a type mismatch."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest

from amqptasks.config import Settings, load_config, split_urls
from amqptasks.errors import BrokerError, BrokerRefused, ConfigError, PublishTimeout
from amqptasks.topology import DELAY_LEVELS, QueueSpec, build_topology
from amqptasks.transport.aio import _summarise, describe_mismatch
from amqptasks.transport.failover import Addresses, Attempts

BASE = """\
exchanges:
  tasks: {type: topic}
queues:
  web_tasks: {bindings: [{exchange: tasks, routing_key: "web.#"}]}
"""
A = "amqp://app:s3cret@node1:5681/prod"
B = "amqp://app:s3cret@node2:5682/prod"
C = "amqp://app:s3cret@node3:5683/prod"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "amqptasks.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# -- several addresses ------------------------------------------------------------------------
def test_broker_url_as_a_yaml_list(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + f"broker:\n  url: ['{A}', '{B}', '{C}']\n")
    broker = load_config(path, env={}).broker
    assert broker.urls == (A, B, C)
    assert broker.url == A  # the first, for what talks to one node


def test_broker_url_in_the_comma_separated_form(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + f"broker: {{url: '{A}, {B},{C}'}}\n")
    assert load_config(path, env={}).broker.urls == (A, B, C)


def test_the_environment_takes_the_comma_separated_form(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    settings = load_config(path, env={"AMQPTASKS_BROKER_URL": f"{A},{B}"})
    assert settings.broker.urls == (A, B)


def test_a_comma_inside_a_password_is_not_a_separator() -> None:
    url = "amqp://app:pa,ss@node1:5681/prod"
    assert split_urls(url) == [url]
    assert split_urls(f"{url},{B}") == [url, B]


def test_every_address_is_redacted_in_repr_and_display(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + f"broker:\n  url: ['{A}', '{B}']\n")
    settings = load_config(path, env={})
    for text in (repr(settings), repr(settings.broker), settings.broker.display):
        assert "s3cret" not in text
        assert "amqp://app:***@node1:5681/prod,amqp://app:***@node2:5682/prod" in text
    assert str(Addresses(settings.broker.urls)).count("***") == 2


@pytest.mark.parametrize(
    ("url", "key", "problem"),
    [
        (f"['{A}', 'redis://app:s3cret@node2/']", "broker.url[1]", "amqp:// or amqps:// URL"),
        (f"['{A}', 5682]", "broker.url[1]", "got an integer 5682"),
        (f"'{A},amqp://node2:99999/prod'", "broker.url[1]", "amqp://node2:99999/prod"),
        ("[]", "broker.url", "non-empty list"),
        (f"['{A}', 'amqp://app:s3cret@node2:5682/other']", "broker.url[1]", "same vhost"),
        (f"['{A}', '{A}']", "broker.url", "listed twice"),
        ("'amqp://node1:5681,node2:5682/'", "broker.url", "separate whole URLs"),
    ],
)
def test_a_bad_address_is_named_by_its_index(
    tmp_path: Path, url: str, key: str, problem: str
) -> None:
    path = write(tmp_path, BASE + f"broker:\n  url: {url}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.key == key
    assert problem in str(info.value)
    assert "s3cret" not in str(info.value)


def test_an_address_from_the_environment_is_named_by_its_index(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"AMQPTASKS_BROKER_URL": f"{A},http://node2/"})
    assert info.value.key == "$AMQPTASKS_BROKER_URL[1]"


# -- the failover order -------------------------------------------------------------------------
def test_failover_order_starts_after_the_address_that_failed() -> None:
    addresses = Addresses([A, B, C])
    assert addresses.round() == [A, B, C]
    addresses.failed(A)
    assert addresses.preferred == B
    assert addresses.round() == [B, C, A]  # the dead node last, not first
    addresses.failed(A)  # a stale report about a node no longer preferred changes nothing
    assert addresses.preferred == B
    addresses.failed(B)
    addresses.failed(C)
    assert addresses.preferred == A  # wraps around: a node that came back is used again
    addresses.answered(C)
    assert addresses.preferred == C


def test_one_address_is_always_preferred() -> None:
    addresses = Addresses(A)
    addresses.failed(A)
    assert addresses.round() == [A]
    with pytest.raises(ValueError):
        Addresses([])


# -- quorum everywhere --------------------------------------------------------------------------
def test_one_address_backs_off_between_attempts_and_gives_up_at_the_deadline() -> None:
    attempts = Attempts(Addresses(A), time.monotonic() + 60)
    assert 59 < attempts.share() <= 60  # all the time left: there is no other address
    lost = ConnectionResetError("reset")
    assert [attempts.closed(A, lost) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    with pytest.raises(PublishTimeout, match="nothing was published"):
        # One address that never answered: nothing else to try, no failure to name.
        Attempts(Addresses(A), time.monotonic() + 60).hung(A, 60)
    late = Attempts(Addresses(A), time.monotonic() - 1)
    with pytest.raises(BrokerError, match=r"unreachable; nothing was published.*reset"):
        late.closed(A, lost)


def test_a_refused_connection_retried_until_the_deadline_is_named() -> None:
    """The last attempt may be cut short by the deadline before it fails: the error is
    still why the broker cannot be reached, not a bare timeout."""
    attempts = Attempts(Addresses(A), time.monotonic() + 60)
    attempts.closed(A, BrokerError("cannot connect to broker: connection refused"))
    attempts.deadline = time.monotonic()
    with pytest.raises(BrokerError, match=r"unreachable.*connection refused") as caught:
        attempts.hung(A, 0.0)
    assert not isinstance(caught.value, PublishTimeout)
    # Another address's refusal is not why this one hung: a bare timeout for it.
    two = Attempts(Addresses([A, B]), time.monotonic() + 60)
    two.closed(A, BrokerError("cannot connect to broker: connection refused"))
    two.deadline = time.monotonic()
    with pytest.raises(PublishTimeout):
        two.hung(B, 0.0)


def test_several_addresses_are_tried_in_turn_and_paused_after_each_round() -> None:
    addresses = Addresses([A, B, C])
    attempts = Attempts(addresses, time.monotonic() + 30)
    assert 9 < attempts.share() <= 10  # a third of the time: two more to try after it
    attempts.hung(A, 10)  # a node that does not answer: the next one, no error yet
    assert addresses.preferred == B and attempts.tried == 1
    assert 14 < attempts.share() <= 15  # what is left, between the two not tried yet
    lost = ConnectionRefusedError("refused")
    assert attempts.closed(B, lost) == 0.0  # the third address at once
    assert attempts.closed(C, lost) == 0.1  # a whole round failed: back off
    attempts.opened(C)
    assert addresses.preferred == C


def test_a_refusal_is_raised_again_at_once() -> None:
    attempts = Attempts(Addresses([A, B]), time.monotonic() + 30)
    with pytest.raises(BrokerRefused, match="ACCESS_REFUSED"):
        attempts.closed(A, BrokerRefused("ACCESS_REFUSED: login refused", "access-refused"))
    assert attempts.tried == 0


def test_default_queue_type_quorum_makes_every_queue_quorum(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        BASE + "topology: {default_queue_type: quorum, replicas: 3}\n",
    )
    topo = load_config(path, env={}).topology
    assert topo.default_queue_type == "quorum" and topo.replicas == 3
    for q in topo.queues:
        if q.name == "amqptasks.revocations":  # a stream: replicated on every node already
            assert q.args["x-queue-type"] == "stream"
            continue
        assert q.args["x-queue-type"] == "quorum", q.name
        assert q.args["x-quorum-initial-group-size"] == 3, q.name
    work = topo.queue("web_tasks")
    assert work is not None
    # Work queues keep RabbitMQ's default dead-lettering and no overflow setting
    # (docs/cluster.md says why); only the delay levels hand messages on at-least-once.
    assert "x-dead-letter-strategy" not in work.args and "x-overflow" not in work.args


def test_quorum_delay_levels_dead_letter_at_least_once() -> None:
    topo = build_topology({}, [QueueSpec("a")], default_queue_type="quorum", replicas=2)
    levels = [q for q in topo.queues if q.role == "delay"]
    assert len(levels) == DELAY_LEVELS
    for q in levels:
        args = q.args
        assert args["x-queue-type"] == "quorum"
        assert args["x-quorum-initial-group-size"] == 2
        # at-least-once needs reject-publish: with drop-head RabbitMQ falls back silently
        assert args["x-dead-letter-strategy"] == "at-least-once"
        assert args["x-overflow"] == "reject-publish"
        assert "x-message-ttl" in args and "x-dead-letter-exchange" in args


def test_classic_stays_the_default() -> None:
    topo = Settings.from_mapping({"queues": {"a": {}}}).topology
    assert topo.default_queue_type == "classic"
    assert all("x-queue-type" not in q.args for q in topo.queues if q.role != "revocations")


def test_a_queue_can_stay_classic_under_a_quorum_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        BASE
        + "  urgent: {type: classic, max_priority: 5}\n"
        + "topology: {default_queue_type: quorum}\n",
    )
    topo = load_config(path, env={}).topology
    assert topo.queue_type("urgent") == "classic" and topo.queue_type("urgent.dlq") == "classic"
    assert topo.queue_type("web_tasks") == "quorum"
    assert "x-quorum-initial-group-size" not in (topo.queue("web_tasks") or topo).args  # type: ignore[union-attr]


def test_priorities_under_a_quorum_default_say_how_to_keep_one_queue_classic(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        BASE + "  urgent: {max_priority: 5}\ntopology: {default_queue_type: quorum}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.key == "queues.urgent.max_priority"
    assert "give this queue 'type: classic'" in str(info.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("topology: {default_queue_type: stream}\n", "topology.default_queue_type"),
        ("topology: {replicas: 0}\n", "topology.replicas"),
        ("topology: {replica: 3}\n", "topology.replica"),
        ("  other: {replicas: 3}\n", "queues.other.replicas"),
    ],
)
def test_topology_section_errors(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, BASE + text), env={})
    assert info.value.key == key


# -- a type mismatch with an existing queue ---------------------------------------------------
# RabbitMQ 3.10's words for it, both ways round.
CLASSIC_ON_BROKER = (
    "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'web_tasks' in vhost "
    "'/': received the value 'quorum' of type 'longstr' but current is none"
)
QUORUM_ON_BROKER = (
    "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'web_tasks.dlq' in vhost "
    "'/': received none but current is the value 'quorum' of type 'longstr'"
)


def test_a_type_mismatch_names_the_queue_both_types_and_the_way_out() -> None:
    text = describe_mismatch("queue", "web_tasks", CLASSIC_ON_BROKER)
    assert text.startswith(
        "queue 'web_tasks' is a classic queue on the broker, the config declares a quorum queue"
    )
    assert "set queues.web_tasks.type to classic" in text
    assert "let it drain, delete it" in text
    text = describe_mismatch("queue", "web_tasks.dlq", QUORUM_ON_BROKER)
    assert "is a quorum queue on the broker, the config declares a classic queue" in text
    assert "queues.web_tasks.type" in text


def test_delay_level_type_mismatches_are_one_line() -> None:
    problems = [
        (
            f"amqptasks.delay.{n}",
            describe_mismatch(
                "queue",
                f"amqptasks.delay.{n}",
                CLASSIC_ON_BROKER.replace("'web_tasks'", f"'amqptasks.delay.{n}'"),
            ),
        )
        for n in range(DELAY_LEVELS)
    ] + [("web_tasks", describe_mismatch("queue", "web_tasks", CLASSIC_ON_BROKER))]
    lines = _summarise(problems)
    assert len(lines) == 2
    assert lines[0].startswith(
        f"{DELAY_LEVELS} delay levels (amqptasks.delay.*) are classic queues on the broker"
    )
    assert "topology.default_queue_type" in lines[0]
    assert lines[1].startswith("queue 'web_tasks' is a classic queue")
