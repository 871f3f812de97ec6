"""Telling "the broker refused us" from "the broker is not there".

A wrong password, a missing virtual host or a user without permission on it get the same
answer however often one asks, so every path that connects (publishers, topology, DLQ
sessions, the scheduler's lock, the worker's consumer) raises :class:`BrokerRefused` at once
with the broker's own reason, instead of retrying until a timeout and then blaming the
network. A broker that is down or unreachable keeps its bounded retry.

:func:`refusal` reads the reason out of the client exceptions:

* pika: ``ProbableAuthenticationError`` (403 ``ACCESS_REFUSED - Login was refused ...``),
  ``ProbableAccessDeniedError`` (530 ``NOT_ALLOWED - vhost x not found`` or ``NOT_ALLOWED -
  access to vhost 'x' refused for user 'u'``), ``AuthenticationError``, and a connection or
  channel closed by the broker with 403 (``ACCESS_REFUSED - access to queue ...``) or, for a
  connection, 530;
* aiormq: ``ProbableAuthenticationError``, ``ConnectionNotAllowed`` (530),
  ``ChannelAccessRefused`` (403);
* anything wrapping one of these in its ``__cause__``/``__context__`` chain.

**aiormq drops the reason of a refused virtual host.** It expects ``Connection.OpenOk`` and,
receiving ``Connection.Close`` instead, raises ``InvalidFrameError("Expected one of
['Connection.OpenOk'], got <Connection.Close object at 0x...>")`` before it looks at the
frame's reply text. That error can only mean the broker closed the connection in answer to
opening the virtual host, i.e. a refusal; to get its words back, :func:`refusal` given the
``url`` repeats the handshake once with pika (a blocking connection attempt bounded by
``timeout``, run on a thread by async callers) and returns pika's reason. Without a ``url``, or
if that second handshake is not refused the same way, it returns a generic reason that says
what is known. (Patching aiormq's handshake or parsing frames ourselves would reach into
aiormq's internals; the extra handshake costs milliseconds, on an error path only.)
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import aiormq.exceptions
import pika
import pika.exceptions

from ..config import redact_url
from ..errors import BrokerRefused

__all__ = ["refusal", "refused"]

#: pika's text for a handshake refusal: "ConnectionClosedByBroker: (530) 'NOT_ALLOWED - ...'"
_PIKA_CLOSE = re.compile(r"\((?P<code>\d+)\) (?P<quote>['\"])(?P<text>.*)(?P=quote)\s*$", re.S)
_OPEN_CLOSED = "the broker closed the connection while opening the virtual host"


def refusal(exc: BaseException, *, url: str | None = None, timeout: float = 5.0) -> str | None:
    """The broker's reason if ``exc`` means it refused the login, the virtual host or a
    permission (``ACCESS_REFUSED - ...``, ``NOT_ALLOWED - ...``); None for anything else
    (a broker that is down, a timeout, a network error, another channel error).

    ``url`` (with credentials) lets the aiormq case above recover the reason with one pika
    handshake; it blocks for up to ``timeout`` seconds, so async code runs this in a thread.
    """
    for e in _chain(exc):
        reason = _reason(e)
        if reason is not None:
            if reason == _OPEN_CLOSED and url is not None:
                return _ask(url, timeout) or reason
            return reason
    return None


def refused(url: str, reason: str, what: str = "the connection") -> BrokerRefused:
    """The :class:`BrokerRefused` to raise: names the broker (password redacted) and quotes
    the broker's reason."""
    return BrokerRefused(f"broker {redact_url(url)} refused {what}: {reason}", reason)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _reason(e: BaseException) -> str | None:
    if isinstance(e, BrokerRefused):
        return e.reason or str(e)
    # pika -------------------------------------------------------------------------------
    if isinstance(
        e,
        (
            pika.exceptions.ProbableAuthenticationError,
            pika.exceptions.ProbableAccessDeniedError,
            pika.exceptions.AuthenticationError,
        ),
    ):
        return _pika_text(e)
    if isinstance(e, pika.exceptions.ConnectionClosedByBroker) and e.reply_code in (403, 530):
        return str(e.reply_text)
    if isinstance(e, pika.exceptions.ChannelClosedByBroker) and e.reply_code == 403:
        return str(e.reply_text)
    # aiormq -----------------------------------------------------------------------------
    if isinstance(
        e,
        (
            aiormq.exceptions.ProbableAuthenticationError,
            aiormq.exceptions.AuthenticationError,
            aiormq.exceptions.ConnectionNotAllowed,
            aiormq.exceptions.ChannelAccessRefused,
        ),
    ):
        return _last_text(e.args) or type(e).__name__
    if isinstance(e, aiormq.exceptions.InvalidFrameError):
        text = " ".join(str(a) for a in e.args)
        if "Connection.OpenOk" in text and "Connection.Close" in text:
            return _OPEN_CLOSED
    return None


def _pika_text(e: BaseException) -> str:
    for arg in e.args:
        if isinstance(arg, pika.exceptions.ConnectionClosedByBroker):
            return str(arg.reply_text)
        if isinstance(arg, str):
            m = _PIKA_CLOSE.search(arg)
            if m is not None:
                return m["text"]
    return _last_text(e.args) or type(e).__name__


def _last_text(args: tuple[object, ...]) -> str:
    texts = [str(a).strip().strip("'\"") for a in args if isinstance(a, str) and a.strip()]
    return texts[-1] if texts else ""


def _ask(url: str, timeout: float) -> str | None:
    """Repeat the handshake with pika, which reports the reason aiormq dropped."""
    params = pika.URLParameters(url)
    params.connection_attempts = 1
    params.socket_timeout = timeout
    params.stack_timeout = timeout
    try:
        conn = pika.BlockingConnection(params)
    except Exception as exc:
        for e in _chain(exc):
            reason = _reason(e)
            if reason is not None:
                return reason
        return None
    conn.close()  # let in this time (a vhost created in between): keep the generic reason
    return None
