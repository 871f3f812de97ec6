"""Tell "the broker refused us" apart from "the broker is not there".

A wrong password, a missing vhost or a missing permission will not heal by waiting: every
connection attempt gets the same answer. Callers that retry an unreachable broker (publishers,
the worker, beat) must stop at once on these and show the broker's own reason.
"""

from __future__ import annotations

import re

import pika.exceptions

__all__ = ["refusal"]

#: AMQP reply codes of a refusal: 403 ACCESS_REFUSED (login, permissions), 530 NOT_ALLOWED
#: (vhost missing or not allowed).
REFUSAL_CODES = (403, 530)
_REASON = re.compile(r"((?:ACCESS_REFUSED|NOT_ALLOWED) - [^'\"]*)")


def refusal(exc: BaseException | None) -> str | None:
    """The broker's reason text when ``exc`` (or its cause) is a refusal, else None."""
    seen = 0
    while exc is not None and seen < 5:
        if (
            isinstance(
                exc,
                pika.exceptions.ConnectionClosedByBroker | pika.exceptions.ChannelClosedByBroker,
            )
            and exc.reply_code in REFUSAL_CODES
        ):
            return str(exc.reply_text)
        if isinstance(
            exc,
            pika.exceptions.ProbableAuthenticationError | pika.exceptions.ProbableAccessDeniedError,
        ):
            match = _REASON.search(str(exc))
            return match.group(1) if match else str(exc)
        match = _REASON.search(str(exc))
        if match:
            return match.group(1)
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None
