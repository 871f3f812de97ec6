"""The result stores the results and workflows groups measure against.

* **Redis**: the project's local one (``deploy/redis.sh``, ``$AMQPTASKS_REDIS_URL`` or
  ``127.0.0.1:$AMQPTASKS_REDIS_PORT``), on databases the tests never use — 14 for amqptasks'
  RedisStore, 15 for Celery's redis backend — flushed before and after every run, so a
  measurement never reads (or leaves) anybody else's keys. Its pub/sub channels are not per
  database; both frameworks name theirs by task id (UUIDs), so they cannot meet others'.
* **SQLite**: a fresh file per run in the harness's work directory (the same disk as the
  project's default ``.amqptasks/results.sqlite3``), removed with it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis

from .procs import BenchError

AMQPTASKS_DB = 14
CELERY_DB = 15


def _base_url() -> str:
    url = os.environ.get("AMQPTASKS_REDIS_URL")
    if url:
        return url
    return f"redis://127.0.0.1:{os.environ.get('AMQPTASKS_REDIS_PORT', '6379')}/0"


def redis_url(db: int) -> str:
    """The local Redis's URL with database ``db``."""
    parts = urlsplit(_base_url())
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, ""))


def flush(db: int) -> None:
    """Empty database ``db`` of the local Redis (BenchError naming how to start it)."""
    try:
        with redis.Redis.from_url(redis_url(db), socket_connect_timeout=2) as client:
            client.flushdb()
    except redis.RedisError as exc:
        raise BenchError(
            f"the local Redis does not answer ({type(exc).__name__}: {exc}); "
            "start it with `deploy/redis.sh start` (./dev bench does)"
        ) from None


def sqlite_url(workdir: Path) -> tuple[str, Path]:
    """A fresh SQLite store URL (absolute path, so every process opens the same file)."""
    path = workdir / f"results-{uuid.uuid4().hex[:8]}.sqlite3"
    return f"sqlite:///{path}", path


def remove_sqlite(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


@contextmanager
def fresh(kind: str, db: int, workdir: Path) -> Iterator[str | None]:
    """The URL of an empty store of ``kind`` for one run, emptied or removed afterwards:
    ``redis`` (database ``db``, flushed before and after), ``sqlite`` (a new file), ``rpc``
    (``rpc://``, nothing stored) or ``""`` (None: leave the framework's default)."""
    if kind == "redis":
        flush(db)
        try:
            yield redis_url(db)
        finally:
            flush(db)
    elif kind == "sqlite":
        url, path = sqlite_url(workdir)
        try:
            yield url
        finally:
            remove_sqlite(path)
    elif kind == "rpc":
        yield "rpc://"
    elif kind == "":
        yield None
    else:
        raise ValueError(f"unknown result store kind {kind!r}")
