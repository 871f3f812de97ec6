"""SqliteStore: results in one SQLite file that every process on the host shares (stdlib sqlite3).

The default store: nothing to run, results survive restarts, and several processes on one
host (workers, a web app, a shell) share the file. Not for many hosts: SQLite over a network
file system is not safe — use Redis there.

* WAL journal (readers never block the writer, nor it them), ``synchronous=FULL`` (a result
  the worker acked survives a power cut), ``busy_timeout`` for writers that meet.
* One connection per thread (sqlite3 connections are not to be shared between threads),
  reopened after ``fork``; every write is ``BEGIN IMMEDIATE`` (takes the write lock first, so
  two writers never deadlock upgrading a read).
* Reads ignore rows past their ``expires_at``; :meth:`SqliteStore.purge_expired` deletes
  them (``save`` also calls it, at most once per ``purge_interval``).
* ``wait``: see :meth:`SqliteStore.wait` — SQLite has no notifications between processes.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import ResultStoreError
from ..protocol import dumps, loads
from .meta import READY_STATES, ResultMeta, StoredRecord
from .store import (
    DEFAULT_EXPIRES,
    ChordMember,
    ChordProgress,
    check_chord_member,
    check_expires,
)

__all__ = ["SCHEMA_VERSION", "SqliteStore"]

#: ``PRAGMA user_version`` of the file's layout; a file from a newer layout is refused.
SCHEMA_VERSION = 1
_READY_SQL = ", ".join(f"'{s}'" for s in sorted(READY_STATES))
_LIVE = "(expires_at IS NULL OR expires_at > ?)"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    meta TEXT NOT NULL,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS results_expires_at ON results (expires_at)
    WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS groups (
    id TEXT PRIMARY KEY,
    members TEXT NOT NULL,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS groups_expires_at ON groups (expires_at)
    WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS chords (
    id TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    failed_index INTEGER,
    body_sent TEXT,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS chords_expires_at ON chords (expires_at)
    WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS chord_members (
    chord_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    meta TEXT NOT NULL,
    PRIMARY KEY (chord_id, idx)
) WITHOUT ROWID;
"""
# The rule of store.replaceable, in SQL: a stored READY record (still alive) is kept.
_UPSERT = f"""
INSERT INTO results (id, status, meta, expires_at) VALUES (?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    status = excluded.status, meta = excluded.meta, expires_at = excluded.expires_at
WHERE results.status NOT IN ({_READY_SQL})
   OR (results.expires_at IS NOT NULL AND results.expires_at <= ?)
"""
# The same rule for a whole batch in one statement: rows of a JSON array [[id, status, meta],
# ...], upserted in array order (ORDER BY key), so a later row of one id meets the earlier one
# exactly as separate statements would. ("WHERE true": SQLite's parser needs it before
# ON CONFLICT after a SELECT.)
_UPSERT_BATCH = f"""
INSERT INTO results (id, status, meta, expires_at)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'), ?
FROM json_each(?) WHERE true ORDER BY key
ON CONFLICT (id) DO UPDATE SET
    status = excluded.status, meta = excluded.meta, expires_at = excluded.expires_at
WHERE results.status NOT IN ({_READY_SQL})
   OR (results.expires_at IS NOT NULL AND results.expires_at <= ?)
"""
#: Ids per statement (SQLite's bound-parameter limit is 32766 on current builds, 999 on old).
_CHUNK = 500
#: wait(): first and longest pause between checks for commits by other processes.
_BACKOFF_MIN = 0.005
_BACKOFF_MAX = 0.25


class SqliteStore:
    """A :class:`~amqptasks.results.store.ResultStore` in one SQLite file."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        url: str | None = None,
        expires: float | None = DEFAULT_EXPIRES,
        busy_timeout: float = 30.0,
        purge_interval: float | None = 60.0,
    ) -> None:
        if sqlite3.sqlite_version_info < (3, 24, 0):
            raise ResultStoreError(
                f"SQLite {sqlite3.sqlite_version} is too old for the result store (3.24+ needed)"
            )
        self.path = Path(path).expanduser().absolute()
        self.url = url or f"sqlite:///{path}"
        self.expires = check_expires(expires)
        self.busy_timeout = busy_timeout
        self.purge_interval = purge_interval
        self._lock = threading.Lock()
        self._conns: dict[int, sqlite3.Connection] = {}
        self._pid = os.getpid()
        self._closed = False
        # Saves by this process wake its waiters at once (see wait()).
        self._changed = threading.Condition()
        self._generation = 0
        self._next_purge = time.monotonic() + (purge_interval or 0)
        #: JSON1 is built in (SQLite 3.38+, and most older builds): batches are one statement.
        self._json_each = True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ResultStoreError(
                f"result store {self.url}: cannot create directory {self.path.parent}: {exc}"
            ) from exc
        conn = self._conn()  # open (and create) now: a bad path fails at start-up, not at 3 a.m.
        try:
            conn.execute("SELECT count(*) FROM json_each('[]')").fetchone()
        except sqlite3.OperationalError:  # a build without JSON1: one statement per row
            self._json_each = False

    def __repr__(self) -> str:
        return f"<SqliteStore {self.url} ({self.path})>"

    # -- connections -----------------------------------------------------------------------
    def _fail(self, what: str, exc: BaseException) -> ResultStoreError:
        return ResultStoreError(f"result store {self.url} ({self.path}): {what}: {exc}")

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise ResultStoreError(f"result store {self.url}: the store is closed")
        if os.getpid() != self._pid:
            # A forked child must not use its parent's connections (SQLite forbids it) nor
            # wait on locks a parent thread held at the fork: start afresh, abandon the rest.
            self._pid = os.getpid()
            self._lock = threading.Lock()
            self._changed = threading.Condition()
            self._conns = {}
        ident = threading.get_ident()
        conn = self._conns.get(ident)
        if conn is None:
            conn = self._open()
            with self._lock:
                alive = {t.ident for t in threading.enumerate()}
                for dead in [i for i in self._conns if i not in alive]:
                    self._conns.pop(dead).close()
                self._conns[ident] = conn
        return conn

    def _open(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                isolation_level=None,  # we say BEGIN and COMMIT ourselves
                check_same_thread=False,  # used by one thread; closed by close() from any
            )
        except sqlite3.Error as exc:
            raise self._fail("cannot open the database", exc) from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            mode = self._set_wal(conn)
            if mode.lower() != "wal":
                raise sqlite3.OperationalError(f"journal_mode is {mode!r}, WAL could not be set")
            conn.execute("PRAGMA synchronous = FULL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"the file has layout version {version}, newer than this amqptasks "
                    f"understands ({SCHEMA_VERSION})"
                )
            if version < SCHEMA_VERSION:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            conn.close()
            raise self._fail("cannot prepare the database", exc) from exc
        return conn

    def _set_wal(self, conn: sqlite3.Connection) -> str:
        """``PRAGMA journal_mode = WAL``, retried while another connection holds the file.

        Switching a file to WAL needs it to ourselves; when another process is writing (two
        processes starting on a fresh file), SQLite answers "database is locked" at once
        instead of calling the busy handler, so this waits (5 ms doubling to 100 ms) up to
        ``busy_timeout`` itself.
        """
        deadline = time.monotonic() + self.busy_timeout
        pause = 0.005
        while True:
            try:
                return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.1)

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: committed if the block ends, else rolled back."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._fail(what, exc) from exc
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise self._fail(what, exc) from exc
            raise

    def _read(self, what: str, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        try:
            return self._conn().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise self._fail(what, exc) from exc

    def _decode(self, task_id: str, raw: object) -> ResultMeta:
        try:
            return ResultMeta.from_json(str(raw))
        except ValueError as exc:
            raise ResultStoreError(
                f"result store {self.url}: record {task_id!r} is corrupt: {exc}"
            ) from exc

    def _expires_at(self, now: float) -> float | None:
        return None if self.expires is None else now + self.expires

    # -- records ---------------------------------------------------------------------------
    def save(self, metas: Sequence[StoredRecord]) -> None:
        if not metas:
            return
        now = time.time()
        expires_at = self._expires_at(now)
        what = f"saving {len(metas)} record(s)"
        if self._json_each:
            # The whole batch is ONE statement in autocommit mode (one transaction, atomic).
            # Why: sqlite3 releases the GIL around every step, BEGIN and COMMIT, and taking
            # it back behind a busy event loop costs up to the interpreter's switch interval
            # (5 ms) each time — per-row statements made a batch of 100 cost 10-40 ms.
            batch = dumps([[m.id, m.status, m.to_json().decode()] for m in metas])
            try:
                self._conn().execute(_UPSERT_BATCH, (expires_at, batch, now))
            except sqlite3.Error as exc:
                raise self._fail(what, exc) from exc
        else:
            rows = [(m.id, m.status, m.to_json().decode(), expires_at, now) for m in metas]
            with self._write(what) as conn:
                for row in rows:  # in order: a batch may hold STARTED then SUCCESS of one id
                    conn.execute(_UPSERT, row)
        self._wake()
        if self.purge_interval is not None and time.monotonic() >= self._next_purge:
            self._next_purge = time.monotonic() + self.purge_interval
            self.purge_expired()

    def _wake(self) -> None:
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def get(self, task_id: str) -> ResultMeta | None:
        return self.get_many([task_id])[0]

    def get_many(self, task_ids: Sequence[str]) -> list[ResultMeta | None]:
        now = time.time()
        unique = list(dict.fromkeys(task_ids))
        rows: list[tuple[Any, ...]] = []
        conn = self._conn()
        try:
            # One read transaction: a snapshot, so a reader never sees half of a saved batch.
            conn.execute("BEGIN")
            try:
                for start in range(0, len(unique), _CHUNK):
                    chunk = unique[start : start + _CHUNK]
                    marks = ", ".join("?" * len(chunk))
                    rows += conn.execute(
                        f"SELECT id, meta FROM results WHERE id IN ({marks}) AND {_LIVE}",
                        [*chunk, now],
                    ).fetchall()
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._fail("reading results", exc) from exc
        found = {str(rid): self._decode(str(rid), raw) for rid, raw in rows}
        return [found.get(t) for t in task_ids]

    def forget(self, task_ids: Sequence[str]) -> None:
        with self._write(f"forgetting {len(task_ids)} record(s)") as conn:
            for start in range(0, len(task_ids), _CHUNK):
                chunk = list(task_ids[start : start + _CHUNK])
                marks = ", ".join("?" * len(chunk))
                conn.execute(f"DELETE FROM results WHERE id IN ({marks})", chunk)

    # -- waiting ---------------------------------------------------------------------------
    def wait(self, task_ids: Sequence[str], timeout: float | None) -> bool:
        """Wait until every id is READY, without a busy loop of reads.

        SQLite tells no process about another's commits, so this is what it can do:

        * a save by *this* process (any thread, same store object) wakes the waiter at once
          (a condition variable);
        * a commit by another process (or another store object on the same file) is noticed
          through ``PRAGMA data_version`` — a counter in shared memory that changes when
          another connection commits; checking it costs no disk read. The waiter checks it
          with exponential backoff (5 ms, doubling to 250 ms, back to 5 ms after any
          change), and reads its records only when it changed.

        So a result written by another process is seen within ~250 ms, or 5 ms when writes
        are flowing; in between the waiter only sleeps and reads one integer.
        """
        pending = list(dict.fromkeys(task_ids))
        deadline = None if timeout is None else time.monotonic() + timeout
        conn = self._conn()
        backoff = _BACKOFF_MIN
        while True:
            # Versions first, records second: a commit after the read changes a version.
            version = self._data_version(conn)
            with self._changed:
                generation = self._generation
            pending = self._not_ready(conn, pending)
            if not pending:
                return True
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                pause = backoff if left is None else min(backoff, left)
                if self._saved_since(generation, pause) or self._data_version(conn) != version:
                    backoff = _BACKOFF_MIN
                    break
                backoff = min(backoff * 2, _BACKOFF_MAX)

    def _not_ready(self, conn: sqlite3.Connection, task_ids: list[str]) -> list[str]:
        """The ids without a live READY record (statuses only: no record is decoded)."""
        ready: set[str] = set()
        now = time.time()
        try:
            for start in range(0, len(task_ids), _CHUNK):
                chunk = task_ids[start : start + _CHUNK]
                marks = ", ".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT id FROM results WHERE id IN ({marks}) "
                    f"AND status IN ({_READY_SQL}) AND {_LIVE}",
                    [*chunk, now],
                ).fetchall()
                ready.update(str(r[0]) for r in rows)
        except sqlite3.Error as exc:
            raise self._fail("waiting for results", exc) from exc
        return [t for t in task_ids if t not in ready]

    def _saved_since(self, generation: int, timeout: float) -> bool:
        """Wait up to ``timeout`` for a save by this store object after ``generation``."""
        with self._changed:
            return self._changed.wait_for(lambda: self._generation != generation, timeout)

    def _data_version(self, conn: sqlite3.Connection) -> int:
        try:
            return int(conn.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error as exc:
            raise self._fail("waiting for results", exc) from exc

    # -- groups and chords -----------------------------------------------------------------
    def save_group(self, group_id: str, task_ids: Sequence[str]) -> None:
        members = dumps(list(task_ids)).decode()
        with self._write(f"saving group {group_id!r}") as conn:
            conn.execute(
                "INSERT OR REPLACE INTO groups (id, members, expires_at) VALUES (?, ?, ?)",
                (group_id, members, self._expires_at(time.time())),
            )

    def get_group(self, group_id: str) -> list[str] | None:
        rows = self._read(
            f"reading group {group_id!r}",
            f"SELECT members FROM groups WHERE id = ? AND {_LIVE}",
            (group_id, time.time()),
        )
        if not rows:
            return None
        members = loads(str(rows[0][0]))
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise ResultStoreError(f"result store {self.url}: group {group_id!r} is corrupt")
        return members

    def chord_add(self, chord_id: str, size: int, index: int, meta: ResultMeta) -> ChordProgress:
        with self._write(f"adding member {index} to chord {chord_id!r}") as conn:
            return self._chord_add(conn, chord_id, size, index, meta, time.time())

    def chord_add_many(self, members: Sequence[ChordMember]) -> list[ChordProgress | ValueError]:
        """Several :meth:`chord_add` calls in one transaction (one fsync); a member that is
        refused (``ValueError``, checked before it writes anything) is answered alone."""
        out: list[ChordProgress | ValueError] = []
        now = time.time()
        with self._write(f"adding {len(members)} chord member(s)") as conn:
            for chord_id, size, index, meta in members:
                try:
                    out.append(self._chord_add(conn, chord_id, size, index, meta, now))
                except ValueError as exc:
                    out.append(exc)
        return out

    def _chord_add(
        self,
        conn: sqlite3.Connection,
        chord_id: str,
        size: int,
        index: int,
        meta: ResultMeta,
        now: float,
    ) -> ChordProgress:
        failed = check_chord_member(chord_id, size, index, meta)
        body = meta.to_json().decode()
        row = conn.execute(
            "SELECT size, done, failed_index, body_sent, expires_at FROM chords WHERE id = ?",
            (chord_id,),
        ).fetchone()
        if row is not None and row[4] is not None and row[4] <= now:
            # Expired but not purged yet: it is gone as far as anyone can tell.
            conn.execute("DELETE FROM chord_members WHERE chord_id = ?", (chord_id,))
            conn.execute("DELETE FROM chords WHERE id = ?", (chord_id,))
            row = None
        if row is None:
            conn.execute("INSERT INTO chords (id, size) VALUES (?, ?)", (chord_id, size))
            row = (size, 0, None, None, None)
        elif row[0] != size:
            raise ValueError(f"chord {chord_id!r} has size {row[0]}, not {size} (member {index})")
        done, failed_index, body_sent = int(row[1]), row[2], row[3]
        recorded = (
            conn.execute(
                "INSERT OR IGNORE INTO chord_members (chord_id, idx, meta) VALUES (?, ?, ?)",
                (chord_id, index, body),
            ).rowcount
            == 1
        )
        if recorded:
            done += 1
            if failed and failed_index is None:
                failed_index = index
            conn.execute(
                "UPDATE chords SET done = ?, failed_index = ?, expires_at = ? WHERE id = ?",
                (done, failed_index, self._expires_at(now), chord_id),
            )
        failed_raw = None
        if failed_index is not None:
            failed_raw = conn.execute(
                "SELECT meta FROM chord_members WHERE chord_id = ? AND idx = ?",
                (chord_id, failed_index),
            ).fetchone()[0]
        raws: list[object] = []
        if done == size and failed_index is None:
            raws = [
                r[0]
                for r in conn.execute(
                    "SELECT meta FROM chord_members WHERE chord_id = ? ORDER BY idx",
                    (chord_id,),
                )
            ]
        return ChordProgress(
            done=done,
            size=size,
            complete=done == size,
            failed=None if failed_raw is None else self._decode(chord_id, failed_raw),
            results=[self._decode(chord_id, raw).result for raw in raws] if raws else None,
            body_sent=body_sent is not None,
            recorded=recorded,
        )

    def chord_mark_body_sent(self, chord_id: str, token: str | None = None) -> bool:
        token = token or uuid.uuid4().hex
        with self._write(f"marking chord {chord_id!r} body sent") as conn:
            row = conn.execute(
                f"SELECT body_sent FROM chords WHERE id = ? AND {_LIVE}", (chord_id, time.time())
            ).fetchone()
            if row is None:
                raise ResultStoreError(
                    f"result store {self.url}: chord {chord_id!r} does not exist "
                    "(no member was added, or it expired)"
                )
            if row[0] is None:
                conn.execute("UPDATE chords SET body_sent = ? WHERE id = ?", (token, chord_id))
                return True
            return bool(row[0] == token)

    # -- housekeeping ----------------------------------------------------------------------
    def purge_expired(self, now: datetime | None = None) -> int:
        """Delete expired records, groups and chords (with their members); the rows removed
        (members not counted)."""
        ts = time.time() if now is None else now.timestamp()
        with self._write("purging expired records") as conn:
            removed = conn.execute("DELETE FROM results WHERE expires_at <= ?", (ts,)).rowcount
            removed += conn.execute("DELETE FROM groups WHERE expires_at <= ?", (ts,)).rowcount
            conn.execute(
                "DELETE FROM chord_members WHERE chord_id IN "
                "(SELECT id FROM chords WHERE expires_at <= ?)",
                (ts,),
            )
            removed += conn.execute("DELETE FROM chords WHERE expires_at <= ?", (ts,)).rowcount
        return int(removed)

    def stats(self) -> dict[str, int]:
        """Rows per table, expired-but-not-purged ones included (that is what is on disk)."""
        out: dict[str, int] = {}
        for table in ("results", "groups", "chords", "chord_members"):
            rows = self._read("counting rows", f"SELECT COUNT(*) FROM {table}", ())
            out[table] = int(rows[0][0])
        return out

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            conn.close()
