"""Fixtures for tests of the result stores: a real SQLite file per test, a real Redis.

The Redis is the one ``deploy/redis.sh`` runs (or ``$AMQPTASKS_REDIS_URL``). Each test gets
its own key namespace (and so its own pub/sub channels, which Redis does not separate by
database) and its keys are deleted afterwards. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from amqptasks.results.redis import RedisStore
from amqptasks.results.sqlite import SqliteStore
from amqptasks.results.store import DEFAULT_EXPIRES, ResultStore

SUPPORT = Path(__file__).resolve().parent
ROOT = SUPPORT.parents[1]
REDIS_URL = os.environ.get(
    "AMQPTASKS_REDIS_URL", f"redis://127.0.0.1:{os.environ.get('AMQPTASKS_REDIS_PORT', '6379')}/0"
)


def raw_redis() -> redis.Redis:
    """A plain redis-py client on the test Redis (for inspection, never for the code under
    test)."""
    return redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=10)


def redis_available() -> bool:
    try:
        with raw_redis() as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


class StoreFactory:
    """Makes stores of one kind on one test's storage; closes them (LIFO) at teardown.

    ``spec()`` describes the same storage as JSON, for a child process
    (``tests/support/store_child.py``) to open it the same way.
    """

    def __init__(self, kind: str, *, path: Path | None = None, namespace: str | None = None):
        self.kind = kind
        self.path = path
        self.namespace = namespace
        self.client_name = f"amqptasks-test-{uuid.uuid4().hex[:12]}"
        self.stores: list[ResultStore] = []

    def __call__(self, expires: float | None = DEFAULT_EXPIRES) -> Any:
        store = open_store(self.spec(expires))
        self.stores.append(store)
        return store

    def spec(self, expires: float | None = DEFAULT_EXPIRES) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": str(self.path) if self.path else None,
            "url": REDIS_URL,
            "namespace": self.namespace,
            "client_name": self.client_name,
            "expires": expires,
        }

    def close(self) -> None:
        for store in reversed(self.stores):
            store.close()


def open_store(spec: dict[str, Any]) -> Any:
    if spec["kind"] == "sqlite":
        return SqliteStore(spec["path"], expires=spec["expires"])
    return RedisStore(
        spec["url"],
        expires=spec["expires"],
        namespace=spec["namespace"],
        client_name=spec["client_name"],
    )


def child_command(spec: dict[str, Any]) -> list[str]:
    """The command line of ``store_child.py`` on the storage ``spec`` describes."""
    return [sys.executable, str(SUPPORT / "store_child.py"), json.dumps(spec)]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SUPPORT), str(ROOT)])}


def run_child(spec: dict[str, Any], *args: str, stdin: str = "", timeout: float = 120) -> str:
    """Run ``store_child.py`` in a fresh interpreter; its stdout (it must exit 0)."""
    proc = subprocess.run(
        [*child_command(spec), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=child_env(),
    )
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="session")
def redis_up() -> None:
    if not redis_available():
        pytest.fail(
            f"Redis is not reachable at {REDIS_URL}: start it with `deploy/redis.sh start` "
            "(`./dev test` does this for you)"
        )


@pytest.fixture
def redis_store_factory(redis_up: None) -> Iterator[StoreFactory]:
    namespace = f"amqptasks-test-{uuid.uuid4().hex[:12]}"
    factory = StoreFactory("redis", namespace=namespace)
    try:
        yield factory
    finally:
        factory.close()
        with raw_redis() as client:
            keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
            if keys:
                client.delete(*keys)


@pytest.fixture
def redis_store(redis_store_factory: StoreFactory) -> RedisStore:
    store: RedisStore = redis_store_factory()
    return store


@pytest.fixture
def sqlite_store_factory(tmp_path: Path) -> Iterator[StoreFactory]:
    factory = StoreFactory("sqlite", path=tmp_path / "results.sqlite3")
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def sqlite_store(sqlite_store_factory: StoreFactory) -> SqliteStore:
    store: SqliteStore = sqlite_store_factory()
    return store
