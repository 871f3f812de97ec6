"""Exchanges, queues and bindings as frozen values — and the only place broker names are derived.

A :class:`Topology` is built from the config by :func:`build_topology`; ``amqptasks topology show``
prints it and ``topology apply`` declares it. Every work queue gets dead-letter infrastructure:
the queue's ``x-dead-letter-exchange`` points at :data:`DLX_EXCHANGE` with its own name as the
routing key, and ``<queue>.dlq`` is bound there. The worker also publishes rejected messages
(with a reason header) through the same exchange, so broker-side and worker-side dead-lettering
land in one place.

Everything is durable: RabbitMQ 4.x refuses transient non-exclusive queues, and persistent
messages in a transient queue would not survive a restart anyway.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DLQ_SUFFIX",
    "DLX_EXCHANGE",
    "Binding",
    "Exchange",
    "Queue",
    "QueueSpec",
    "Topology",
    "build_topology",
    "dlq_name",
    "topic_matches",
]

DLX_EXCHANGE = "amqptasks.dlx"
DLQ_SUFFIX = ".dlq"

Args = tuple[tuple[str, Any], ...]


def dlq_name(queue: str) -> str:
    """The dead-letter queue of a work queue."""
    return queue + DLQ_SUFFIX


@dataclass(frozen=True, slots=True)
class Exchange:
    name: str
    type: str = "topic"
    durable: bool = True
    arguments: Args = ()


@dataclass(frozen=True, slots=True)
class Queue:
    name: str
    durable: bool = True
    arguments: Args = ()
    #: "work" queues are consumed by workers; "dead-letter" queues hold what failed.
    role: str = "work"

    @property
    def args(self) -> dict[str, Any]:
        return dict(self.arguments)


@dataclass(frozen=True, slots=True)
class Binding:
    exchange: str
    queue: str
    routing_key: str


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """What the config says about one work queue (input to :func:`build_topology`)."""

    name: str
    bindings: tuple[tuple[str, str], ...] = ()
    type: str = "classic"
    max_priority: int | None = None


@dataclass(frozen=True)
class Topology:
    exchanges: tuple[Exchange, ...] = ()
    queues: tuple[Queue, ...] = ()
    bindings: tuple[Binding, ...] = ()
    _by_queue: Mapping[str, Queue] = field(default_factory=dict, repr=False, compare=False)

    def queue(self, name: str) -> Queue | None:
        if not self._by_queue:
            object.__setattr__(self, "_by_queue", {q.name: q for q in self.queues})
        return self._by_queue.get(name)

    def work_queues(self) -> tuple[Queue, ...]:
        return tuple(q for q in self.queues if q.role == "work")

    def bindings_of(self, queue: str) -> tuple[Binding, ...]:
        return tuple(b for b in self.bindings if b.queue == queue)

    def subset(self, queues: Iterable[str]) -> Topology:
        """The part of the topology a worker consuming ``queues`` depends on (with DLQs)."""
        wanted = set(queues)
        wanted |= {dlq_name(q) for q in wanted}
        bindings = tuple(b for b in self.bindings if b.queue in wanted)
        exchange_names = {b.exchange for b in bindings}
        return Topology(
            exchanges=tuple(e for e in self.exchanges if e.name in exchange_names),
            queues=tuple(q for q in self.queues if q.name in wanted),
            bindings=bindings,
        )

    def reaches(self, exchange: str, routing_key: str) -> tuple[str, ...]:
        """Names of the queues a publish to ``exchange``/``routing_key`` would reach."""
        if exchange == "":
            return (routing_key,) if self.queue(routing_key) else ()
        types = {e.name: e.type for e in self.exchanges}
        kind = types.get(exchange)
        found = []
        for b in self.bindings:
            if b.exchange != exchange:
                continue
            if (
                (kind == "direct" and b.routing_key == routing_key)
                or (kind == "topic" and topic_matches(b.routing_key, routing_key))
                or kind == "fanout"
            ):
                found.append(b.queue)
        return tuple(dict.fromkeys(found))

    def describe(self) -> list[str]:
        """Human-readable lines: what ``topology show`` prints."""
        lines = ["exchanges:"]
        for e in self.exchanges:
            lines.append(f"  {e.name}  type={e.type} durable={str(e.durable).lower()}")
        lines.append("queues:")
        for q in self.queues:
            args = " ".join(f"{k}={v}" for k, v in q.arguments)
            lines.append(
                f"  {q.name}  role={q.role} durable={str(q.durable).lower()}  {args}".rstrip()
            )
        lines.append("bindings:")
        for b in self.bindings:
            lines.append(f"  {b.exchange} --[{b.routing_key}]--> {b.queue}")
        return lines


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: words split by '.', '*' is one word, '#' is zero or more words."""
    pat = pattern.split(".")
    key = routing_key.split(".")

    @functools.cache
    def match(i: int, j: int) -> bool:
        if i == len(pat):
            return j == len(key)
        if pat[i] == "#":
            return match(i + 1, j) or (j < len(key) and match(i, j + 1))
        return j < len(key) and pat[i] in ("*", key[j]) and match(i + 1, j + 1)

    return match(0, 0)


def build_topology(exchanges: Mapping[str, str], queues: Iterable[QueueSpec]) -> Topology:
    """Derive the full topology (work queues + dead-letter infrastructure) from the config."""
    ex = [Exchange(name, type_) for name, type_ in exchanges.items()]
    ex.append(Exchange(DLX_EXCHANGE, "direct"))
    qs: list[Queue] = []
    bs: list[Binding] = []
    for spec in queues:
        args: list[tuple[str, Any]] = [
            ("x-dead-letter-exchange", DLX_EXCHANGE),
            ("x-dead-letter-routing-key", spec.name),
        ]
        if spec.type == "quorum":
            args.append(("x-queue-type", "quorum"))
        if spec.max_priority is not None:
            args.append(("x-max-priority", spec.max_priority))
        qs.append(Queue(spec.name, arguments=tuple(args)))
        bs.extend(Binding(exchange, spec.name, key) for exchange, key in spec.bindings)
        dlq_args: tuple[tuple[str, Any], ...] = (
            (("x-queue-type", "quorum"),) if spec.type == "quorum" else ()
        )
        qs.append(Queue(dlq_name(spec.name), arguments=dlq_args, role="dead-letter"))
        bs.append(Binding(DLX_EXCHANGE, dlq_name(spec.name), spec.name))
    return Topology(tuple(ex), tuple(qs), tuple(bs))
