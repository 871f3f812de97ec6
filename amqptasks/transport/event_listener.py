"""Listening to events: a queue bound to the events exchange, read with pika's blocking client
(``amqptasks events``; the dashboard can do the same from any AMQP client).

Two kinds of queue, both allowed by RabbitMQ 4.x (which refuses transient non-exclusive
ones):

* a live tail: a server-named, exclusive, auto-delete queue bound with the listener's filter
  (the broker drops what it does not want); it dies with the connection, and so do the
  events nobody read;
* a durable named queue bound with ``#`` (a durable queue outlives any one filter, so the
  filter is applied here, not in the binding). It keeps collecting while its listener is
  down; each message is acked only after its events were handed on, so a listener that
  stops mid-batch gets that batch again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions

from ..config import redact_url
from ..errors import BrokerError, BrokerRefused
from ..topology import EVENTS_EXCHANGE
from .failover import Addresses
from .refusal import refusal

__all__ = ["EventListener", "Received"]

log = logging.getLogger("amqptasks.transport")


@dataclass(frozen=True, slots=True)
class Received:
    """One events message: its delivery tag, routing key and body."""

    tag: int
    routing_key: str
    body: bytes


class EventListener:
    """Consumes events from a live-tail queue or from the durable queue ``queue``."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        queue: str | None = None,
        routing_keys: Sequence[str] = ("#",),
        prefetch: int = 200,
        name: str = "amqptasks events",
        timeout: float = 10.0,
        queue_type: str = "classic",
    ) -> None:
        self.addresses = Addresses(url)
        #: The durable queue's type: ``quorum`` on a cluster (``topology.default_queue_type``),
        #: so the listener's backlog survives the loss of the node that held it.
        self.queue_type = queue_type
        self.url = self.addresses.urls[0]
        self.durable = queue is not None
        self.queue = queue or ""
        self.routing_keys = ("#",) if self.durable else tuple(routing_keys)
        self.prefetch = prefetch
        self.name = name
        self.timeout = timeout
        self._conn: Any = None
        self._channel: Any = None
        self._inbox: list[Received] = []

    def _fail(self, exc: BaseException, what: str) -> BrokerError:
        reason = refusal(exc)
        if reason is not None:
            return BrokerRefused(f"broker {redact_url(self.url)} refused {what}: {reason}")
        return BrokerError(f"{what} failed on {redact_url(self.url)}: {exc!r}")

    def open(self) -> str:
        """Connect (to the first address that answers), declare the exchange and the queue,
        bind, consume; return the queue name."""
        candidates = self.addresses.round()
        for i, url in enumerate(candidates):
            self.url = url
            params = pika.URLParameters(url)
            params.client_properties = {"connection_name": self.name}
            params.socket_timeout = self.timeout
            params.blocked_connection_timeout = self.timeout
            try:
                self._conn = pika.BlockingConnection(params)
                break
            except pika.exceptions.AMQPError as exc:
                error = self._fail(exc, "the connection")
                if isinstance(error, BrokerRefused) or i == len(candidates) - 1:
                    raise error from exc
                self.addresses.failed(url)
        try:
            ch = self._channel = self._conn.channel()
            ch.exchange_declare(EVENTS_EXCHANGE, "topic", durable=True)
            if self.durable:
                arguments = {"x-queue-type": "quorum"} if self.queue_type == "quorum" else None
                ch.queue_declare(self.queue, durable=True, arguments=arguments)
            else:
                self.queue = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
            for key in self.routing_keys:
                ch.queue_bind(self.queue, EVENTS_EXCHANGE, key)
            ch.basic_qos(prefetch_count=self.prefetch)
            ch.basic_consume(self.queue, self._on_message, auto_ack=not self.durable)
        except pika.exceptions.AMQPError as exc:
            self.close()
            raise self._fail(exc, f"listening on {self.queue or 'a new queue'!r}") from exc
        return str(self.queue)

    def _on_message(self, _ch: Any, method: Any, _props: Any, body: bytes) -> None:
        self._inbox.append(Received(method.delivery_tag, method.routing_key or "", body))

    def poll(self, timeout: float) -> list[Received]:
        """The messages that arrived within ``timeout`` seconds (maybe none)."""
        if not self._inbox:
            try:
                self._conn.process_data_events(time_limit=max(0.0, timeout))
            except pika.exceptions.AMQPError as exc:
                raise self._fail(exc, "listening") from exc
        out, self._inbox = self._inbox, []
        return out

    def done(self, message: Received) -> None:
        """Its events were handed on: ack it (durable queue; a live tail does not ack)."""
        if self.durable:
            self._channel.basic_ack(message.tag)

    def give_back(self, message: Received) -> None:
        """Not (all) handed on: back to the durable queue for the next listener."""
        if self.durable:
            self._channel.basic_nack(message.tag, requeue=True)

    def close(self) -> None:
        """Close; unacked messages of a durable queue go back to it."""
        conn, self._conn = self._conn, None
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except Exception as exc:  # closing is best effort: the broker cleans up
                log.debug("closing the events listener failed: %s", exc)
