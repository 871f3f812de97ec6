"""Header values pika decodes wrongly, decoded right: AMQP floats and doubles.

pika's field-table decoder reads a ``f`` (float) or ``d`` (double) value and then casts it to an
integer (``long(struct.unpack_from('>d', ...)[0])``; pika issue #599, closed unfixed). Our own
producers never send floats (``protocol.check_headers`` refuses them), but other clients do:
Celery's producer (py-amqp) writes ``soft_time_limit=0.5`` as the double 0.5 inside its
``timelimit`` header, which pika turned into ``0`` — no limit at all, silently.

Importing this module (the worker's consumer does) wraps ``pika.data.decode_value`` so those two
kinds decode to Python floats; every other kind is left to pika. ``decode_table`` and array
decoding look the function up in their module at each call, so nested values are covered.
"""

from __future__ import annotations

import struct
from typing import Any

import pika.data

__all__ = ["install"]

_pika_decode_value = pika.data.decode_value


def _decode_value(encoded: bytes, offset: int) -> tuple[Any, int]:
    kind = encoded[offset : offset + 1]
    if kind == b"d":
        return struct.unpack_from(">d", encoded, offset + 1)[0], offset + 9
    if kind == b"f":
        return struct.unpack_from(">f", encoded, offset + 1)[0], offset + 5
    value, end = _pika_decode_value(encoded, offset)
    return value, int(end)


def install() -> None:
    """Make pika decode float and double header values as floats (idempotent)."""
    pika.data.decode_value = _decode_value


install()
