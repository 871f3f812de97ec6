"""A faster reading of the three frames every delivery is made of, for the consuming connection.

Why: a profile of a worker draining no-op tasks put about half of its time in pika's frame
layer, and most of that is generic machinery spent per frame: the read buffer copied once per
frame consumed (``_trim_frame_buffer``), a ``Method``/``Header``/``Body`` wrapper and a
``spec.Basic.Deliver``/``BasicProperties`` object built through their general decoders, a
callback-registry lookup for every frame, and the channel's content assembler. A delivery
is always the same frames (``basic.deliver``, a content header, the body: one frame for any
body under the frame size, none for an empty one), so :class:`ConsumerConnection` reads
those directly from the buffer by offset (all at once when they are all there) and hands the
consumer small slotted objects with the attributes pika's would have; every other frame
(heartbeats, ``basic.cancel``, ``channel.close``, RPC replies, a ``basic.get-ok`` or
``basic.return`` and their content) goes to pika's own decoder and dispatch, unchanged.
Only channels registered with :meth:`ConsumerConnection.fast_channel` take the fast path.

What is kept exactly as pika does it: string fields are decoded as UTF-8 and kept as bytes
when they are not UTF-8 (``pika.data.decode_short_string``); the header table is read by
``pika.data.decode_table`` (with ``pika_fields``' float fix); a bad frame end raises
``InvalidFrameError``; a body longer than its header said raises ``BodyTooLongError``;
deliveries for a consumer cancelled on our side are rejected (requeued) by the channel's own
``_on_deliver``; ``bytes_received``/``frames_received`` count every frame, as the heartbeat
checker reads them. Nothing here writes to the socket.
"""

from __future__ import annotations

import struct
from typing import Any

import pika.adapters.asyncio_connection
import pika.channel
import pika.data
import pika.exceptions
import pika.frame
import pika.spec

__all__ = ["ConsumerConnection", "Deliver", "Props", "decode_deliver", "decode_props"]

_HEAD = struct.Struct(">BHL")  # frame type, channel, payload size
_METHOD_ID = struct.Struct(">I")
_CONTENT = struct.Struct(">HHQ")  # class id, weight, body size
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_DELIVER_ID = pika.spec.Basic.Deliver.INDEX  # 0x003C003C
_BASIC_CLASS = pika.spec.Basic.INDEX
_FRAME_END = pika.spec.FRAME_END
_decode_table = pika.data.decode_table


def _short(buf: bytes, offset: int) -> tuple[str | bytes, int]:
    """An AMQP short string at ``offset``: pika's decoding (UTF-8, else the raw bytes)."""
    length = buf[offset]
    offset += 1
    raw = buf[offset : offset + length]
    try:
        return raw.decode("utf8"), offset + length
    except UnicodeDecodeError:
        return raw, offset + length


class Deliver:
    """``basic.deliver``'s fields, under the names ``spec.Basic.Deliver`` gives them."""

    __slots__ = ("consumer_tag", "delivery_tag", "exchange", "redelivered", "routing_key")

    def __init__(
        self,
        consumer_tag: str | bytes,
        delivery_tag: int,
        redelivered: bool,
        exchange: str | bytes,
        routing_key: str | bytes,
    ) -> None:
        self.consumer_tag = consumer_tag
        self.delivery_tag = delivery_tag
        self.redelivered = redelivered
        self.exchange = exchange
        self.routing_key = routing_key

    def __repr__(self) -> str:
        return f"<Basic.Deliver tag={self.delivery_tag} consumer={self.consumer_tag!r}>"


class Props:
    """A content header's basic properties, under ``spec.BasicProperties``' names (None when
    absent)."""

    __slots__ = (
        "app_id",
        "cluster_id",
        "content_encoding",
        "content_type",
        "correlation_id",
        "delivery_mode",
        "expiration",
        "headers",
        "message_id",
        "priority",
        "reply_to",
        "timestamp",
        "type",
        "user_id",
    )
    app_id: str | bytes | None
    cluster_id: str | bytes | None
    content_encoding: str | bytes | None
    content_type: str | bytes | None
    correlation_id: str | bytes | None
    delivery_mode: int | None
    expiration: str | bytes | None
    headers: dict[str, Any] | None
    message_id: str | bytes | None
    priority: int | None
    reply_to: str | bytes | None
    timestamp: int | None
    type: str | bytes | None
    user_id: str | bytes | None

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}={getattr(self, name)!r}"
            for name in self.__slots__
            if getattr(self, name) is not None
        )
        return f"<Props {fields}>"


def decode_deliver(buf: bytes, offset: int) -> Deliver:
    """``basic.deliver``'s arguments, which start at ``offset`` (after the method id)."""
    consumer_tag, offset = _short(buf, offset)
    delivery_tag = _U64.unpack_from(buf, offset)[0]
    redelivered = bool(buf[offset + 8] & 1)
    exchange, offset = _short(buf, offset + 9)
    routing_key, offset = _short(buf, offset)
    return Deliver(consumer_tag, delivery_tag, redelivered, exchange, routing_key)


def decode_props(buf: bytes, offset: int) -> Props:
    """Basic properties starting at ``offset`` (the property flags), in the wire's order
    (AMQP 0-9-1, class basic: flag bits 15 down to 2). Written out field by field rather
    than as a loop over a table: this runs once per delivery. A flag word with its
    continuation bit set (more than 15 properties: not class basic's) is refused."""
    flags = _U16.unpack_from(buf, offset)[0]
    if flags & 1:
        raise pika.exceptions.InvalidFrameError("property flags continue past class basic's 14")
    offset += 2
    p = Props()
    short = _short
    if flags & 0x8000:
        p.content_type, offset = short(buf, offset)
    else:
        p.content_type = None
    if flags & 0x4000:
        p.content_encoding, offset = short(buf, offset)
    else:
        p.content_encoding = None
    if flags & 0x2000:
        p.headers, offset = _decode_table(buf, offset)
    else:
        p.headers = None
    if flags & 0x1000:
        p.delivery_mode = buf[offset]
        offset += 1
    else:
        p.delivery_mode = None
    if flags & 0x0800:
        p.priority = buf[offset]
        offset += 1
    else:
        p.priority = None
    if flags & 0x0400:
        p.correlation_id, offset = short(buf, offset)
    else:
        p.correlation_id = None
    if flags & 0x0200:
        p.reply_to, offset = short(buf, offset)
    else:
        p.reply_to = None
    if flags & 0x0100:
        p.expiration, offset = short(buf, offset)
    else:
        p.expiration = None
    if flags & 0x0080:
        p.message_id, offset = short(buf, offset)
    else:
        p.message_id = None
    if flags & 0x0040:
        p.timestamp = _U64.unpack_from(buf, offset)[0]
        offset += 8
    else:
        p.timestamp = None
    if flags & 0x0020:
        p.type, offset = short(buf, offset)
    else:
        p.type = None
    if flags & 0x0010:
        p.user_id, offset = short(buf, offset)
    else:
        p.user_id = None
    if flags & 0x0008:
        p.app_id, offset = short(buf, offset)
    else:
        p.app_id = None
    if flags & 0x0004:
        p.cluster_id, _offset = short(buf, offset)
    else:
        p.cluster_id = None
    return p


class _Frame:
    """What ``Channel._on_deliver`` reads of pika's method and header frames."""

    __slots__ = ("method", "properties")

    def __init__(self, method: Any = None, properties: Any = None) -> None:
        self.method = method
        self.properties = properties


def _hand_over(
    channel: pika.channel.Channel, deliver: Deliver | None, props: Props | None, body: bytes
) -> None:
    """A read delivery to the channel's own dispatch: its consumer lookup, and its reject of
    a delivery that reaches a consumer cancelled on our side."""
    channel._on_deliver(_Frame(deliver), _Frame(properties=props), body)


class _Content:
    """One fast channel's delivery being read: its ``basic.deliver``, properties, body."""

    __slots__ = ("channel", "deliver", "fragments", "props", "remaining", "size")

    def __init__(self, channel: pika.channel.Channel) -> None:
        self.channel = channel
        self.deliver: Deliver | None = None
        self.props: Props | None = None
        self.size = 0
        self.remaining = 0
        self.fragments: list[bytes] = []


class ConsumerConnection(pika.adapters.asyncio_connection.AsyncioConnection):  # type: ignore[misc]
    """pika's ``AsyncioConnection`` that reads deliveries on its fast channels itself (see
    the module docstring); every other frame is pika's."""

    _frame_buffer: bytes  # pika's: bytes read and not yet made into frames

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._fast: dict[int, _Content] = {}
        super().__init__(*args, **kwargs)

    def fast_channel(self, channel: pika.channel.Channel) -> None:
        """Read this channel's deliveries on the fast path (a channel whose only content is
        ``basic.deliver``: a consuming channel that never ``basic.get``\\ s or publishes)."""
        self._fast[channel.channel_number] = _Content(channel)

    def _on_data_available(self, data_in: bytes) -> None:
        fast = self._fast
        if not fast:
            super()._on_data_available(data_in)
            return
        buf = self._frame_buffer + data_in if self._frame_buffer else data_in
        self._frame_buffer = b""
        if buf[:4] == b"AMQP":  # the broker's protocol header: pika's to handle
            self._frame_buffer = buf
            super()._on_data_available(b"")
            return
        pos = 0
        size_all = len(buf)
        unpack_head = _HEAD.unpack_from
        try:
            while size_all - pos >= 8:
                kind, number, size = unpack_head(buf, pos)
                end = pos + 8 + size
                if end > size_all:
                    break
                if buf[end - 1] != _FRAME_END:
                    raise pika.exceptions.InvalidFrameError("Invalid FRAME_END marker")
                content = fast.get(number)
                start = pos
                pos = end  # before any dispatch: a consumer that raises never sees it again
                if content is None:
                    self._to_pika(buf, start, end)
                    continue
                if (
                    kind == 1
                    and content.deliver is None
                    and end + 8 <= size_all
                    and _METHOD_ID.unpack_from(buf, start + 7)[0] == _DELIVER_ID
                ):
                    # The common case: a whole delivery (its three frames) in the buffer.
                    whole = self._whole(content, buf, start, end, size_all)
                    if whole is not None:
                        pos, deliver, props, body = whole
                        self.bytes_received += pos - start
                        self.frames_received += 3 if body else 2
                        _hand_over(content.channel, deliver, props, body)
                        continue
                if self._take(content, kind, buf, start + 7, end - 1):
                    self.bytes_received += end - start
                    self.frames_received += 1
                else:
                    self._to_pika(buf, start, end)
        finally:
            if pos < size_all:
                self._frame_buffer = buf[pos:]

    def _to_pika(self, buf: bytes, start: int, end: int) -> None:
        """The frame ``buf[start:end]`` decoded and dispatched by pika, as it would have."""
        _used, frame_value = pika.frame.decode_frame(buf[start:end])
        self.bytes_received += end - start
        if frame_value is not None:
            self._process_frame(frame_value)

    def _whole(
        self, content: _Content, buf: bytes, pos: int, end: int, size_all: int
    ) -> tuple[int, Deliver, Props, bytes] | None:
        """Read a delivery whose method frame is ``buf[pos:end]`` when its content header and
        one body frame follow in full: the offset after them and the delivery; None when
        they are not all here or the body comes in several frames (the frame-by-frame path
        reads it then)."""
        kind, number, size = _HEAD.unpack_from(buf, end)
        head_end = end + 8 + size
        if kind != 2 or number != content.channel.channel_number or head_end > size_all:
            return None
        class_id, _weight, body_size = _CONTENT.unpack_from(buf, end + 7)
        if class_id != _BASIC_CLASS or buf[head_end - 1] != _FRAME_END:
            return None
        if body_size == 0:
            body_end = head_end
            body = b""
        else:
            if head_end + 8 > size_all:
                return None
            kind, number, size = _HEAD.unpack_from(buf, head_end)
            body_end = head_end + 8 + size
            if (
                kind != 3
                or number != content.channel.channel_number
                or size != body_size
                or body_end > size_all
                or buf[body_end - 1] != _FRAME_END
            ):
                return None
            body = buf[head_end + 7 : body_end - 1]
        return body_end, decode_deliver(buf, pos + 11), decode_props(buf, end + 19), body

    def _take(self, content: _Content, kind: int, buf: bytes, start: int, stop: int) -> bool:
        """Read one frame of a fast channel (payload ``buf[start:stop]``); False: not a
        delivery's frame, pika's to handle."""
        if kind == pika.spec.FRAME_METHOD:
            if content.deliver is not None:
                raise pika.exceptions.UnexpectedFrameError(
                    f"a method frame on channel {content.channel.channel_number} in the middle "
                    "of a delivery's content"
                )
            if _METHOD_ID.unpack_from(buf, start)[0] != _DELIVER_ID:
                return False
            content.deliver = decode_deliver(buf, start + 4)
            return True
        if content.deliver is None:
            return False  # content after a basic.get-ok or basic.return: pika's assembler
        if kind == pika.spec.FRAME_HEADER:
            class_id, _weight, body_size = _CONTENT.unpack_from(buf, start)
            if class_id != _BASIC_CLASS or content.props is not None:
                raise pika.exceptions.UnexpectedFrameError(
                    f"content header of class {class_id} on channel "
                    f"{content.channel.channel_number}"
                )
            content.props = decode_props(buf, start + 12)
            content.size = content.remaining = body_size
            if body_size == 0:
                self._deliver(content, b"")
            return True
        if kind == pika.spec.FRAME_BODY and content.props is not None:
            fragment = buf[start:stop]
            content.remaining -= len(fragment)
            if content.remaining > 0:
                content.fragments.append(fragment)
                return True
            if content.remaining < 0:
                raise pika.exceptions.BodyTooLongError(
                    content.size - content.remaining, content.size
                )
            if content.fragments:
                content.fragments.append(fragment)
                fragment = b"".join(content.fragments)
                content.fragments = []
            self._deliver(content, fragment)
            return True
        raise pika.exceptions.UnexpectedFrameError(
            f"frame type {kind} on channel {content.channel.channel_number} during a delivery"
        )

    def _deliver(self, content: _Content, body: bytes) -> None:
        deliver, props = content.deliver, content.props
        content.deliver = content.props = None
        _hand_over(content.channel, deliver, props, body)

    def _on_channel_cleanup(self, channel: pika.channel.Channel) -> None:
        self._fast.pop(channel.channel_number, None)
        super()._on_channel_cleanup(channel)
