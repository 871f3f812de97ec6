"""Topology values: derived dead-letter infrastructure, topic matching, reachability, subsets."""

from __future__ import annotations

import pytest

from amqptasks.topology import (
    CONTROL_EXCHANGE,
    DLX_EXCHANGE,
    EVENTS_EXCHANGE,
    Binding,
    Exchange,
    Queue,
    QueueSpec,
    Topology,
    build_topology,
    dlq_name,
    topic_matches,
)


@pytest.fixture
def topology() -> Topology:
    return build_topology(
        {"tasks": "topic", "direct_tasks": "direct", "broadcast": "fanout"},
        [
            QueueSpec("default", (("tasks", "task.#"),)),
            QueueSpec("web_tasks", (("tasks", "web.*"), ("tasks", "#.render"))),
            QueueSpec("queue_add", (("direct_tasks", "queue_add"),), type="quorum"),
            QueueSpec("urgent", (("direct_tasks", "urgent"),), max_priority=10),
            QueueSpec("all", (("broadcast", "ignored"),)),
            QueueSpec("lonely"),
        ],
    )


def names(queues: tuple[Queue, ...], *roles: str) -> list[str]:
    """Queue names with one of ``roles`` (other derived infrastructure, e.g. delays, aside)."""
    return [q.name for q in queues if q.role in roles]


# -- build_topology -----------------------------------------------------------------------------
def test_exchanges_include_the_declared_ones_and_the_dead_letter_exchange(
    topology: Topology,
) -> None:
    assert topology.exchanges[:4] == (
        Exchange("tasks", "topic"),
        Exchange("direct_tasks", "direct"),
        Exchange("broadcast", "fanout"),
        Exchange(DLX_EXCHANGE, "direct"),
    )
    assert all(e.durable for e in topology.exchanges)


def test_events_and_control_exchanges_are_derived_and_in_every_subset(
    topology: Topology,
) -> None:
    kinds = {e.name: e.type for e in topology.exchanges}
    assert kinds[EVENTS_EXCHANGE] == "topic"  # routing keys task.<state> / worker.<state>
    assert kinds[CONTROL_EXCHANGE] == "fanout"  # every worker hears every command
    for queues in (["web_tasks"], ["lonely"], []):
        sub = {e.name: e.type for e in topology.subset(queues).exchanges}
        assert sub[EVENTS_EXCHANGE] == "topic" and sub[CONTROL_EXCHANGE] == "fanout"
    shown = "\n".join(topology.describe())
    assert f"{EVENTS_EXCHANGE}  type=topic durable=true" in shown
    assert f"{CONTROL_EXCHANGE}  type=fanout durable=true" in shown


def test_every_work_queue_gets_a_dead_letter_queue(topology: Topology) -> None:
    assert names(topology.queues, "work", "dead-letter") == [
        "default",
        "default.dlq",
        "web_tasks",
        "web_tasks.dlq",
        "queue_add",
        "queue_add.dlq",
        "urgent",
        "urgent.dlq",
        "all",
        "all.dlq",
        "lonely",
        "lonely.dlq",
    ]
    assert [q.name for q in topology.work_queues()] == [
        "default",
        "web_tasks",
        "queue_add",
        "urgent",
        "all",
        "lonely",
    ]
    assert all(q.durable for q in topology.queues)
    for q in topology.work_queues():
        dlq = topology.queue(dlq_name(q.name))
        assert dlq is not None and dlq.role == "dead-letter"
        assert Binding(DLX_EXCHANGE, dlq.name, q.name) in topology.bindings


def test_work_queue_dead_letters_to_its_dlq_through_the_dlx(topology: Topology) -> None:
    default = topology.queue("default")
    assert default is not None
    assert default.args == {
        "x-dead-letter-exchange": DLX_EXCHANGE,
        "x-dead-letter-routing-key": "default",
    }
    dlq = topology.queue("default.dlq")
    assert dlq is not None and dlq.args == {}
    assert topology.reaches(DLX_EXCHANGE, "default") == ("default.dlq",)


def test_quorum_type_is_on_the_queue_and_its_dlq(topology: Topology) -> None:
    queue = topology.queue("queue_add")
    dlq = topology.queue("queue_add.dlq")
    assert queue is not None and dlq is not None
    assert queue.args["x-queue-type"] == "quorum"
    assert queue.args["x-dead-letter-exchange"] == DLX_EXCHANGE
    assert dlq.args == {"x-queue-type": "quorum"}


def test_max_priority_is_on_the_work_queue_only(topology: Topology) -> None:
    urgent = topology.queue("urgent")
    dlq = topology.queue("urgent.dlq")
    assert urgent is not None and dlq is not None
    assert urgent.args["x-max-priority"] == 10
    assert "x-queue-type" not in urgent.args
    assert "x-max-priority" not in dlq.args


def test_bindings_follow_the_specs(topology: Topology) -> None:
    assert [b for b in topology.bindings_of("web_tasks") if b.exchange == "tasks"] == [
        Binding("tasks", "web_tasks", "web.*"),
        Binding("tasks", "web_tasks", "#.render"),
    ]
    declared = ("tasks", "direct_tasks", "broadcast")
    assert [b for b in topology.bindings_of("lonely") if b.exchange in declared] == []
    assert topology.bindings_of("lonely.dlq") == (Binding(DLX_EXCHANGE, "lonely.dlq", "lonely"),)


def test_queue_lookup(topology: Topology) -> None:
    assert topology.queue("default") == topology.queues[0]
    assert topology.queue("missing") is None
    assert Topology().queue("default") is None


def test_topology_is_a_frozen_value(topology: Topology) -> None:
    with pytest.raises(AttributeError):
        topology.queues = ()  # type: ignore[misc]
    with pytest.raises(AttributeError):
        topology.queues[0].name = "x"  # type: ignore[misc]


# -- topic matching -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("task.add", "task.add", True),
        ("task.add", "task.sub", False),
        ("task.add", "task.add.x", False),
        ("task.#", "task", True),  # '#' is zero or more words
        ("task.#", "task.a", True),
        ("task.#", "task.a.b", True),
        ("task.#", "tasks.a", False),
        ("task.#", "other.task.a", False),
        ("task.*", "task.a", True),  # '*' is exactly one word
        ("task.*", "task", False),
        ("task.*", "task.a.b", False),
        ("*.x", "a.x", True),
        ("*.x", "x", False),
        ("*.x", "a.b.x", False),
        ("#.x", "x", True),
        ("#.x", "a.b.x", True),
        ("#.x", "x.a", False),
        ("#", "", True),
        ("#", "anything.at.all", True),
        ("a.#.z", "a.z", True),
        ("a.#.z", "a.b.c.z", True),
        ("a.#.z", "a.b.c", False),
        ("a.*.#", "a", False),
        ("a.*.#", "a.b", True),
        ("a.*.#", "a.b.c.d", True),
        ("#.#", "a.b", True),
        ("*.*", "a.b", True),
        ("*.*", "a", False),
        ("a.*", "a.", True),  # the empty word after a trailing dot is a word
        ("", "", True),
        ("", "a", False),
        ("task", "TASK", False),
        ("task.#", "task#", False),
    ],
)
def test_topic_matches(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches


# RabbitMQ splits an empty routing key (or pattern) into zero words, not one empty word.
@pytest.mark.parametrize(("pattern", "key"), [("*", ""), ("#.*", "")])
def test_empty_routing_key_has_no_words(pattern: str, key: str) -> None:
    assert topic_matches(pattern, key) is False


def test_topic_matching_long_keys_is_not_exponential() -> None:
    key = ".".join(["w"] * 200)
    assert topic_matches("#.#.#.#.#.#.#.#.x", key) is False
    assert topic_matches("#.#.#.#.#.#.#.#.w", key) is True


# -- reaches ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("exchange", "key", "queues"),
    [
        ("tasks", "task.add", ("default",)),
        ("tasks", "task", ("default",)),
        ("tasks", "web.page", ("web_tasks",)),
        ("tasks", "web.page.render", ("web_tasks",)),
        ("tasks", "task.render", ("default", "web_tasks")),
        ("tasks", "web.render", ("web_tasks",)),  # two bindings, one queue, listed once
        ("tasks", "mail.send", ()),
        ("direct_tasks", "queue_add", ("queue_add",)),
        ("direct_tasks", "queue_*", ()),  # direct exchanges compare keys literally
        ("broadcast", "anything", ("all",)),
        ("", "lonely", ("lonely",)),  # the default exchange reaches a queue by name
        ("", "lonely.dlq", ("lonely.dlq",)),
        ("", "missing", ()),
        ("undeclared", "task.add", ()),
        (DLX_EXCHANGE, "web_tasks", ("web_tasks.dlq",)),
    ],
)
def test_reaches(topology: Topology, exchange: str, key: str, queues: tuple[str, ...]) -> None:
    assert topology.reaches(exchange, key) == queues


# -- subset -------------------------------------------------------------------------------------
def test_subset_keeps_what_a_worker_on_those_queues_needs(topology: Topology) -> None:
    sub = topology.subset(["web_tasks", "queue_add"])

    assert names(sub.queues, "work", "dead-letter") == [
        "web_tasks",
        "web_tasks.dlq",
        "queue_add",
        "queue_add.dlq",
    ]
    exchanges = [e.name for e in sub.exchanges]
    assert {"tasks", "direct_tasks", DLX_EXCHANGE} <= set(exchanges)
    assert "broadcast" not in exchanges
    shown = ("tasks", "direct_tasks", DLX_EXCHANGE)
    assert {b for b in sub.bindings if b.exchange in shown} == {
        Binding("tasks", "web_tasks", "web.*"),
        Binding("tasks", "web_tasks", "#.render"),
        Binding(DLX_EXCHANGE, "web_tasks.dlq", "web_tasks"),
        Binding("direct_tasks", "queue_add", "queue_add"),
        Binding(DLX_EXCHANGE, "queue_add.dlq", "queue_add"),
    }
    assert sub.queue("default") is None
    assert not any(b.queue in ("default", "default.dlq", "all") for b in sub.bindings)
    assert sub.reaches("tasks", "task.render") == ("web_tasks",)


def test_subset_of_an_unbound_queue_still_has_its_dead_letter_path(topology: Topology) -> None:
    sub = topology.subset(["lonely"])
    assert names(sub.queues, "work", "dead-letter") == ["lonely", "lonely.dlq"]
    assert sub.reaches(DLX_EXCHANGE, "lonely") == ("lonely.dlq",)
    assert not {"tasks", "direct_tasks", "broadcast"} & {e.name for e in sub.exchanges}


def test_subset_ignores_unknown_names(topology: Topology) -> None:
    sub = topology.subset(["missing"])
    assert names(sub.queues, "work", "dead-letter") == []
    assert not {"tasks", "direct_tasks", "broadcast"} & {e.name for e in sub.exchanges}


def test_describe_lists_everything(topology: Topology) -> None:
    lines = topology.subset(["queue_add"]).describe()
    for expected in (
        "exchanges:",
        "  direct_tasks  type=direct durable=true",
        f"  {DLX_EXCHANGE}  type=direct durable=true",
        "queues:",
        "  queue_add  role=work durable=true  x-dead-letter-exchange=amqptasks.dlx "
        "x-dead-letter-routing-key=queue_add x-queue-type=quorum",
        "  queue_add.dlq  role=dead-letter durable=true  x-queue-type=quorum",
        "bindings:",
        "  direct_tasks --[queue_add]--> queue_add",
        f"  {DLX_EXCHANGE} --[queue_add]--> queue_add.dlq",
    ):
        assert expected in lines
    assert lines.index("exchanges:") < lines.index("queues:") < lines.index("bindings:")


def test_describe_summarises_the_delay_levels_in_one_line() -> None:
    topology = build_topology(
        {"tasks": "topic"}, [QueueSpec("a", (("tasks", "a.#"),)), QueueSpec("b")]
    )
    lines = topology.describe()
    assert lines == [
        "exchanges:",
        "  tasks  type=topic durable=true",
        f"  {DLX_EXCHANGE}  type=direct durable=true",
        "  amqptasks.events  type=topic durable=true",
        "  amqptasks.control  type=fanout durable=true",
        "queues:",
        "  a  role=work durable=true  x-dead-letter-exchange=amqptasks.dlx "
        "x-dead-letter-routing-key=a",
        "  a.dlq  role=dead-letter durable=true",
        "  b  role=work durable=true  x-dead-letter-exchange=amqptasks.dlx "
        "x-dead-letter-routing-key=b",
        "  b.dlq  role=dead-letter durable=true",
        "  amqptasks.revocations  role=revocations durable=true  x-queue-type=stream "
        "x-max-age=49D x-stream-max-segment-size-bytes=1000000",
        "bindings:",
        "  tasks --[a.#]--> a",
        f"  {DLX_EXCHANGE} --[a]--> a.dlq",
        f"  {DLX_EXCHANGE} --[b]--> b.dlq",
        "delay levels: 22 queues amqptasks.delay.0..21 (1 s .. 48.5 days), 23 exchanges, "
        "24 bindings, exchange-to-exchange bindings: 22 (-v lists them)",
    ]
    assert not any("amqptasks.delay" in line for line in lines[:-1])


def test_describe_everything_lists_every_object() -> None:
    topology = build_topology({"tasks": "topic"}, [QueueSpec("a", (("tasks", "a.#"),))])
    lines = topology.describe(everything=True)
    # 23 exchanges, 22 queues, 22 + 1 bindings, 22 exchange-to-exchange bindings
    assert sum(line.startswith("  amqptasks.delay.") for line in lines) == 23 + 22 + 23 + 22
    assert (
        "  amqptasks.delay.21  role=delay durable=true  x-message-ttl=2097152000 "
        "x-dead-letter-exchange=amqptasks.delay.20" in lines
    )
    assert "  amqptasks.delay.deliver --[" + "*." * 22 + "a]--> a" in lines
    assert (
        "  amqptasks.delay.0 --[" + "*." * 21 + "0.#]--> exchange amqptasks.delay.deliver" in lines
    )
    assert not any(line.startswith("delay levels:") for line in lines)
    assert len(lines) > 3 * len(topology.describe())


def test_queue_args_property() -> None:
    assert Queue("q", arguments=(("a", 1), ("b", "x"))).args == {"a": 1, "b": "x"}
