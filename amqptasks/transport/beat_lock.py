"""The scheduler's broker link: lock, shared state and firings on one pika connection.

Why one connection: the broker itself then fences a scheduler that lost the lock. The lock is
held by this connection's consumer; the firings and the state are published on the same
channel, so once the broker has closed the connection (kill -9, missed heartbeats) and handed
the lock to a standby, nothing the old scheduler sends can land any more.

* **Lock** — ``lock_queue`` is a durable classic queue with ``x-single-active-consumer``
  holding one *token* message. Every scheduler consumes it with prefetch 1; the broker
  delivers only to the single active consumer, which keeps the token unacked. When that
  consumer's connection closes the token is requeued and delivered at once to the next
  consumer: failover is pushed by the broker, no polling, no channel errors in the broker log
  (an exclusive queue would need standbys to retry its declaration, each attempt logged by the
  broker as a RESOURCE_LOCKED channel error). ``x-max-length: 1`` with ``drop-head`` keeps
  spare tokens (published by schedulers joining at the same moment) at one. The held token is
  renewed (publish a new one, ack the old, one transaction) every minute so it never outlives
  the broker's ``consumer_timeout``. With ``topology.default_queue_type: quorum`` the lock
  and state queues are quorum queues (replicated; single active consumer, ``x-max-length``
  and ``drop-head`` work the same), so the lock outlives the node that hosted it
  (docs/scheduler.md, "On a cluster").
* **State** — ``state_queue`` (durable, ``x-max-length: 1``, ``drop-head``) holds the latest
  state document; it is read with ``basic.get`` and requeued, and replaced by each commit.
* **Firings** — :meth:`BeatLink.commit` publishes the due tasks *and* the new state in one AMQP
  transaction (``tx.select``/``tx.commit``): if the process dies before the commit reaches the
  broker, neither is published; after ``commit-ok`` both are safely queued. A takeover can
  therefore never find a task published without its state (no duplicate) or the reverse (no
  loss). Transactions, not publisher confirms, because confirms cannot make two publishes
  atomic. ``mandatory`` returns arrive before ``commit-ok`` and are reported per message.

Why pika and not aio-pika: aiormq drops ``basic.return`` frames on a channel without publisher
confirms, so an unroutable firing inside a transaction would go unnoticed. pika reports it.
pika's ``BlockingConnection`` runs on its own thread; coroutines hand it work through
``add_callback_threadsafe``. Heartbeats run on that thread, so a *watchdog* closes the
connection (releasing the lock) if the scheduler's event loop stops calling
:meth:`BeatLink.keepalive` for ``stall_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pika
import pika.exceptions

from ..config import redact_url
from ..errors import BrokerError
from ..protocol import Properties
from ..topology import quorum_arguments
from .pika_publisher import to_pika
from .refusal import refusal, refused

__all__ = ["BeatLink", "Firing", "Returned"]

log = logging.getLogger("amqptasks.beat")
T = TypeVar("T")

TOKEN = b'{"amqptasks": "beat lock token"}'
STATE_MESSAGE_ID = "amqptasks.beat.state"
#: Renew the held token well inside RabbitMQ's consumer_timeout (30 min by default).
RENEW_INTERVAL = 60.0
_SINGLE_SLOT = {"x-max-length": 1, "x-overflow": "drop-head"}
_PERSISTENT = 2


@dataclass(frozen=True, slots=True)
class Firing:
    """One task message to publish in a commit."""

    exchange: str
    routing_key: str
    body: bytes
    properties: Properties


@dataclass(frozen=True, slots=True)
class Returned:
    """A firing the broker returned as unroutable (``mandatory``)."""

    message_id: str
    exchange: str
    routing_key: str
    reply_text: str


class _Lost(Exception):
    """The link cannot be used any more (the reason is the message)."""


class BeatLink:
    """One scheduler's connection: join the lock queue, learn when it is ours, commit firings.

    A link is used once: after :attr:`lost` is set (or :meth:`close`), make a new one.
    """

    def __init__(
        self,
        url: str,
        *,
        lock_queue: str,
        state_queue: str,
        name: str,
        heartbeat: int = 5,
        timeout: float = 10.0,
        stall_timeout: float | None = None,
        queue_type: str = "classic",
        replicas: int | None = None,
    ) -> None:
        self.url = url
        #: Arguments both queues get on top of their own: the quorum type when configured.
        self.queue_args: dict[str, Any] = (
            dict(quorum_arguments(replicas)) if queue_type == "quorum" else {}
        )
        self.lock_queue = lock_queue
        self.state_queue = state_queue
        self.name = name
        self.heartbeat = heartbeat
        self.timeout = timeout
        self.stall_timeout = stall_timeout if stall_timeout is not None else 2.0 * heartbeat
        #: Set when the broker delivers the token: this scheduler holds the lock.
        self.activated = asyncio.Event()
        #: Set when the link died (connection/channel closed, consumer cancelled, stalled).
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self._loop = asyncio.get_running_loop()
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future[Any]]] = (
            queue.SimpleQueue()
        )
        self._guard = threading.Lock()
        self._dead = False
        self._closing = False
        self._conn: Any = None
        self._channel: Any = None  # tx channel: lock consumer, token, firings, state publish
        self._reader: Any = None  # plain channel: state basic.get / requeue
        self._held: int | None = None
        self._active = False
        self._cancelled = False
        self._returns: list[Returned] = []
        self._last_keepalive = time.monotonic()
        self._thread: threading.Thread | None = None

    # -- coroutine side -----------------------------------------------------------------------
    async def open(self) -> None:
        """Connect, declare the lock and state queues, subscribe, make sure a token exists."""
        opened: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._main, args=(opened,), name="amqptasks-beat-link", daemon=True
        )
        self._thread.start()
        await opened

    def keepalive(self) -> None:
        """Tell the watchdog the scheduler's loop is alive (call at least every second)."""
        self._last_keepalive = time.monotonic()

    async def read_state(self) -> bytes | None:
        """The latest state document, or None if there is none (left in the queue)."""
        return await self._call(self._read_state)

    async def commit(self, firings: Sequence[Firing], state: bytes) -> list[Returned]:
        """Publish ``firings`` and ``state`` in one transaction; return the unroutable ones.

        Raises :class:`BrokerError` if the commit is not confirmed (the link is then lost and
        the outcome is all-or-nothing: the next scheduler reads the state to find out which).
        """
        return await self._call(lambda: self._commit(firings, state))

    async def renew(self) -> None:
        """Replace the held token (publish new + ack old in one transaction)."""
        await self._call(self._renew)

    async def close(self) -> None:
        """Close the connection (a held token goes back to the queue for a standby)."""
        self._closing = True
        self._wake()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, self.timeout)

    async def _call(self, fn: Callable[[], T]) -> T:
        future: asyncio.Future[T] = self._loop.create_future()
        with self._guard:
            if self._dead:
                raise BrokerError(f"beat link is closed: {self.lost_reason or 'closed'}")
            self._commands.put((fn, future))
        self._wake()
        return await future

    def _wake(self) -> None:
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(Exception):  # already closed: the thread is exiting
                conn.add_callback_threadsafe(lambda: None)

    def _notify(self, fn: Callable[[], object]) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is already closed
            self._loop.call_soon_threadsafe(fn)

    def _settle(self, future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
        def settle() -> None:
            if future.done():
                return
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)

        self._notify(settle)

    # -- link thread --------------------------------------------------------------------------
    def _main(self, opened: asyncio.Future[None]) -> None:
        try:
            self._connect()
        except Exception as exc:
            reason = refusal(exc)  # wrong password, no such vhost, no permission: say so
            if reason is not None:
                error: BrokerError = refused(self.url, reason)
            else:
                what = f"cannot join {self.lock_queue!r} on {redact_url(self.url)}"
                error = _broker_error(what, exc)
            self._settle(opened, None, error)
            self._finish(f"could not connect: {error}")
            return
        self._settle(opened, None, None)
        reason = "closed"
        try:
            while True:
                self._run_commands()
                if self._closing:
                    break
                self._conn.process_data_events(time_limit=0.25)
                self._check()
        except _Lost as exc:
            reason = str(exc)
        except Exception as exc:  # pika's connection errors: the broker or network is gone
            reason = f"connection lost: {exc!r}"
        self._finish(reason)

    def _connect(self) -> None:
        params = pika.URLParameters(self.url)
        params.client_properties = {"connection_name": self.name}
        params.heartbeat = self.heartbeat
        params.connection_attempts = 1
        params.socket_timeout = self.timeout
        params.stack_timeout = self.timeout
        params.blocked_connection_timeout = self.timeout
        self._conn = pika.BlockingConnection(params)
        reader = self._reader = self._conn.channel()
        reader.queue_declare(
            self.state_queue, durable=True, arguments={**_SINGLE_SLOT, **self.queue_args}
        )
        ch = self._channel = self._conn.channel()
        declared = ch.queue_declare(
            self.lock_queue,
            durable=True,
            arguments={"x-single-active-consumer": True, **_SINGLE_SLOT, **self.queue_args},
        )
        ch.basic_qos(prefetch_count=1)
        ch.add_on_return_callback(self._on_return)
        ch.add_on_cancel_callback(self._on_cancel)
        ch.tx_select()
        ch.basic_consume(self.lock_queue, self._on_token, auto_ack=False, consumer_tag=self.name)
        if declared.method.message_count == 0:
            # No spare token: publish one. If another scheduler holds the lock the spare waits
            # (x-max-length 1 keeps at most one); on an empty queue it starts the first holder.
            self._publish_token()
            ch.tx_commit()

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                result = fn()
            except _Lost as exc:
                self._settle(future, None, BrokerError(str(exc)))
                raise
            except pika.exceptions.AMQPError as exc:
                error = _broker_error("beat link operation failed", exc)
                self._settle(future, None, error)
                raise _Lost(str(error)) from exc
            except Exception as exc:
                self._settle(future, None, exc)
            else:
                self._settle(future, result, None)

    def _check(self) -> None:
        if self._cancelled:
            raise _Lost(f"the broker cancelled the consumer on {self.lock_queue!r} (deleted?)")
        if not self._channel.is_open:
            raise _Lost("lock channel closed by the broker")
        stalled = time.monotonic() - self._last_keepalive
        if stalled > self.stall_timeout:
            raise _Lost(
                f"scheduler loop stalled for {stalled:.1f}s (> {self.stall_timeout:.0f}s); "
                "released the lock"
            )

    def _finish(self, reason: str) -> None:
        with self._guard:
            self._dead = True
            pending = []
            while True:
                try:
                    pending.append(self._commands.get_nowait())
                except queue.Empty:
                    break
        for _fn, future in pending:
            self._settle(future, None, BrokerError(f"beat link closed: {reason}"))
        if self._conn is not None and self._conn.is_open:
            with contextlib.suppress(Exception):
                self._conn.close()
        if not self._closing:
            log.warning("beat link %s: %s", self.name, reason)

        def lost() -> None:
            self.lost_reason = reason
            self.lost.set()

        self._notify(lost)

    def _on_token(self, _ch: Any, method: Any, _props: Any, _body: bytes) -> None:
        self._held = method.delivery_tag
        if not self._active:
            self._active = True
            self._notify(self.activated.set)

    def _on_cancel(self, _frame: Any) -> None:
        self._cancelled = True

    def _on_return(self, _ch: Any, method: Any, props: Any, _body: bytes) -> None:
        self._returns.append(
            Returned(
                props.message_id or "",
                method.exchange,
                method.routing_key,
                method.reply_text,
            )
        )

    def _publish_token(self) -> None:
        self._channel.basic_publish(
            "", self.lock_queue, TOKEN, pika.BasicProperties(delivery_mode=_PERSISTENT)
        )

    def _read_state(self) -> bytes | None:
        method, _props, body = self._reader.basic_get(self.state_queue, auto_ack=False)
        if method is None:
            return None
        self._reader.basic_reject(method.delivery_tag, requeue=True)
        return bytes(body)

    def _commit(self, firings: Sequence[Firing], state: bytes) -> list[Returned]:
        ch = self._channel
        self._returns = []
        for f in firings:
            ch.basic_publish(
                f.exchange, f.routing_key, f.body, to_pika(f.properties), mandatory=True
            )
        ch.basic_publish(
            "",
            self.state_queue,
            state,
            pika.BasicProperties(
                content_type="application/json",
                delivery_mode=_PERSISTENT,
                message_id=STATE_MESSAGE_ID,
            ),
            mandatory=True,
        )
        ch.tx_commit()
        self._conn.process_data_events(0)  # dispatch the returns that preceded commit-ok
        returned, self._returns = self._returns, []
        if any(r.message_id == STATE_MESSAGE_ID for r in returned):
            raise _Lost(f"state queue {self.state_queue!r} is gone: the state was not saved")
        return returned

    def _renew(self) -> None:
        held, self._held = self._held, None
        self._publish_token()
        if held is not None:
            self._channel.basic_ack(held)
        self._channel.tx_commit()


def _broker_error(what: str, exc: BaseException) -> BrokerError:
    if isinstance(exc, pika.exceptions.ChannelClosedByBroker):
        detail = f"{exc.reply_code} {exc.reply_text}"
    else:
        detail = repr(exc)
    return BrokerError(f"{what}: {detail}")
