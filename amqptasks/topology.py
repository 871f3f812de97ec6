"""Exchanges, queues and bindings as frozen values — and the only place broker names are derived.

A :class:`Topology` is built from the config by :func:`build_topology`; ``amqptasks topology show``
prints it and ``topology apply`` declares it. Every work queue gets dead-letter infrastructure:
the queue's ``x-dead-letter-exchange`` points at :data:`DLX_EXCHANGE` with its own name as the
routing key, and ``<queue>.dlq`` is bound there. The worker also publishes rejected messages
(with a reason header) through the same exchange, so broker-side and worker-side dead-lettering
land in one place.

Delays (countdown, eta, retry backoff) are held by the broker in :data:`DELAY_LEVELS` fixed-TTL
queues (see :func:`delay_route` and docs/delays.md): no message ever waits in a worker's memory.

Events and control have an exchange each, derived too and declared with everything else:
:data:`EVENTS_EXCHANGE` (topic: routing keys ``task.<state>`` / ``worker.<state>``, see
docs/events.md) and :data:`CONTROL_EXCHANGE` (fanout: every worker's exclusive control queue
hears every command, see docs/control.md).

Revocations live in the broker too: :data:`REVOCATIONS_QUEUE` is a stream (``x-queue-type:
stream``) every worker reads from its first offset when it starts and then follows, so a
revoked task id never starts on any worker, one started after the revoke included
(docs/control.md). Fleet-wide rate limits keep their tokens in a queue per task, named by
:func:`rate_tokens_queue` / :func:`rate_lock_queue` (declared by the workers that need them).

Everything is durable: RabbitMQ 4.x refuses transient non-exclusive queues, and persistent
messages in a transient queue would not survive a restart anyway.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import RoutingError

__all__ = [
    "AT_LEAST_ONCE",
    "CONTROL_EXCHANGE",
    "DELAY_DELIVER_EXCHANGE",
    "DELAY_LEVELS",
    "DELAY_PREFIX",
    "DLQ_SUFFIX",
    "DLX_EXCHANGE",
    "EVENTS_EXCHANGE",
    "MAX_DELAY",
    "RATE_LIMIT_PREFIX",
    "RATE_LOCK_ARGUMENTS",
    "RESERVED_EXCHANGES",
    "REVOCATIONS_ARGUMENTS",
    "REVOCATIONS_QUEUE",
    "Binding",
    "Exchange",
    "ExchangeBinding",
    "Queue",
    "QueueSpec",
    "Topology",
    "build_topology",
    "delay_route",
    "delay_seconds",
    "dlq_name",
    "quorum_arguments",
    "rate_lock_queue",
    "rate_tokens_queue",
    "reserved_queue",
    "topic_matches",
]

DLX_EXCHANGE = "amqptasks.dlx"
EVENTS_EXCHANGE = "amqptasks.events"
CONTROL_EXCHANGE = "amqptasks.control"
#: Exchanges every topology has (a worker declares them whatever it consumes).
_FLEET_EXCHANGES = ((EVENTS_EXCHANGE, "topic"), (CONTROL_EXCHANGE, "fanout"))
DLQ_SUFFIX = ".dlq"
#: Binary delay levels: level n holds a message 2**n seconds. 22 levels reach 2**22 - 1 s
#: (48.5 days), more than the 30 days we promise, in at most 22 hops.
DELAY_LEVELS = 22
MAX_DELAY: int = 2**DELAY_LEVELS - 1
DELAY_PREFIX = "amqptasks.delay"
DELAY_DELIVER_EXCHANGE = "amqptasks.delay.deliver"
#: Exchange names the config may not use: they are derived here.
RESERVED_EXCHANGES = frozenset({DLX_EXCHANGE, EVENTS_EXCHANGE, CONTROL_EXCHANGE})
#: The stream of revocations (docs/control.md). ``x-max-age`` is the longest a revocation may
#: hold (the longest delay, 48.5 days, rounded up): RabbitMQ drops a segment only once all of
#: it is older, so nothing goes sooner. Small segments let that happen at all (a segment is
#: only dropped once the next one began; the default is 500 MB).
REVOCATIONS_QUEUE = "amqptasks.revocations"
REVOCATIONS_ARGUMENTS = (
    ("x-queue-type", "stream"),
    ("x-max-age", "49D"),
    ("x-stream-max-segment-size-bytes", 1_000_000),
)
RATE_LIMIT_PREFIX = "amqptasks.ratelimit."
#: A fleet rate limit's lock queue: the broker delivers only to one consumer at a time, which
#: holds the one lock message and refills the tokens (docs/reliability.md); spare lock
#: messages (each candidate brings one) are dropped beyond one.
RATE_LOCK_ARGUMENTS = (
    ("x-single-active-consumer", True),
    ("x-max-length", 1),
    ("x-overflow", "drop-head"),
)

Args = tuple[tuple[str, Any], ...]


def dlq_name(queue: str) -> str:
    """The dead-letter queue of a work queue."""
    return queue + DLQ_SUFFIX


def _task_part(task: str) -> str:
    # A queue name has at most 255 bytes; a long task name is cut and made unique by a digest.
    raw = task.encode()
    if len(raw) <= 200:
        return task
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return raw[:180].decode(errors="ignore") + "." + digest


def rate_tokens_queue(task: str) -> str:
    """The queue holding the fleet-wide rate-limit tokens of ``task``."""
    return RATE_LIMIT_PREFIX + _task_part(task)


def rate_lock_queue(task: str) -> str:
    """The single-active-consumer queue that elects the one worker refilling ``task``'s
    tokens."""
    return RATE_LIMIT_PREFIX + _task_part(task) + ".lock"


def reserved_queue(name: str) -> bool:
    """Queue names the config may not use: derived here (``amq.*`` is the broker's)."""
    return (
        name.startswith(("amq.", RATE_LIMIT_PREFIX))
        or name.endswith(DLQ_SUFFIX)
        or name == REVOCATIONS_QUEUE
    )


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
class ExchangeBinding:
    """An exchange-to-exchange binding (RabbitMQ extension): ``source`` forwards to
    ``destination`` what matches ``routing_key``."""

    source: str
    destination: str
    routing_key: str


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """What the config says about one work queue (input to :func:`build_topology`)."""

    name: str
    bindings: tuple[tuple[str, str], ...] = ()
    type: str = "classic"
    max_priority: int | None = None
    delivery_limit: int | None = None
    max_length: int | None = None
    #: Quorum queues: ``x-quorum-initial-group-size`` (None: the broker's default).
    replicas: int | None = None


def quorum_arguments(replicas: int | None) -> Args:
    """What makes a queue a quorum queue: its type, and its replication factor when given."""
    if replicas is None:
        return (("x-queue-type", "quorum"),)
    return (("x-queue-type", "quorum"), ("x-quorum-initial-group-size", replicas))


#: At-least-once dead-lettering (RabbitMQ 3.10+, quorum queues only): the queue re-publishes a
#: dead letter with publisher confirms and keeps it until the target queues confirmed, instead
#: of RabbitMQ's default fire-and-forget. It needs ``x-overflow: reject-publish`` (with
#: ``drop-head`` the broker silently falls back to at-most-once).
AT_LEAST_ONCE: Args = (
    ("x-dead-letter-strategy", "at-least-once"),
    ("x-overflow", "reject-publish"),
)


@dataclass(frozen=True)
class Topology:
    exchanges: tuple[Exchange, ...] = ()
    queues: tuple[Queue, ...] = ()
    bindings: tuple[Binding, ...] = ()
    exchange_bindings: tuple[ExchangeBinding, ...] = ()
    #: ``topology.default_queue_type``: also the type of the scheduler's lock and state queues.
    default_queue_type: str = "classic"
    #: ``topology.replicas``: quorum queues' initial group size (None: the broker's default).
    replicas: int | None = None
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
        """The part a worker consuming ``queues`` depends on: the queues, their DLQs, the
        delay infrastructure its retries travel through, and the events and control
        exchanges."""
        wanted = set(queues)
        wanted |= {dlq_name(q) for q in wanted}
        wanted |= {q.name for q in self.queues if q.role in ("delay", "revocations")}
        bindings = tuple(b for b in self.bindings if b.queue in wanted)
        exchange_names = {b.exchange for b in bindings}
        exchange_names |= {e.source for e in self.exchange_bindings}
        exchange_names |= {e.destination for e in self.exchange_bindings}
        exchange_names |= {name for name, _kind in _FLEET_EXCHANGES}
        return Topology(
            exchanges=tuple(e for e in self.exchanges if e.name in exchange_names),
            queues=tuple(q for q in self.queues if q.name in wanted),
            bindings=bindings,
            exchange_bindings=self.exchange_bindings,
            default_queue_type=self.default_queue_type,
            replicas=self.replicas,
        )

    def queue_type(self, name: str) -> str:
        """``classic`` or ``quorum``: what the config declares ``name`` as."""
        q = self.queue(name)
        return "quorum" if q is not None and q.args.get("x-queue-type") == "quorum" else "classic"

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

    def destinations(
        self, exchange: str, routing_key: str, delay: int
    ) -> tuple[tuple[str, str], ...]:
        """Where to publish a message for ``exchange``/``routing_key`` due in ``delay`` s.

        With no delay that is the route itself. A delayed message goes through the delay
        levels to each queue the route reaches in this topology (the broker cannot route a
        dead-lettered message by its original exchange), so a delay to a route that reaches no
        declared queue is refused here rather than lost at the end of the wait.
        """
        if delay < 1:
            return ((exchange, routing_key),)
        targets = self.reaches(exchange, routing_key)
        if not targets:
            raise RoutingError(
                f"cannot delay a message for exchange {exchange!r} routing key "
                f"{routing_key!r}: it reaches no queue declared in the config"
            )
        return tuple(delay_route(q, delay) for q in targets)

    def describe(self, everything: bool = False) -> list[str]:
        """Human-readable lines: what ``topology show`` prints.

        By default the delay infrastructure (dozens of objects nobody configures by hand) is
        one summary line and everything else is listed: the config's exchanges, queues and
        bindings plus the dead-letter exchange and queues. ``everything`` lists each object.
        """
        hide = (lambda name: False) if everything else _is_delay
        lines = ["exchanges:"]
        for e in self.exchanges:
            if not hide(e.name):
                lines.append(f"  {e.name}  type={e.type} durable={str(e.durable).lower()}")
        lines.append("queues:")
        for q in self.queues:
            if hide(q.name):
                continue
            args = " ".join(f"{k}={v}" for k, v in q.arguments)
            lines.append(
                f"  {q.name}  role={q.role} durable={str(q.durable).lower()}  {args}".rstrip()
            )
        lines.append("bindings:")
        for b in self.bindings:
            if not hide(b.exchange):
                lines.append(f"  {b.exchange} --[{b.routing_key}]--> {b.queue}")
        if everything:
            lines.append("exchange-to-exchange bindings (delay levels):")
            for x in self.exchange_bindings:
                lines.append(f"  {x.source} --[{x.routing_key}]--> exchange {x.destination}")
        else:
            lines.extend(self._delay_summary())
        return lines

    def _delay_summary(self) -> list[str]:
        levels = sorted(
            (int(q.name.rsplit(".", 1)[1]), int(q.args.get("x-message-ttl", 0)))
            for q in self.queues
            if q.role == "delay"
        )
        if not levels:
            return []
        exchanges = sum(_is_delay(e.name) for e in self.exchanges)
        bindings = sum(_is_delay(b.exchange) for b in self.bindings)
        longest = sum(ttl for _, ttl in levels) / 1000
        return [
            f"delay levels: {len(levels)} queues {DELAY_PREFIX}.{levels[0][0]}..{levels[-1][0]} "
            f"({_duration(levels[0][1] / 1000)} .. {_duration(longest)}), "
            f"{exchanges} exchanges, {bindings} bindings, "
            f"exchange-to-exchange bindings: {len(self.exchange_bindings)} (-v lists them)"
        ]


def _is_delay(name: str) -> bool:
    return name.startswith(DELAY_PREFIX + ".")


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}".replace(".0 ", " ")
    return f"{seconds:g} s"


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: words split by '.', '*' is one word, '#' is zero or more words.

    An empty pattern or routing key is zero words (as in RabbitMQ), not one empty word.
    """
    pat = pattern.split(".") if pattern else []
    key = routing_key.split(".") if routing_key else []

    @functools.cache
    def match(i: int, j: int) -> bool:
        if i == len(pat):
            return j == len(key)
        if pat[i] == "#":
            return match(i + 1, j) or (j < len(key) and match(i, j + 1))
        return j < len(key) and pat[i] in ("*", key[j]) and match(i + 1, j + 1)

    return match(0, 0)


def _level(n: int) -> str:
    return f"{DELAY_PREFIX}.{n}"


def delay_seconds(seconds: float) -> int:
    """Whole seconds of broker-side delay for ``seconds`` (rounded; capped at MAX_DELAY)."""
    whole: int = round(seconds)
    return max(0, min(MAX_DELAY, whole))


def delay_route(queue: str, seconds: int) -> tuple[str, str]:
    """(exchange, routing key) that delivers to ``queue`` after ``seconds`` (>= 1).

    The routing key is the delay in binary, one word per level from the highest, then the
    queue name: ``0.0.….1.0.1.<queue>``, published to the level of the highest set bit (the
    levels above would only forward it). Level n's exchange sends words with a ``1`` at its
    position into its queue (TTL 2**n s, dead-lettering on to level n-1's exchange, key kept)
    and forwards a ``0`` straight to level n-1. Level 0 ends at the deliver exchange, bound
    to each work queue with exactly :data:`DELAY_LEVELS` ``*`` words before the queue name, so
    one queue's name can never match another's.
    """
    if not 1 <= seconds <= MAX_DELAY:
        raise ValueError(f"delay must be 1..{MAX_DELAY} seconds, got {seconds}")
    bits = format(seconds, f"0{DELAY_LEVELS}b")
    # Enter at the level of the highest set bit: the levels above would only forward it.
    return _level(seconds.bit_length() - 1), ".".join(bits) + "." + queue


def _delay_infrastructure(
    work_queues: Iterable[str], queue_type: str = "classic", replicas: int | None = None
) -> tuple[list[Exchange], list[Queue], list[Binding], list[ExchangeBinding]]:
    # Quorum levels close the classic levels' gap: RabbitMQ's default dead-lettering (one
    # level to the next) is at-most-once, so a node crash mid-hop could lose a message; a
    # quorum level hands it on at-least-once (confirmed by the next queue, else retried).
    kind: Args = quorum_arguments(replicas) + AT_LEAST_ONCE if queue_type == "quorum" else ()
    exchanges = [Exchange(DELAY_DELIVER_EXCHANGE, "topic")]
    queues: list[Queue] = []
    bindings: list[Binding] = []
    xbindings: list[ExchangeBinding] = []
    for n in range(DELAY_LEVELS - 1, -1, -1):
        name = _level(n)
        onward = _level(n - 1) if n else DELAY_DELIVER_EXCHANGE
        prefix = "*." * (DELAY_LEVELS - 1 - n)
        exchanges.append(Exchange(name, "topic"))
        queues.append(
            Queue(
                name,
                role="delay",
                arguments=(
                    ("x-message-ttl", (2**n) * 1000),
                    ("x-dead-letter-exchange", onward),
                    *kind,
                ),
            )
        )
        bindings.append(Binding(name, name, prefix + "1.#"))
        xbindings.append(ExchangeBinding(name, onward, prefix + "0.#"))
    stars = "*." * DELAY_LEVELS
    bindings.extend(Binding(DELAY_DELIVER_EXCHANGE, q, stars + q) for q in work_queues)
    return exchanges, queues, bindings, xbindings


def build_topology(
    exchanges: Mapping[str, str],
    queues: Iterable[QueueSpec],
    *,
    default_queue_type: str = "classic",
    replicas: int | None = None,
) -> Topology:
    """Derive the full topology (work queues, dead-letter and delay infrastructure).

    ``default_queue_type`` is the type of the delay levels (and, through the config, of every
    queue that does not say); a quorum work queue's DLQ is a quorum queue too.
    """
    ex = [Exchange(name, type_) for name, type_ in exchanges.items()]
    ex.append(Exchange(DLX_EXCHANGE, "direct"))
    ex.extend(Exchange(name, kind) for name, kind in _FLEET_EXCHANGES)
    qs: list[Queue] = []
    bs: list[Binding] = []
    specs = list(queues)
    for spec in specs:
        args: list[tuple[str, Any]] = [
            ("x-dead-letter-exchange", DLX_EXCHANGE),
            ("x-dead-letter-routing-key", spec.name),
        ]
        quorum = spec.type == "quorum"
        if quorum:
            args.extend(quorum_arguments(spec.replicas))
        if spec.max_priority is not None:
            args.append(("x-max-priority", spec.max_priority))
        if spec.delivery_limit is not None:
            args.append(("x-delivery-limit", spec.delivery_limit))
        if spec.max_length is not None:
            # Never drop-head: a full queue refuses the publish, and the publisher is told.
            args.extend((("x-max-length", spec.max_length), ("x-overflow", "reject-publish")))
        qs.append(Queue(spec.name, arguments=tuple(args)))
        bs.extend(Binding(exchange, spec.name, key) for exchange, key in spec.bindings)
        dlq_args: Args = quorum_arguments(spec.replicas) if quorum else ()
        qs.append(Queue(dlq_name(spec.name), arguments=dlq_args, role="dead-letter"))
        bs.append(Binding(DLX_EXCHANGE, dlq_name(spec.name), spec.name))
    qs.append(Queue(REVOCATIONS_QUEUE, arguments=REVOCATIONS_ARGUMENTS, role="revocations"))
    dex, dqs, dbs, dxbs = _delay_infrastructure(
        (s.name for s in specs), default_queue_type, replicas
    )
    return Topology(
        tuple(ex + dex),
        tuple(qs + dqs),
        tuple(bs + dbs),
        tuple(dxbs),
        default_queue_type=default_queue_type,
        replicas=replicas,
    )
