"""Float and double header values survive pika's decoder (amqptasks/transport/pika_fields.py).

The bytes are what py-amqp (Celery's client) writes for ``{"timelimit": [None, 0.5]}`` and
what RabbitMQ passes through unchanged; pika alone decodes 0.5 as 0 (pika issue #599).
"""

from __future__ import annotations

import struct

import pika.data

import amqptasks.transport.pika_consumer  # noqa: F401  (installs the fix, as the worker does)


def _table(**fields: bytes) -> bytes:
    body = b"".join(bytes([len(k)]) + k.encode() + v for k, v in fields.items())
    return struct.pack(">I", len(body)) + body


def _array(*items: bytes) -> bytes:
    body = b"".join(items)
    return b"A" + struct.pack(">I", len(body)) + body


def test_doubles_and_floats_in_headers_and_arrays_decode_as_floats():
    encoded = _table(
        timelimit=_array(b"V", b"d" + struct.pack(">d", 0.5)),
        ratio=b"f" + struct.pack(">f", 0.25),
        count=b"I" + struct.pack(">i", 7),
        name=b"S" + struct.pack(">I", 3) + b"add",
    )
    table, end = pika.data.decode_table(encoded, 0)
    assert end == len(encoded)
    assert table == {"timelimit": [None, 0.5], "ratio": 0.25, "count": 7, "name": "add"}
    assert isinstance(table["timelimit"][1], float)
