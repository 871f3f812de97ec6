"""The synchronous, thread-safe publisher (pika), used by ``.delay()`` and ``amqptasks send``.

One background I/O thread owns a pika ``SelectConnection`` and a confirm-mode channel; callers
on any thread hand it publishes through ``add_callback_threadsafe`` and wait on a future that
the broker's ``basic.ack`` resolves. That gives three things a web app needs at once:

* thread safety without a connection per thread (pika connections are not thread-safe);
* pipelined confirms: many threads' publishes are in flight together, and
  :meth:`SyncPublisher.publish_nowait` lets one caller pipeline a batch;
* a direct reply-to consumer on the *same* channel, which RabbitMQ requires for replies.

Every publish is ``mandatory``: a ``basic.return`` (no queue bound) arrives before the
``basic.ack`` of the same message and turns that ack into :class:`UnroutableError`. A nack
raises :class:`PublishNacked`; no confirm within the bound raises :class:`PublishTimeout`.

With several broker addresses (a cluster's nodes, :mod:`.failover`) a link is opened to the
first that answers; when it is lost, what was unconfirmed fails ("may or may not have been
delivered") and the next publish opens a link to the next address, within the same bound.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pika
import pika.exceptions
import pika.frame
import pika.spec

from ..config import redact_url
from ..errors import (
    BrokerError,
    BrokerRefused,
    PublishError,
    PublishNacked,
    PublishTimeout,
    UnroutableError,
)
from ..handoff import Handoff
from ..protocol import Properties
from .failover import Addresses
from .refusal import refusal, refused

__all__ = ["ReplyHandler", "SyncPublisher"]

log = logging.getLogger("amqptasks.publisher")

#: Called on the I/O thread with (correlation_id, body) for each direct reply-to message.
ReplyHandler = Callable[[str | None, bytes], object]
REPLY_TO = "amq.rabbitmq.reply-to"


def to_pika(props: Properties) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type=props.content_type,
        content_encoding=props.content_encoding,
        message_id=props.message_id,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        priority=props.priority,
        headers=props.headers,
        delivery_mode=props.delivery_mode,
    )


class _Pending:
    __slots__ = ("exchange", "future", "mandatory", "message_id", "routing_key")

    def __init__(
        self,
        future: concurrent.futures.Future[None],
        exchange: str,
        routing_key: str,
        message_id: str | None,
        mandatory: bool = True,
    ) -> None:
        self.future = future
        self.exchange = exchange
        self.routing_key = routing_key
        self.message_id = message_id
        self.mandatory = mandatory


class _Link:
    """One connection + confirm channel, driven by its own thread until it closes."""

    def __init__(
        self,
        url: str,
        name: str,
        timeout: float,
        on_reply: ReplyHandler | None,
        heartbeat: int | None = None,
    ) -> None:
        self.url = url
        self.on_reply = on_reply
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.closed = False
        #: Set after a nack: no new publishes here; closed once its last confirm arrived.
        self.retiring = False
        self.channel: Any = None
        self._seq = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._returned: dict[str, str] = {}
        # Publishes handed over by callers, drained by the I/O thread, one wake per batch.
        self._outbox: Handoff[tuple[_Pending, bytes, pika.BasicProperties]] = Handoff()
        params = pika.URLParameters(url)
        params.client_properties = {"connection_name": name}
        params.connection_attempts = 1
        params.socket_timeout = timeout
        params.stack_timeout = timeout
        params.blocked_connection_timeout = timeout
        if heartbeat:
            params.heartbeat = heartbeat
        self.conn = pika.SelectConnection(
            params,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_close,
        )
        self.thread = threading.Thread(target=self._run, name="amqptasks-publisher", daemon=True)
        self.thread.start()

    # -- I/O thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.conn.ioloop.start()
        except Exception as exc:  # pragma: no cover - defensive: never leave callers waiting
            log.exception("publisher I/O loop crashed")
            self._fail_all(BrokerError(f"publisher I/O loop crashed: {exc}"))
        finally:
            self.closed = True
            self.ready.set()
            # A drain scheduled just as the loop stopped never runs: fail what it would take,
            # and anything still waiting for a confirm that will never come.
            gone = self.error or BrokerError("publisher connection closed")
            self._fail_outbox(gone)
            self._fail_all(gone)
            self.conn.ioloop.close()  # releases the loop's wake-up socket pair

    def _on_open(self, conn: Any) -> None:
        conn.channel(on_open_callback=self._on_channel)

    def _on_channel(self, channel: Any) -> None:
        self.channel = channel
        channel.add_on_close_callback(self._on_channel_close)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(self._on_confirm, callback=self._on_confirm_ok)

    def _on_confirm_ok(self, _frame: Any) -> None:
        if self.on_reply is None:
            self.ready.set()
            return
        self.channel.basic_consume(
            REPLY_TO, self._on_reply_message, auto_ack=True, callback=lambda _f: self.ready.set()
        )

    def _on_reply_message(self, _ch: Any, _method: Any, props: Any, body: bytes) -> None:
        assert self.on_reply is not None
        try:
            self.on_reply(props.correlation_id, body)
        except Exception:  # a bad handler must not kill the publisher
            log.exception("reply handler failed")

    def _on_open_error(self, _conn: Any, exc: BaseException) -> None:
        reason = refusal(exc)
        self.error = (
            refused(self.url, reason)
            if reason is not None
            else BrokerError(f"cannot connect to broker {redact_url(self.url)}: {exc}")
        )
        self.closed = True
        self.ready.set()
        self.conn.ioloop.stop()

    def _on_close(self, _conn: Any, exc: BaseException) -> None:
        self.closed = True
        self.error = BrokerError(f"connection to broker {redact_url(self.url)} closed: {exc}")
        self._fail_all(
            BrokerError(
                f"connection to broker closed before the publish was confirmed ({exc}); "
                "the message may or may not have been delivered"
            )
        )
        self.ready.set()
        self.conn.ioloop.stop()

    def _on_channel_close(self, _ch: Any, exc: BaseException) -> None:
        self.closed = True
        reason = refusal(exc)  # e.g. no write permission on the exchange
        if reason is not None:
            self.error = refused(self.url, reason, "the publish")
            self._fail_all(self.error)
        else:
            self.error = BrokerError(f"publisher channel closed: {exc}")
            self._fail_all(BrokerError(f"publisher channel closed before the confirm: {exc}"))
        if self.conn.is_open:
            self.conn.close()

    def _fail_all(self, exc: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for rec in pending.values():
            if not rec.future.done():
                rec.future.set_exception(exc)

    def _on_return(self, _ch: Any, method: Any, props: Any, _body: bytes) -> None:
        # Arrives before the basic.ack of the same message (RabbitMQ confirms doc).
        if props.message_id is not None:
            self._returned[props.message_id] = method.reply_text

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        tag = method.delivery_tag
        if method.multiple:
            tags = [seq for seq in self._pending if seq <= tag]
        else:
            tags = [tag] if tag in self._pending else []
        acked = isinstance(method, pika.spec.Basic.Ack)
        for seq in tags:
            rec = self._pending.pop(seq)
            if rec.future.done():
                continue
            returned = (
                self._returned.pop(rec.message_id, None)
                if self._returned and rec.message_id is not None
                else None
            )
            if returned is not None:
                rec.future.set_exception(UnroutableError(rec.exchange, rec.routing_key, returned))
            elif acked:
                rec.future.set_result(None)
            else:
                rec.future.set_exception(
                    PublishNacked(
                        f"broker nacked the publish to exchange {rec.exchange!r} routing key "
                        f"{rec.routing_key!r} (e.g. a full queue with overflow reject-publish)"
                    )
                )
        if not acked and not self.retiring:
            # A channel that got a nack is retired: RabbitMQ 3.10 keeps nacking every publish
            # to a quorum queue on a channel that first used the queue while its leader was
            # dying (measured: until the old leader's node came back). A new channel looks
            # the leader up again; a full queue's nacks only cost a reconnect.
            self.retiring = True
            log.warning(
                "broker %s nacked a publish; the next publishes use a new channel",
                redact_url(self.url),
            )
        if self.retiring and not self._pending and self.conn.is_open:
            self.conn.close()

    def _publish(self, rec: _Pending, body: bytes, props: pika.BasicProperties) -> None:
        if self.closed or self.channel is None or not self.channel.is_open:
            rec.future.set_exception(self.error or BrokerError("publisher channel is not open"))
            return
        # The broker numbers the publishes it receives on a confirm channel (1, 2, ...) and
        # confirms by that number; ours must count exactly the publishes that reached it. So
        # the number is taken only once basic_publish returned: a value pika cannot encode
        # (priority 300, a header it has no type for) raises while the frames are marshalled,
        # and pika marshals all three frames before it writes any (Connection._send_message),
        # so nothing was sent and the sequence must not move (it did, and every later confirm
        # was matched to the wrong publish: each publish after one bad one timed out).
        sent_before = self.conn.frames_sent
        try:
            self.channel.basic_publish(
                rec.exchange, rec.routing_key, body, props, mandatory=rec.mandatory
            )
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"[:300]
            where = f"exchange {rec.exchange!r} routing key {rec.routing_key!r}"
            if self.conn.frames_sent == sent_before:
                rec.future.set_exception(
                    PublishError(f"publish to {where} failed ({problem}); nothing was published")
                )
                return
            # Part of the message was written: the broker's count is unknown and the frame
            # stream is broken. Give the link up (every unconfirmed publish fails, "may or
            # may not"); the next publish opens a fresh connection and channel.
            rec.future.set_exception(
                PublishError(
                    f"publish to {where} failed after part of it was sent ({problem}); "
                    "the message may or may not have been delivered"
                )
            )
            self._abandon(BrokerError(f"publisher link abandoned after a failed send: {problem}"))
            return
        self._pending[next(self._seq)] = rec

    def _abandon(self, exc: BrokerError) -> None:
        self.closed = True
        self.error = exc
        self._fail_all(
            BrokerError(f"{exc}; a publish not yet confirmed may or may not have been delivered")
        )
        if self.conn.is_open:
            self.conn.close()

    def _drain_outbox(self) -> None:
        batch = self._outbox.take()
        for rec, body, props in batch:
            self._publish(rec, body, props)
        if len(batch) > 1:
            self._coalesce_output()

    def _coalesce_output(self) -> None:
        """Join the frames waiting in pika's send buffer into one chunk.

        pika buffers every frame separately (method, header, body: three per message) and
        sends each with its own ``send()`` system call — about 28 % of a pipelined publisher's
        time in the profile. One chunk per batch is one call. This reaches into pika's
        transport (``_transport._tx_buffers``, a deque of bytes, pika 1.x); if that ever
        changes shape the join is skipped and publishing works exactly as before.
        """
        buffers = getattr(getattr(self.conn, "_transport", None), "_tx_buffers", None)
        if isinstance(buffers, collections.deque) and len(buffers) > 1:
            joined = b"".join(buffers)
            buffers.clear()
            buffers.append(joined)

    def _fail_outbox(self, exc: BaseException) -> None:
        for rec, _body, _props in self._outbox.take():
            if not rec.future.done():
                rec.future.set_exception(exc)

    # -- any thread ---------------------------------------------------------------------------
    def submit(self, rec: _Pending, body: bytes, props: pika.BasicProperties) -> None:
        if not self._outbox.put((rec, body, props)) and not self.closed:
            return  # the I/O thread has a drain scheduled that will take this one too
        try:
            if self.closed:
                raise RuntimeError("I/O loop finished")
            self.conn.ioloop.add_callback_threadsafe(self._drain_outbox)
        except Exception as exc:  # the loop already stopped: fail whatever is waiting
            self._fail_outbox(self.error or BrokerError(f"publisher is closed: {exc}"))

    def close(self) -> None:
        def _close() -> None:
            if self.conn.is_closed:
                self.conn.ioloop.stop()
            elif not self.conn.is_closing:
                # Open, or still opening: pika then aborts the connect and closes the socket
                # (stopping the loop instead leaked the half-connected socket). Closing
                # already: _on_close will stop the loop.
                self.conn.close()

        if not self.closed:
            with contextlib.suppress(Exception):
                self.conn.ioloop.add_callback_threadsafe(_close)
        self.thread.join(timeout=5)


class SyncPublisher:
    """Publishes with confirms from any thread; reconnects lazily after a lost connection,
    to the next of several broker addresses when there are several."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        timeout: float = 10.0,
        name: str = "amqptasks publisher",
        on_reply: ReplyHandler | None = None,
        heartbeat: int | None = None,
    ) -> None:
        self.addresses = Addresses(url)
        self.url = self.addresses.urls[0]
        self.timeout = timeout
        self.name = name
        self.on_reply = on_reply
        self.heartbeat = heartbeat
        self._link: _Link | None = None
        #: Links retired after a nack that still wait for their last confirms.
        self._retired: list[_Link] = []
        self._lock = threading.Lock()

    @property
    def reply_to(self) -> str | None:
        """The reply-to address for results, or None when this publisher takes no replies."""
        return REPLY_TO if self.on_reply is not None else None

    def _connected(self, deadline: float) -> _Link:
        """An open link, reconnecting (with backoff) until ``deadline`` if the broker is down
        or the last connection died: a publish waits a bounded time, then raises. A broker
        that refuses the login or the vhost raises :class:`BrokerRefused` at once.

        Each attempt goes to the preferred address (:class:`.failover.Addresses`); a failed
        or lost one hands over to the next. With several addresses an attempt that hangs
        (a node that does not answer at all) gets its share of the remaining time, so the
        others are still tried before the deadline. The backoff sleep comes after a whole
        round of addresses failed, never between two of them.
        """
        delay = 0.1
        tried = 0
        many = len(self.addresses) > 1
        while True:
            with self._lock:
                link = self._link
                if link is not None and link.retiring and not link.closed:
                    # Its last confirms are still due: it closes itself once they arrived.
                    self._retired = [x for x in self._retired if not x.closed] + [link]
                    link = self._link = _Link(
                        link.url, self.name, self.timeout, self.on_reply, self.heartbeat
                    )
                if link is None or link.closed:
                    if link is not None:
                        link.close()
                        if not link.retiring:
                            self.addresses.failed(link.url)
                    url = self.addresses.preferred
                    link = self._link = _Link(
                        url, self.name, self.timeout, self.on_reply, self.heartbeat
                    )
            remaining = max(0.0, deadline - time.monotonic())
            left_in_round = len(self.addresses) - tried % len(self.addresses)
            share = max(remaining / left_in_round, min(remaining, 1.0)) if many else remaining
            if not link.ready.wait(share):
                if not many or time.monotonic() >= deadline:
                    raise PublishTimeout(
                        f"could not open a channel to {self.addresses} within the publish "
                        "timeout; nothing was published"
                    )
                log.warning(
                    "broker %s did not answer within %.1fs; trying the next address",
                    redact_url(link.url),
                    share,
                )
                with self._lock:
                    if self._link is link:
                        self._link = None
                link.close()
                self.addresses.failed(link.url)
                tried += 1
                continue
            if not link.closed:
                if tried:
                    log.warning("publishing through broker %s", redact_url(link.url))
                self.addresses.answered(link.url)
                return link
            if isinstance(link.error, BrokerRefused):  # asking again gets the same answer
                raise BrokerRefused(str(link.error), link.error.reason)
            tried += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(
                    f"broker {self.addresses} unreachable; nothing was published "
                    f"(last error: {link.error})"
                )
            if many and tried % len(self.addresses):
                # Not a whole round yet: the next address at once (the loop marks this one
                # failed when it replaces the closed link).
                continue
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 1.0)

    def publish_nowait(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        props: Properties,
        *,
        timeout: float | None = None,
        mandatory: bool = True,
    ) -> concurrent.futures.Future[None]:
        """Start a publish; the future resolves on the broker's confirm (or its error).

        ``mandatory=False`` is for messages nobody has to receive (events)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        link = self._connected(deadline)
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        rec = _Pending(future, exchange, routing_key, props.message_id, mandatory)
        link.submit(rec, body, to_pika(props))
        return future

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        props: Properties,
        *,
        timeout: float | None = None,
    ) -> None:
        """Publish and block until the broker confirms; raises a :class:`PublishError` if not."""
        limit = self.timeout if timeout is None else timeout
        future = self.publish_nowait(exchange, routing_key, body, props, timeout=limit)
        wait(future, limit, exchange, routing_key)

    def close(self) -> None:
        with self._lock:
            link, self._link = self._link, None
            retired, self._retired = self._retired, []
        for old in retired:
            old.close()
        if link is not None:
            link.close()


def wait(
    future: concurrent.futures.Future[None], timeout: float, exchange: str, routing_key: str
) -> None:
    """Wait for one publish future, turning a timeout into :class:`PublishTimeout`."""
    try:
        future.result(timeout)
    except concurrent.futures.TimeoutError:
        raise PublishTimeout(
            f"no confirm for the publish to exchange {exchange!r} routing key {routing_key!r} "
            f"within {timeout}s; the message may or may not have been delivered"
        ) from None
