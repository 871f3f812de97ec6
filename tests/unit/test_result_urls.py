"""``results.backend`` URLs: what each scheme accepts and the one-line errors for the rest.

Only parsing is tested here (no store is opened): the errors are ValueErrors the config
layer wraps as ``ConfigError`` under ``results.backend``, and a password never appears in
them.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from amqptasks.results import (
    DEFAULT_EXPIRES,
    parse_redis_url,
    parse_sqlite_url,
    store_from_url,
)
from amqptasks.results.redis import RedisStore
from amqptasks.results.store import check_expires


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///.amqptasks/results.sqlite3", ".amqptasks/results.sqlite3"),
        ("sqlite:///results.db", "results.db"),
        ("sqlite:////var/lib/app/results.db", "/var/lib/app/results.db"),
        ("sqlite:///with%20space/r.db", "with space/r.db"),
        ("SQLITE:///r.db", "r.db"),
    ],
)
def test_sqlite_urls(url: str, path: str) -> None:
    assert parse_sqlite_url(url) == path


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("sqlite://", "use sqlite:///relative/path"),
        ("sqlite:/r.db", "use sqlite:///relative/path"),
        ("sqlite://host/r.db", "has no host \\(got 'host'\\)"),
        ("sqlite:///", "no file name"),
        ("sqlite:///dir/", "no file name"),
        ("sqlite:///:memory:", "in-memory database is not shared"),
        ("sqlite:///r.db?mode=ro", "no query"),
    ],
)
def test_bad_sqlite_urls(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        store_from_url(url)


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        ("redis://localhost", ("localhost", 6379, 0)),
        ("redis://127.0.0.1:6380/2", ("127.0.0.1", 6380, 2)),
        ("redis://:secret@cache:6379/0", ("cache", 6379, 0)),
        ("redis://user:secret@cache/1", ("cache", 6379, 1)),
        ("rediss://cache:6380/0?ssl_cert_reqs=none", ("cache", 6380, 0)),
        ("redis://cache/", ("cache", 6379, 0)),
    ],
)
def test_redis_urls(url: str, parsed: tuple[str, int, int]) -> None:
    assert parse_redis_url(url) == parsed


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://", "no host"),
        ("redis://:secret@:6379/0", "no host"),
        ("redis://:secret@cache:port/0", "Port could not be cast"),
        ("redis://:secret@cache:99999/0", "out of range"),
        ("redis://:secret@cache:6379/zero", "must be a database number, got 'zero'"),
        ("redis://:secret@cache:6379/0/1", "must be a database number"),
        ("redis://:secret@cache:6379/0?colour=red", "unknown option\\(s\\) colour"),
        ("redis://:secret@cache:6379/0#frag", "no fragment"),
    ],
)
def test_bad_redis_urls_never_show_the_password(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as info:
        store_from_url(url)
    assert "secret" not in str(info.value)


def test_rpc_means_no_store() -> None:
    assert store_from_url("rpc://") is None
    with pytest.raises(ValueError, match="rpc takes no host"):
        store_from_url("rpc://somewhere")


@pytest.mark.parametrize(
    "url", ["", "postgres://u:secret@db/results", "results.sqlite3", "amqp://guest:secret@h/"]
)
def test_unknown_schemes(url: str) -> None:
    with pytest.raises(ValueError, match="expected rpc://, sqlite:///relative/path") as info:
        store_from_url(url)
    assert "secret" not in str(info.value)


def test_a_redis_store_is_made_without_connecting_and_redacts_its_password() -> None:
    store = store_from_url("redis://:secret@127.0.0.1:1/0", expires=60)
    assert isinstance(store, RedisStore)
    assert store.url == "redis://:secret@127.0.0.1:1/0"  # as configured
    assert store.expires == 60.0
    assert "secret" not in repr(store) and ":***@" in repr(store)
    store.close()


def test_importing_amqptasks_loads_no_store_client() -> None:
    code = "import sys, amqptasks.results; print(sorted({'redis', 'sqlite3'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(("value", "expected"), [(None, None), (1, 1.0), (0.5, 0.5)])
def test_expires(value: float | None, expected: float | None) -> None:
    assert check_expires(value) == expected
    assert DEFAULT_EXPIRES == 86400.0


@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan"), True, "60"])
def test_bad_expires(value: object) -> None:
    with pytest.raises(ValueError, match="expires must be"):
        check_expires(value)  # type: ignore[arg-type]
