"""Results: the rpc handles (direct reply-to) and the stores where results outlive the caller.

::

    handles.py AsyncResult and GroupResult: read a reply when one comes, else the store
    rpc.py     ResultCollector over AMQP direct reply-to, and remote_error
    meta.py    ResultMeta, the stored record, and the task states (pure)
    store.py   the ResultStore protocol (the seam) and ChordProgress (pure)
    sqlite.py  SqliteStore: one file shared by the processes of one host (the default)
    redis.py   RedisStore: shared by many hosts (the only module importing redis-py)

:func:`store_from_url` turns ``results.backend`` into a store. The store modules are imported
only when their scheme is used, so ``import amqptasks`` loads neither sqlite3 nor redis-py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, unquote, urlsplit

from ..config import redact_url
from .handles import AsyncResult, GroupResult, ResultBackend
from .meta import (
    FAILURE,
    PENDING,
    READY_STATES,
    RETRY,
    REVOKED,
    STARTED,
    STATES,
    SUCCESS,
    EncodedRecord,
    ResultMeta,
    StoredRecord,
    encode_success,
    utcnow,
)
from .rpc import ResultCollector, remote_error
from .store import DEFAULT_EXPIRES, ChordProgress, ResultStore

if TYPE_CHECKING:
    from .redis import RedisStore
    from .sqlite import SqliteStore

__all__ = [
    "DEFAULT_EXPIRES",
    "FAILURE",
    "PENDING",
    "READY_STATES",
    "RETRY",
    "REVOKED",
    "STARTED",
    "STATES",
    "SUCCESS",
    "AsyncResult",
    "ChordProgress",
    "EncodedRecord",
    "GroupResult",
    "ResultBackend",
    "ResultCollector",
    "ResultMeta",
    "ResultStore",
    "StoredRecord",
    "encode_success",
    "parse_redis_url",
    "parse_sqlite_url",
    "remote_error",
    "store_from_url",
    "utcnow",
]

#: Query options a redis:// URL may carry (passed to redis-py); anything else is refused.
REDIS_URL_OPTIONS = frozenset(
    {
        "socket_timeout",
        "socket_connect_timeout",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_check_hostname",
    }
)
_EXPECTED = (
    "expected rpc://, sqlite:///relative/path, sqlite:////absolute/path or redis://host:port/db"
)


def store_from_url(url: str, *, expires: float | None = DEFAULT_EXPIRES) -> ResultStore | None:
    """The store ``url`` names, or None for ``rpc://`` (direct reply-to, nothing stored).

    Raises ValueError with a one-line reason (the URL's password redacted) that config wraps
    as a ConfigError under ``results.backend``; a store that cannot be opened (a directory
    that cannot be created, a file that is not a database) raises ResultStoreError.
    """
    if not isinstance(url, str) or not url:
        raise ValueError(f"results backend must be a URL, got {url!r}; {_EXPECTED}")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "rpc":
        if url.lower() not in ("rpc://", "rpc:"):
            raise ValueError(f"results backend {redact_url(url)!r}: rpc takes no host or path")
        return None
    if scheme == "sqlite":
        return _sqlite(url, expires)
    if scheme in ("redis", "rediss"):
        return _redis(url, expires)
    raise ValueError(f"results backend {redact_url(url)!r}: unknown scheme {scheme!r}; {_EXPECTED}")


def _sqlite(url: str, expires: float | None) -> SqliteStore:
    from .sqlite import SqliteStore

    return SqliteStore(parse_sqlite_url(url), url=url, expires=expires)


def _redis(url: str, expires: float | None) -> RedisStore:
    parse_redis_url(url)
    from .redis import RedisStore

    return RedisStore(url, expires=expires)


def parse_sqlite_url(url: str) -> str:
    """The file path of ``sqlite:///relative/path`` or ``sqlite:////absolute/path``."""
    prefix = "sqlite:///"
    if not url.lower().startswith(prefix):
        host = url[len("sqlite:") :].lstrip("/").split("/", 1)[0]
        if url.lower().startswith("sqlite://") and host:
            raise ValueError(
                f"results backend {url!r}: an sqlite URL has no host (got {host!r}); "
                "use sqlite:///relative/path or sqlite:////absolute/path"
            )
        raise ValueError(
            f"results backend {url!r}: use sqlite:///relative/path or sqlite:////absolute/path"
        )
    rest = url[len(prefix) :]
    if "?" in rest or "#" in rest:
        raise ValueError(f"results backend {url!r}: sqlite URLs take no query or fragment")
    path = unquote(rest)
    if not path or path.endswith("/"):
        raise ValueError(f"results backend {url!r}: no file name after sqlite:///")
    if path == ":memory:" or path.startswith("file:"):
        raise ValueError(
            f"results backend {url!r}: an in-memory database is not shared between threads "
            "or processes; name a file"
        )
    return path


def parse_redis_url(url: str) -> tuple[str, int, int]:
    """Validate ``redis[s]://[[user]:password@]host[:port][/db]``; returns (host, port, db)."""
    safe = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port or 6379
    except ValueError as exc:
        raise ValueError(f"results backend {safe!r}: {exc}") from None
    if parts.scheme.lower() not in ("redis", "rediss"):
        raise ValueError(f"results backend {safe!r}: expected redis:// or rediss://")
    if not parts.hostname:
        raise ValueError(f"results backend {safe!r}: no host (redis://host:port/db)")
    path = parts.path.strip("/")
    if path and not (path.isascii() and path.isdigit()):
        raise ValueError(
            f"results backend {safe!r}: the path must be a database number, got {path!r}"
        )
    if parts.fragment:
        raise ValueError(f"results backend {safe!r}: a redis URL takes no fragment")
    try:
        options = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise ValueError(f"results backend {safe!r}: bad query string: {exc}") from None
    unknown = sorted({name for name, _ in options} - REDIS_URL_OPTIONS)
    if unknown:
        raise ValueError(
            f"results backend {safe!r}: unknown option(s) {', '.join(unknown)} "
            f"(known: {', '.join(sorted(REDIS_URL_OPTIONS))})"
        )
    return parts.hostname, port, int(path or 0)
