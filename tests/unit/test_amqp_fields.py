"""protocol.check_headers / check_shortstr / check_priority: what a publish may carry.

The accepted header values must be exactly those both client encoders can write (pika for
the sync publisher and the worker, pamqp under aio-pika): the encoders are pure functions, so
the test asks them instead of restating their limits.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pamqp.encode
import pika.data
import pytest

from amqptasks.protocol import check_headers, check_priority, check_shortstr
from amqptasks.transport.aio import _table

UTC = timezone.utc
CORPUS: list[Any] = [
    None,
    True,
    False,
    0,
    2**63 - 1,
    2**63,
    -(2**63),
    -(2**63) - 1,
    2**70,
    1.5,
    float("nan"),
    "text",
    "é",
    "\ud800",  # a lone surrogate is not UTF-8
    b"\x00\xff",
    bytearray(b"x"),
    Decimal("1.25"),
    Decimal("-2147483648"),
    Decimal("2147483648"),
    Decimal("1E+20"),
    Decimal("0.0000000001"),
    Decimal("1.0000000000"),  # pika normalises it to 1; pamqp's mantissa would overflow
    Decimal("NaN"),
    Decimal("-Infinity"),
    datetime(2030, 1, 1, tzinfo=UTC),
    datetime(2030, 1, 1),
    datetime(1970, 1, 1, tzinfo=UTC),
    datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC),
    datetime(1970, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))),  # 1969 in UTC
    [1, "a", None],
    [1, object()],
    (1, 2),
    {1, 2},
    {"nested": {"deep": [True]}},
    {"nested": {1: "int key"}},
    object(),
]


def _pika_encodes(value: Any) -> bool:
    try:
        pika.data.encode_table([], {"k": value})
    except Exception:
        return False
    return True


def _pamqp_encodes(value: Any) -> bool:
    try:
        pamqp.encode.field_table({"k": _table(value)})
    except Exception:
        return False
    return True


@pytest.mark.parametrize("value", CORPUS, ids=[repr(v)[:40] for v in CORPUS])
def test_a_header_value_is_accepted_exactly_when_both_clients_can_encode_it(value: Any) -> None:
    both = _pika_encodes(value) and _pamqp_encodes(value)
    try:
        check_headers({"k": value})
    except (TypeError, ValueError) as exc:
        assert not both, f"refused although both clients encode it: {exc}"
        assert "headers['k']" in str(exc)
    else:
        assert both, "accepted although a client cannot encode it"


def test_header_keys_are_str_of_at_most_128_bytes() -> None:
    check_headers({"k" * 128: 1})
    with pytest.raises(ValueError, match="129 bytes"):
        check_headers({"k" * 129: 1})  # pamqp would truncate it with only a log warning
    with pytest.raises(ValueError, match="130 bytes"):
        check_headers({"é" * 65: 1})
    with pytest.raises(TypeError, match=r"headers\['a'\]: key b'x' must be a str"):
        check_headers({"a": {b"x": 1}})
    assert check_headers(None) == {}


def test_the_error_names_the_path_to_the_bad_value() -> None:
    with pytest.raises(TypeError) as err:
        check_headers({"tenant": {"ids": [1, 2, {3}]}})
    assert str(err.value).startswith("headers['tenant']['ids'][2] has type set")
    with pytest.raises(TypeError, match=r"\(use a list\)"):
        check_headers({"pair": (1, 2)})
    with pytest.raises(TypeError, match="must be a mapping with str keys, got list"):
        check_headers([("k", "v")])


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("x" * 255, None),
        ("", None),
        ("x" * 256, ValueError),
        ("é" * 128, ValueError),  # 256 bytes in 128 characters
        ("\ud800", ValueError),
        (5, TypeError),
        (None, TypeError),
    ],
)
def test_shortstr_is_a_str_of_at_most_255_utf8_bytes(value: Any, error: Any) -> None:
    if error is None:
        assert check_shortstr(value, "routing_key") == value
    else:
        with pytest.raises(error, match="routing_key"):
            check_shortstr(value, "routing_key")
    if value == "":
        with pytest.raises(ValueError, match="task_id must not be empty"):
            check_shortstr(value, "task_id", empty=False)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (None, None),
        (0, None),
        (255, None),
        (256, ValueError),
        (-1, ValueError),
        (True, TypeError),
        ("5", TypeError),
        (5.0, TypeError),
    ],
)
def test_priority_is_an_int_from_0_to_255(value: Any, error: Any) -> None:
    if error is None:
        assert check_priority(value) == value
    else:
        with pytest.raises(error, match="priority"):
            check_priority(value)
