"""The synchronous, thread-safe publisher (pika), used by ``.delay()`` and ``amqptasks send``.

One background I/O thread owns a pika ``SelectConnection`` and a confirm-mode channel; callers
on any thread hand it publishes through ``add_callback_threadsafe`` and wait on a future that
the broker's ``basic.ack`` resolves. That gives three things a web app needs at once:

* thread safety without a connection per thread (pika connections are not thread-safe);
* pipelined confirms: many threads' publishes are in flight together, and
  :meth:`SyncPublisher.publish_nowait` lets one caller pipeline a batch;
* a direct reply-to consumer on the *same* channel, which RabbitMQ requires for replies.

Every publish is ``mandatory`` (but replies to a direct reply-to address, which RabbitMQ
would return although it delivers them: :func:`mandatory_for`; and events, which nobody has
to receive): a ``basic.return`` (no queue bound) arrives before the
``basic.ack`` of the same message and turns that ack into :class:`UnroutableError`. A nack
raises :class:`PublishNacked`; no confirm within the bound raises :class:`PublishTimeout`.

One thread pays a hop that a raw client does not: a blocking confirmed publish went caller →
I/O thread → caller (two wake-ups, ~13 % of a single-caller ``.delay()`` loop). So the first
thread that publishes a task with no reply wanted gets a *direct* link of its own, with no
thread behind it: its publishes are written and their confirms read by that thread itself,
while it waits for them (:meth:`_Link.drive`). Everything that needs a reader when nobody
waits — the direct reply-to consumer, publishes that want a reply, events, other threads —
keeps the threaded link, so threaded callers stay safe. Publishes from one thread keep their
order on its link; a publish that wants a reply (threaded link) and one that does not
(direct) are two channels, which only matters inside one ``send_many`` mixing both kinds
(every publish is confirmed before ``send_task`` returns). A direct link unused for
:data:`DIRECT_IDLE` seconds is reopened before its next publish: nobody answered its
heartbeats meanwhile.

With several broker addresses (a cluster's nodes, :mod:`.failover`) a link is opened to the
first that answers; when it is lost, what was unconfirmed fails ("may or may not have been
delivered") and the next publish opens a link to the next address, within the same bound.
"""

from __future__ import annotations

import asyncio
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
import pika.adapters.asyncio_connection
import pika.exceptions
import pika.frame
import pika.spec

from ..config import redact_url
from ..errors import (
    BrokerError,
    PublishError,
    PublishNacked,
    PublishTimeout,
    UnroutableError,
)
from ..handoff import Handoff
from ..protocol import Properties
from .failover import Addresses, Attempts
from .pika_consumer import connect_failure
from .refusal import refusal, refused

__all__ = ["ReplyHandler", "SyncPublisher"]

log = logging.getLogger("amqptasks.publisher")

#: Called on the I/O thread with (correlation_id, body) for each direct reply-to message.
ReplyHandler = Callable[[str | None, bytes], object]
REPLY_TO = "amq.rabbitmq.reply-to"
#: Seconds a direct link may sit unused before its next publish opens a fresh one instead.
DIRECT_IDLE = 20.0
#: Unused this long, a direct link first reads what the broker sent meanwhile (a close, say),
#: so a publish is not written into a connection that is already gone.
DIRECT_RECHECK = 0.05


def _noop() -> None:
    pass


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


def mandatory_for(routing_key: str, mandatory: bool) -> bool:
    """The ``mandatory`` flag a publish goes out with. RabbitMQ answers a mandatory publish
    to a direct reply-to address (``amq.rabbitmq.reply-to.*``) with ``basic.return``
    NO_ROUTE although it delivers it, so replies go out unmandatory (a caller that is gone
    loses its reply either way; that is the rpc contract). The pika publishers and the
    aio-pika one ask this for every publish."""
    return mandatory and not routing_key.startswith(REPLY_TO)


class _Pending:
    __slots__ = ("exchange", "future", "mandatory", "message_id", "routing_key")

    def __init__(
        self,
        future: concurrent.futures.Future[None] | asyncio.Future[None],
        exchange: str,
        routing_key: str,
        message_id: str | None,
        mandatory: bool = True,
    ) -> None:
        self.future = future
        self.exchange = exchange
        self.routing_key = routing_key
        self.message_id = message_id
        self.mandatory = mandatory_for(routing_key, mandatory)


class _Link:
    """One connection + confirm channel, driven by its own thread until it closes — or, with
    ``loop``, by that asyncio loop (pika's ``AsyncioConnection``: the worker's publisher,
    :mod:`.pika_async`), whose callers call :meth:`submit` on the loop's thread."""

    def __init__(
        self,
        url: str,
        name: str,
        timeout: float,
        on_reply: ReplyHandler | None,
        heartbeat: int | None = None,
        *,
        threaded: bool = True,
        loop: asyncio.AbstractEventLoop | None = None,
        on_replies_lost: Callable[[], object] | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.on_reply = on_reply
        #: Called once when this link, which consumed replies, closes: the replies still due
        #: on its channel will never arrive (direct reply-to lives and dies with the channel).
        self.on_replies_lost = on_replies_lost
        #: The asyncio loop that runs this link's I/O (None: a thread, or the owner, does).
        self.loop = loop
        #: False: no I/O thread; the one thread that uses the link drives it (:meth:`drive`).
        self.threaded = threaded and loop is None
        #: Resolved (on ``loop``) together with :attr:`ready`: open, or failed to open.
        self.opened: asyncio.Future[None] | None = None
        #: Resolved (on ``loop``) when the connection is finished: closed, or never opened.
        self.finished: asyncio.Future[None] | None = None
        self._coalescing = False
        self.last_used = time.monotonic()
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
        self.thread: threading.Thread | None = None
        if loop is not None:
            self.opened = loop.create_future()
            self.finished = loop.create_future()
            self.conn = pika.adapters.asyncio_connection.AsyncioConnection(
                params,
                on_open_callback=self._on_open,
                on_open_error_callback=self._on_open_error,
                on_close_callback=self._on_close,
                custom_ioloop=loop,
            )
            return
        self.conn = pika.SelectConnection(
            params,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_close,
        )
        if not threaded:
            self.conn.ioloop.activate_poller()  # what ioloop.start() does before its loop
        if threaded:
            self.thread = threading.Thread(
                target=self._run, name="amqptasks-publisher", daemon=True
            )
            self.thread.start()

    def _set_ready(self) -> None:
        """Open (or failed to open, or closed): wake whoever waits for the link."""
        self.ready.set()
        if self.opened is not None and not self.opened.done():
            self.opened.set_result(None)

    def _stop_io(self) -> None:
        """The link is finished: stop its own I/O loop (never an asyncio loop it was lent)."""
        if self.loop is None:
            self.conn.ioloop.stop()
        elif self.finished is not None and not self.finished.done():
            self.finished.set_result(None)

    # -- direct links: driven by their caller -------------------------------------------------
    def poll_now(self) -> None:
        """Handle whatever the broker sent while nobody drove this (direct) link."""
        ioloop = self.conn.ioloop
        wake = ioloop.call_later(0, _noop)
        try:
            ioloop.poll()
            ioloop.process_timeouts()
        finally:
            ioloop.remove_timeout(wake)

    def drive(self, until: Callable[[], bool], timeout: float) -> bool:
        """Run this (direct) link's I/O in the calling thread until ``until()`` holds or
        ``timeout`` seconds pass; True when it holds. Only the link's owner may call it."""
        if until():
            return True
        ioloop = self.conn.ioloop
        wake = ioloop.call_later(max(timeout, 0.0), _noop)  # poll() returns by the deadline
        deadline = time.monotonic() + timeout
        try:
            while not until():
                if time.monotonic() >= deadline:
                    return False
                self._coalesce_output()
                ioloop.poll()
                ioloop.process_timeouts()
        finally:
            ioloop.remove_timeout(wake)
        return True

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
            self._set_ready()
            return
        self.channel.basic_consume(
            REPLY_TO, self._on_reply_message, auto_ack=True, callback=lambda _f: self._set_ready()
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
            else BrokerError(
                f"cannot connect to broker {redact_url(self.url)}: {connect_failure(exc)}"
            )
        )
        self.closed = True
        self._set_ready()
        self._stop_io()

    def _replies_lost(self) -> None:
        notify, self.on_replies_lost = self.on_replies_lost, None  # once
        if notify is not None and self.on_reply is not None:
            try:
                notify()
            except Exception:  # a waiter's problem must not break the close
                log.exception("replies-lost callback failed")

    def _on_close(self, _conn: Any, exc: BaseException) -> None:
        self.closed = True
        self._replies_lost()
        self.error = BrokerError(f"connection to broker {redact_url(self.url)} closed: {exc}")
        self._fail_all(
            BrokerError(
                f"connection to broker closed before the publish was confirmed ({exc}); "
                "the message may or may not have been delivered"
            )
        )
        self._set_ready()
        self._stop_io()

    def _on_channel_close(self, _ch: Any, exc: BaseException) -> None:
        self.closed = True
        self._replies_lost()
        reason = refusal(exc)  # e.g. no write permission on the exchange
        if reason is not None:
            self.error = refused(self.url, reason, "the publish")
            self._fail_all(self.error)
        else:
            self.error = BrokerError(f"publisher channel closed: {exc}")
            self._fail_all(
                BrokerError(
                    f"publisher channel closed before the confirm ({exc}); the message may "
                    "or may not have been delivered"
                )
            )
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

    def _coalesce_turn(self) -> None:
        self._coalescing = False
        self._coalesce_output()

    def _fail_outbox(self, exc: BaseException) -> None:
        for rec, _body, _props in self._outbox.take():
            if not rec.future.done():
                rec.future.set_exception(exc)

    # -- any thread ---------------------------------------------------------------------------
    def submit(self, rec: _Pending, body: bytes, props: pika.BasicProperties) -> None:
        if not self.threaded:  # the owner's own thread (or loop): straight onto the channel
            self.last_used = time.monotonic()
            self._publish(rec, body, props)
            if self.loop is not None and not self._coalescing:
                # Before the loop's next poll writes them: every frame of this turn, one send.
                self._coalescing = True
                self.loop.call_soon(self._coalesce_turn)
            return
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
                self._stop_io()
            elif not self.conn.is_closing:
                # Open, or still opening: pika then aborts the connect and closes the socket
                # (stopping the loop instead leaked the half-connected socket). Closing
                # already: _on_close will stop the loop.
                self.conn.close()

        if self.loop is not None or self.thread is None:
            # On an asyncio loop, the loop's callbacks finish the close; direct, it is driven
            # here and the ioloop's sockets released. Either way what waits fails now.
            direct = self.loop is None
            with contextlib.suppress(Exception):
                _close()
                if direct:
                    self.drive(lambda: self.conn.is_closed, 2.0)
            self.closed = True
            self._fail_all(self.error or BrokerError("publisher connection closed"))
            if direct:
                with contextlib.suppress(Exception):
                    self.conn.ioloop.deactivate_poller()
                    self.conn.ioloop.close()
            return
        if not self.closed:
            with contextlib.suppress(Exception):
                self.conn.ioloop.add_callback_threadsafe(_close)
        self.thread.join(timeout=5)


class _DrivenFuture(concurrent.futures.Future[None]):
    """The confirm of a publish on a direct link: waiting for it runs the link's I/O (in the
    owner's thread, the only one that waits for it: ``App`` waits for every publish it
    starts before it returns)."""

    def __init__(self, link: _Link) -> None:
        super().__init__()
        self._link = link

    def result(self, timeout: float | None = None) -> None:
        if not self.done():
            limit = self._link.timeout if timeout is None else timeout
            self._link.drive(self.done, limit)
            timeout = 0
        return super().result(timeout)


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
        on_replies_lost: Callable[[], object] | None = None,
    ) -> None:
        self.addresses = Addresses(url)
        self.url = self.addresses.urls[0]
        self.timeout = timeout
        self.name = name
        self.on_reply = on_reply
        #: Called when the link that consumed replies closed (see :class:`_Link`).
        self.on_replies_lost = on_replies_lost
        self.heartbeat = heartbeat
        self._link: _Link | None = None
        #: Links retired after a nack that still wait for their last confirms.
        self._retired: list[_Link] = []
        self._lock = threading.Lock()
        #: The direct link (no I/O thread) and the one thread it belongs to.
        self._direct: _Link | None = None
        self._owner: threading.Thread | None = None

    @property
    def reply_to(self) -> str | None:
        """The reply-to address for results, or None when this publisher takes no replies."""
        return REPLY_TO if self.on_reply is not None else None

    def _connected(self, deadline: float, direct: bool = False) -> _Link:
        """An open link, reconnecting (with backoff) until ``deadline`` if the broker is down
        or the last connection died: a publish waits a bounded time, then raises. A broker
        that refuses the login or the vhost raises :class:`BrokerRefused` at once.

        Which address, how long each attempt may take and when to back off are
        :class:`.failover.Attempts`' rules, shared with the worker's asyncio publisher.

        ``direct``: the calling thread's own link (see the module docstring), opened and
        replaced the same way but driven by this thread while it waits.
        """
        attempts = Attempts(self.addresses, deadline)
        while True:
            link = self._direct_link() if direct else self._threaded_link()
            share = attempts.share()
            opened = (
                link.ready.wait(share) if link.threaded else link.drive(link.ready.is_set, share)
            )
            if not opened:
                attempts.hung(link.url, share)
                with self._lock:
                    if self._link is link:
                        self._link = None
                    if self._direct is link:
                        self._direct = None
                link.close()
                continue
            if not link.closed:
                attempts.opened(link.url)
                return link
            pause = attempts.closed(link.url, link.error)
            if pause:
                time.sleep(pause)

    def _threaded_link(self) -> _Link:
        """The shared link (I/O thread): the current one, or a new one in its place."""
        with self._lock:
            link = self._link
            if link is not None and link.retiring and not link.closed:
                # Its last confirms are still due: it closes itself once they arrived.
                self._retired = [x for x in self._retired if not x.closed] + [link]
                link = self._link = self._new_link(link.url)
            if link is None or link.closed:
                if link is not None:
                    link.close()
                    if not link.retiring:
                        self.addresses.failed(link.url)
                url = self.addresses.preferred
                link = self._link = self._new_link(url)
            return link

    def _new_link(self, url: str) -> _Link:
        return _Link(
            url,
            self.name,
            self.timeout,
            self.on_reply,
            self.heartbeat,
            on_replies_lost=self.on_replies_lost,
        )

    def _direct_link(self) -> _Link:
        """The owner thread's link: the current one, or a new one in place of one that was
        lost, retired after a nack (closed at once: its owner is the only one who could
        wait for its last confirms, and it already did) or idle too long."""
        link = self._direct
        if link is not None and not link.closed and not link.retiring:
            idle = time.monotonic() - link.last_used
            if idle > DIRECT_RECHECK:  # read what came meanwhile: a close, a nack...
                link.poll_now()
            if idle < DIRECT_IDLE and not link.closed and not link.retiring:
                return link
            link.retiring = True  # idle: its heartbeats went unanswered; start afresh
        if link is not None:
            link.close()
            if not link.retiring:
                self.addresses.failed(link.url)
        url = link.url if link is not None and link.retiring else self.addresses.preferred
        link = _Link(url, self.name, self.timeout, None, self.heartbeat, threaded=False)
        with self._lock:
            self._direct = link
        return link

    def _takes_direct(self, props: Properties, mandatory: bool) -> bool:
        """May this publish go on the calling thread's direct link? Only a task publish that
        wants no reply, from the thread that owns the direct link (the first to ask, or
        anyone once that thread has ended)."""
        if not mandatory or props.reply_to is not None:
            return False
        me = threading.current_thread()
        owner = self._owner
        if owner is me:
            return True
        with self._lock:
            if self._owner is not None and self._owner.is_alive():
                return False
            old, self._direct, self._owner = self._direct, None, me
        if old is not None:  # its thread ended: nobody else may drive it, so close it here
            old.close()
        return True

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
        direct = self._takes_direct(props, mandatory)
        link = self._connected(deadline, direct)
        future: concurrent.futures.Future[None] = (
            _DrivenFuture(link) if direct else concurrent.futures.Future()
        )
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
            direct, self._direct = self._direct, None
        for old in retired:
            old.close()
        if link is not None:
            link.close()
        if direct is not None:
            direct.close()


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
