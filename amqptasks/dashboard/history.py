"""The dashboard's task history: task and worker events folded into one SQLite file (WAL).

Flower kept its history in a ``shelve`` file that grew while reading back empty and lost
tasks; here every batch of events is one transaction, committed before the events'
messages are acked (:mod:`.ingest`), so what the broker handed over is either in the file
or still in the queue.

Layout (``PRAGMA user_version`` = :data:`LAYOUT`; docs/dashboard.md explains each choice):

* ``tasks``: one row per task id, the latest of everything its events said, plus its
  ``timeline``: one compact JSON line per event (the large fields — args, kwargs, result,
  traceback — are kept once, in their columns). ``seq`` (the rowid) is insertion order;
  ``ts`` is the time of the first event seen and never changes, so its index is written
  once per task. Lists are ``ORDER BY ts DESC, seq DESC``: the ``(ts)`` index, or the
  ``(state, ts)``, ``(name, ts)``, ``(worker, ts)``, ``(queue, ts)`` index when filtered
  (each index implicitly ends with the rowid, so the order needs no sort step).
* ``tasks_text`` (layout 2): an FTS5 trigram index of the name, args, kwargs, result and
  exception, external content (the text stays in ``tasks``), for ``search``. Rows join it in
  slices between batches (:meth:`History.index_pending`), not inside each batch; a search
  scans the few newest rows it does not hold yet. A layout 1 file opens at once and is
  indexed the same way.
* ``workers``: the latest worker event of each worker.
* ``minute_counts``: events by minute and state (the charts); ``task_totals`` and
  ``runtime_buckets``: counters since the file was created (``/metrics``).

A batch is folded in memory first (a busy worker's received, started and succeeded usually
arrive in one poll: one row write, not three). Events are applied in arrival order, which
is each task's order (docs/events.md), with one exception: ``task-sent`` travels on another
connection and may arrive after ``task-received``, so it never replaces a later state.
A redelivered batch (killed between commit and ack) is applied again: the task row ends
the same, its duplicate timeline lines are dropped when read (same hostname, pid, clock),
the counters may count it twice.
"""

from __future__ import annotations

import bisect
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..events import rfc3339
from ..protocol import dumps, loads

__all__ = [
    "LAYOUT",
    "READY_STATES",
    "RUNTIME_BUCKETS",
    "STATE_OF",
    "Applied",
    "History",
    "TaskQuery",
]

log = logging.getLogger("amqptasks.dashboard")

LAYOUT = 2
STATE_OF = {
    "task-sent": "PENDING",
    "task-received": "RECEIVED",
    "task-started": "STARTED",
    "task-succeeded": "SUCCESS",
    "task-failed": "FAILURE",
    "task-retried": "RETRY",
    "task-rejected": "REJECTED",
    "task-revoked": "REVOKED",
    "task-expired": "EXPIRED",
}
STATES = ("PENDING", "RECEIVED", "STARTED", "SUCCESS", "FAILURE", "RETRY", "REJECTED",
          "REVOKED", "EXPIRED", "UNKNOWN")  # fmt: skip
READY_STATES = frozenset({"SUCCESS", "FAILURE", "REJECTED", "REVOKED", "EXPIRED"})
#: Upper bounds (seconds) of the runtime histogram buckets (``/metrics``).
RUNTIME_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0)
#: A counted list stops here ("10,000+"): counting a million rows is not worth a wait.
COUNT_CAP = 10_000
#: What a text search looks in (the trigram index ``tasks_text`` and the scan alike).
SEARCHED = ("name", "args", "kwargs", "result", "exception")
#: A text search with up to this many index hits reads exactly those rows; beyond, the text
#: is common and a scan newest first fills the page within a few thousand rows.
SEARCH_HITS = 20_000
#: Rows indexed in one transaction; a busy ingest indexes once this many wait (or every
#: INDEX_EVERY seconds), an idle one at once. Rows not indexed yet are scanned by a search.
INDEX_SLICE = 20_000
INDEX_EVERY = 2.0

COLUMNS = (
    "id", "name", "state", "worker", "queue", "ts", "updated", "sent", "received",
    "started", "finished", "args", "kwargs", "result", "exception", "traceback", "reason",
    "detail", "retries", "runtime", "eta", "expires", "root_id", "parent_id", "group_id",
    "chord_id", "exchange", "routing_key", "timeline",
)  # fmt: skip
_I = {c: i for i, c in enumerate(COLUMNS)}
(ID, NAME, STATE, WORKER, QUEUE, TS, UPDATED, SENT, RECEIVED, STARTED, FINISHED, ARGS,
 KWARGS, RESULT, EXCEPTION, TRACEBACK, REASON, DETAIL, RETRIES, RUNTIME, ETA, EXPIRES,
 ROOT_ID, PARENT_ID, GROUP_ID, CHORD_ID, EXCHANGE, ROUTING_KEY,
 TIMELINE) = range(len(COLUMNS))  # fmt: skip
#: The row positions of the searchable text.
_TEXT = tuple(_I[c] for c in SEARCHED)
#: Kept in their columns, not repeated in the timeline.
_BIG = frozenset({"v", "id", "task", "args", "kwargs", "result", "traceback", "root_id",
                  "parent_id", "group_id", "chord_id", "queue"})  # fmt: skip
_WORKFLOW = (("root_id", ROOT_ID), ("parent_id", PARENT_ID), ("group_id", GROUP_ID),
             ("chord_id", CHORD_ID))  # fmt: skip

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
  seq INTEGER PRIMARY KEY,
  id TEXT NOT NULL, name TEXT, state TEXT NOT NULL, worker TEXT, queue TEXT,
  ts TEXT NOT NULL, updated TEXT NOT NULL,
  sent TEXT, received TEXT, started TEXT, finished TEXT,
  args TEXT, kwargs TEXT, result TEXT, exception TEXT, traceback TEXT, reason TEXT,
  detail TEXT, retries INTEGER, runtime REAL, eta TEXT, expires TEXT,
  root_id TEXT, parent_id TEXT, group_id TEXT, chord_id TEXT,
  exchange TEXT, routing_key TEXT,
  timeline TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX IF NOT EXISTS tasks_id ON tasks(id);
CREATE INDEX IF NOT EXISTS tasks_ts ON tasks(ts);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks(state, ts);
CREATE INDEX IF NOT EXISTS tasks_name ON tasks(name, ts);
CREATE INDEX IF NOT EXISTS tasks_worker ON tasks(worker, ts);
CREATE INDEX IF NOT EXISTS tasks_queue ON tasks(queue, ts);
CREATE INDEX IF NOT EXISTS tasks_parent ON tasks(parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_root ON tasks(root_id) WHERE root_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_group ON tasks(group_id) WHERE group_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_chord ON tasks(chord_id) WHERE chord_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS workers (
  hostname TEXT PRIMARY KEY, type TEXT NOT NULL, time TEXT NOT NULL, info TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS minute_counts (
  minute TEXT NOT NULL, state TEXT NOT NULL, n INTEGER NOT NULL,
  PRIMARY KEY (minute, state)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS task_totals (
  name TEXT NOT NULL, state TEXT NOT NULL, n INTEGER NOT NULL, runtime REAL NOT NULL,
  PRIMARY KEY (name, state)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS runtime_buckets (
  name TEXT NOT NULL, bucket INTEGER NOT NULL, n INTEGER NOT NULL,
  PRIMARY KEY (name, bucket)
) WITHOUT ROWID;
"""
_COLS = ", ".join(SEARCHED)
#: The search index (layout 2): trigrams of the searchable text. External content
#: (``content='tasks'``): the text is stored once, in ``tasks``; the index holds only the
#: trigrams. Rows up to ``search_state.upto`` are in it: added in slices by
#: :meth:`History.index_pending`, kept right by :meth:`History.apply` (a result arriving
#: after its row was indexed) and :meth:`History.prune`. No triggers: a trigger runs for
#: every row update and cost more than the index itself (docs/dashboard.md).
_SEARCH_SCHEMA = f"""
CREATE VIRTUAL TABLE IF NOT EXISTS tasks_text USING fts5(
  {_COLS}, content='tasks', content_rowid='seq', tokenize='trigram'
);
CREATE TABLE IF NOT EXISTS search_state (
  id INTEGER PRIMARY KEY CHECK (id = 0), upto INTEGER NOT NULL
);
INSERT OR IGNORE INTO search_state VALUES (0, 0);
"""

_KEEP_LATER = ", ".join(
    f"{c} = coalesce(excluded.{c}, tasks.{c})"
    for c in COLUMNS
    if c not in ("id", "state", "ts", "updated", "timeline", "name")
)
_UPSERT = (
    f"INSERT INTO tasks ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
    "ON CONFLICT(id) DO UPDATE SET "
    "name = coalesce(tasks.name, excluded.name), "
    "state = CASE WHEN excluded.state = 'UNKNOWN' THEN tasks.state "
    "WHEN excluded.state = 'PENDING' AND tasks.state <> 'UNKNOWN' THEN tasks.state "
    "ELSE excluded.state END, "
    "updated = max(tasks.updated, excluded.updated), "
    "timeline = tasks.timeline || excluded.timeline, " + _KEEP_LATER
)
_LIST_COLUMNS = (
    "seq, id, name, state, worker, queue, ts, updated, received, started, finished, args, "
    "kwargs, result, exception, retries, runtime, reason"
)


@dataclass(frozen=True, slots=True)
class Applied:
    """What one batch changed: the task rows (id, name, state) and the worker names."""

    tasks: list[tuple[str, str | None, str]]
    workers: list[str]
    events: int


@dataclass(frozen=True, slots=True)
class TaskQuery:
    """One page of the task list; every filter is optional.

    ``search`` matches a task id exactly, else a substring (any case) of the name, args,
    kwargs, result or exception: through the trigram index when it has few hits, else by a
    scan newest first that stops when the page is full (common text fills it at once).
    ``since``/``until`` are RFC 3339 UTC texts compared with the first event's time.
    ``before`` is the ``(ts, seq)`` of the last row of the previous page (keyset paging:
    every page costs the same); ``offset`` is Flower's paging (deep offsets cost a walk of
    the index).
    """

    state: str | None = None
    name: str | None = None
    worker: str | None = None
    queue: str | None = None
    search: str | None = None
    since: str | None = None
    until: str | None = None
    before: tuple[str, int] | None = None
    offset: int = 0
    limit: int = 50
    oldest_first: bool = False


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class History:
    """One history file. :meth:`apply` and :meth:`prune` run on one thread (the ingest
    thread); reads open a connection per thread and never block the writer (WAL)."""

    def __init__(self, path: str | Path, *, max_tasks: int, retention: float) -> None:
        self.path = Path(path)
        self.max_tasks = max_tasks
        self.retention = retention
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        conn = self._conn()
        layout = conn.execute("PRAGMA user_version").fetchone()[0]
        if layout > LAYOUT:
            raise ValueError(f"{self.path}: written by a newer amqptasks (layout > {LAYOUT})")
        # auto_vacuum must be set before the first table: freed pages can then be given
        # back to the file system (prune), not only reused.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.executescript(_SCHEMA)
        conn.executescript(_SEARCH_SCHEMA)  # a layout 1 file gets it, empty: upto = 0
        conn.execute(f"PRAGMA user_version = {LAYOUT}")
        self._indexed_at = 0.0
        waiting = self.unindexed()
        if waiting > INDEX_SLICE:  # a file from before the index, or one closed mid-way
            log.info("%s: %d tasks to add to the search index (in slices)", self.path, waiting)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 30000")
            conn.execute("PRAGMA journal_mode = WAL")
            # FULL: a batch acked to the broker survives a power cut, not only a SIGKILL.
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA cache_size = -32000")
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- writing ----------------------------------------------------------------------------
    def apply(self, events: Iterable[Mapping[str, Any]]) -> Applied:
        """Fold ``events`` (in arrival order) into the file in one committed transaction."""
        rows: dict[str, list[Any]] = {}
        timelines: dict[str, list[bytes]] = {}
        workers: dict[str, Mapping[str, Any]] = {}
        minutes: dict[tuple[str, str], int] = {}
        totals: dict[tuple[str, str], list[float]] = {}
        buckets: dict[tuple[str, int], int] = {}
        count = 0
        for e in events:
            count += 1
            kind = e.get("type")
            when = str(e.get("time") or rfc3339(time.time()))
            if not isinstance(kind, str):
                continue
            if kind.startswith("worker-"):
                workers[str(e.get("hostname"))] = e
                continue
            state = STATE_OF.get(kind, "UNKNOWN")
            tid = e.get("id")
            if not isinstance(tid, str) or not tid:  # an undecodable body's task-rejected
                tid = f"?{e.get('hostname')}:{e.get('pid')}:{e.get('clock')}"
            row = rows.get(tid)
            if row is None:
                row = rows[tid] = [None] * len(COLUMNS)
                row[ID], row[TS], row[STATE], row[UPDATED] = tid, when, "UNKNOWN", when
                timelines[tid] = []
            name = e.get("task")
            if row[NAME] is None and name:
                row[NAME] = name
            if when > row[UPDATED]:
                row[UPDATED] = when
            if state != "UNKNOWN" and (state != "PENDING" or row[STATE] == "UNKNOWN"):
                row[STATE] = state
            _fold(row, kind, e, when)
            timelines[tid].append(dumps({k: v for k, v in e.items() if k not in _BIG}))
            key = (when[:16], state)
            minutes[key] = minutes.get(key, 0) + 1
            if state in READY_STATES or state == "RETRY":
                label = str(name or row[NAME] or "?")
                total = totals.setdefault((label, state), [0, 0.0])
                total[0] += 1
                runtime = e.get("runtime")
                if isinstance(runtime, (int, float)):
                    total[1] += runtime
                    b = bisect.bisect_left(RUNTIME_BUCKETS, runtime)
                    buckets[(label, b)] = buckets.get((label, b), 0) + 1
        for tid, lines in timelines.items():
            rows[tid][TIMELINE] = (b"\n".join(lines) + b"\n").decode()
        searchable = [tid for tid, r in rows.items() if any(r[i] is not None for i in _TEXT)]
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            indexed = self._indexed_rows(conn, searchable)
            conn.executemany(_UPSERT, rows.values())
            if indexed:
                self._reindex(conn, indexed)
            conn.executemany(
                "INSERT INTO workers (hostname, type, time, info) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(hostname) DO UPDATE SET type = excluded.type, "
                "time = excluded.time, info = excluded.info",
                [
                    (h, str(e.get("type")), str(e.get("time", "")), dumps(dict(e)).decode())
                    for h, e in workers.items()
                ],
            )
            conn.executemany(
                "INSERT INTO minute_counts VALUES (?, ?, ?) "
                "ON CONFLICT(minute, state) DO UPDATE SET n = n + excluded.n",
                [(m, s, n) for (m, s), n in minutes.items()],
            )
            conn.executemany(
                "INSERT INTO task_totals VALUES (?, ?, ?, ?) ON CONFLICT(name, state) "
                "DO UPDATE SET n = n + excluded.n, runtime = runtime + excluded.runtime",
                [(n, s, int(v[0]), v[1]) for (n, s), v in totals.items()],
            )
            conn.executemany(
                "INSERT INTO runtime_buckets VALUES (?, ?, ?) "
                "ON CONFLICT(name, bucket) DO UPDATE SET n = n + excluded.n",
                [(n, b, c) for (n, b), c in buckets.items()],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return Applied([(r[ID], r[NAME], r[STATE]) for r in rows.values()], list(workers), count)

    @staticmethod
    def _indexed_rows(conn: sqlite3.Connection, ids: list[str]) -> list[tuple[Any, ...]]:
        """``(seq, text columns...)`` of the rows among ``ids`` the search index holds."""
        if not ids:
            return []
        return conn.execute(
            f"SELECT seq, {_COLS} FROM tasks WHERE id IN (SELECT value FROM json_each(?)) "
            "AND seq <= (SELECT upto FROM search_state)",
            (dumps(ids).decode(),),
        ).fetchall()

    @staticmethod
    def _reindex(conn: sqlite3.Connection, before: list[tuple[Any, ...]]) -> None:
        """Indexed rows whose text the batch changed: their old trigrams out, new ones in
        (external content: FTS5 is told the old values, it cannot read them any more)."""
        marks = dumps([r[0] for r in before]).decode()
        after = {
            r[0]: r
            for r in conn.execute(
                f"SELECT seq, {_COLS} FROM tasks WHERE seq IN (SELECT value FROM json_each(?))",
                (marks,),
            )
        }
        changed = [(old, after[old[0]]) for old in before if after.get(old[0], old) != old]
        if changed:
            conn.executemany(
                f"INSERT INTO tasks_text(tasks_text, rowid, {_COLS}) "
                f"VALUES ('delete', {', '.join('?' * (len(SEARCHED) + 1))})",
                [old for old, _ in changed],
            )
            conn.executemany(
                f"INSERT INTO tasks_text(rowid, {_COLS}) "
                f"VALUES ({', '.join('?' * (len(SEARCHED) + 1))})",
                [new for _, new in changed],
            )

    def _delete(self, conn: sqlite3.Connection, select: str, params: tuple[Any, ...]) -> int:
        """Delete the rows ``select`` names (seq), their trigrams with them, in one
        transaction; the index's mark never stays above the table's newest row (SQLite may
        give a deleted newest seq to the next new row, which the index does not hold)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            seqs = [r[0] for r in conn.execute(select, params)]
            if seqs:
                marks = dumps(seqs).decode()
                conn.execute(
                    f"INSERT INTO tasks_text(tasks_text, rowid, {_COLS}) "
                    f"SELECT 'delete', seq, {_COLS} FROM tasks "
                    "WHERE seq IN (SELECT value FROM json_each(?)) "
                    "AND seq <= (SELECT upto FROM search_state)",
                    (marks,),
                )
                conn.execute(
                    "DELETE FROM tasks WHERE seq IN (SELECT value FROM json_each(?))", (marks,)
                )
                conn.execute(
                    "UPDATE search_state SET upto = "
                    "min(upto, (SELECT coalesce(max(seq), 0) FROM tasks))"
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return len(seqs)

    def index_pending(self, *, idle: bool = True) -> int:
        """Add rows not in the search index yet, up to :data:`INDEX_SLICE` in one
        transaction: when ``idle`` (nothing waits to be ingested), when a slice's worth
        waits, or :data:`INDEX_EVERY` s after the last slice. Returns the rows indexed."""
        conn = self._conn()
        upto = int(conn.execute("SELECT upto FROM search_state").fetchone()[0])
        top = int(conn.execute("SELECT coalesce(max(seq), 0) FROM tasks").fetchone()[0])
        waiting = top - upto
        due = idle or waiting >= INDEX_SLICE or time.monotonic() - self._indexed_at > INDEX_EVERY
        if waiting <= 0 or not due:
            return 0
        end = min(top, upto + INDEX_SLICE)
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.execute(
                f"INSERT INTO tasks_text(rowid, {_COLS}) SELECT seq, {_COLS} FROM tasks "
                "WHERE seq > ? AND seq <= ?",
                (upto, end),
            )
            conn.execute("UPDATE search_state SET upto = ?", (end,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._indexed_at = time.monotonic()
        return int(cur.rowcount)

    def unindexed(self) -> int:
        """Rows (by seq) the search index does not hold yet."""
        row = (
            self._conn()
            .execute("SELECT coalesce(max(seq), 0) - (SELECT upto FROM search_state) FROM tasks")
            .fetchone()
        )
        return max(0, int(row[0]))

    def prune(self, now: float | None = None) -> int:
        """Delete what is beyond the retention time or the newest ``max_tasks``; give freed
        space back when a quarter of the file is free. Returns the tasks deleted."""
        now = time.time() if now is None else now
        cutoff = rfc3339(now - self.retention)
        conn = self._conn()
        deleted = 0
        while True:  # in slices: the writer lock is never held for long
            n = self._delete(
                conn, "SELECT seq FROM tasks WHERE ts < ? ORDER BY ts LIMIT 20000", (cutoff,)
            )
            deleted += n
            if n < 20000:
                break
        excess = self.count() - self.max_tasks
        while excess > 0:
            n = self._delete(
                conn, "SELECT seq FROM tasks ORDER BY ts, seq LIMIT ?", (min(excess, 20000),)
            )
            deleted += n
            excess -= n
            if n == 0:
                break
        conn.execute("DELETE FROM minute_counts WHERE minute < ?", (cutoff[:16],))
        conn.execute("DELETE FROM workers WHERE time < ?", (cutoff,))
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        if pages and free * 4 > pages:
            conn.execute("PRAGMA incremental_vacuum")
        return deleted

    # -- reading ----------------------------------------------------------------------------
    def count(self) -> int:
        return int(self._conn().execute("SELECT count(*) FROM tasks").fetchone()[0])

    def tasks(self, q: TaskQuery) -> dict[str, Any]:
        """``{"tasks": [...], "total": n, "capped": bool, "next": cursor|None}``."""
        conn = self._conn()
        if q.search:
            row = conn.execute(
                f"SELECT {_LIST_COLUMNS} FROM tasks WHERE id = ?", (q.search,)
            ).fetchone()
            if row is not None:
                return {"tasks": [_list_row(row)], "total": 1, "capped": False, "next": None}
        where: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("state", q.state),
            ("name", q.name),
            ("worker", q.worker),
            ("queue", q.queue),
        ):
            if value:
                where.append(f"{column} = ?")
                params.append(value)
        if q.since:
            where.append("ts >= ?")
            params.append(q.since)
        if q.until:
            where.append("ts < ?")
            params.append(q.until)
        source = f"tasks INDEXED BY {self._index_for(q)}" if self._narrowed(q) else "tasks"
        source_params: list[Any] = []
        known_many = False
        if q.search:
            # Trigrams need 3 characters: shorter text is always scanned, and so is text
            # with a NUL (FTS5 ends its query string there: "unterminated string").
            indexable = len(q.search) >= 3 and "\x00" not in q.search
            phrase = '"' + q.search.replace('"', '""') + '"' if indexable else None
            hits = self._index_hits(phrase) if phrase is not None else None
            like = "(" + " OR ".join(f"{c} LIKE ? ESCAPE '\\'" for c in SEARCHED) + ")"
            likes = [_like(q.search)] * len(SEARCHED)
            if phrase is not None and hits is not None and hits <= SEARCH_HITS:
                # Few hits: exactly those rows, and the rows not indexed yet (the newest,
                # scanned by seq). CROSS JOIN keeps the hits first.
                source = (
                    "(SELECT rowid AS hit FROM tasks_text WHERE tasks_text MATCH ? UNION ALL "
                    f"SELECT seq FROM tasks WHERE seq > (SELECT upto FROM search_state) AND {like}"
                    ") CROSS JOIN tasks ON tasks.seq = hit"
                )
                source_params = [phrase, *likes]
            else:
                # Common text (or under 3 characters): newest first until the page is full.
                where.append(like)
                params += likes
                # Alone, a text the index holds more than COUNT_CAP times needs no count.
                known_many = hits is not None and hits > COUNT_CAP and len(where) == 1
        count_sql = " AND ".join(where) or "1"
        page_where = list(where)
        page_params = list(params)
        if q.before is not None:
            op = ">" if q.oldest_first else "<"
            page_where.append(f"(ts {op} ? OR (ts = ? AND seq {op} ?))")
            page_params += [q.before[0], q.before[0], q.before[1]]
        order = "ts, seq" if q.oldest_first else "ts DESC, seq DESC"
        limit = max(1, min(q.limit, 1000))
        rows = conn.execute(
            f"SELECT {_LIST_COLUMNS} FROM {source} WHERE {' AND '.join(page_where) or '1'} "
            f"ORDER BY {order} LIMIT ? OFFSET ?",
            [*source_params, *page_params, limit + 1, max(0, q.offset)],
        ).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        if known_many:
            total = COUNT_CAP + 1
        else:
            total = conn.execute(
                f"SELECT count(*) FROM (SELECT 1 FROM {source} WHERE {count_sql} LIMIT ?)",
                [*source_params, *params, COUNT_CAP + 1],
            ).fetchone()[0]
        out = [_list_row(r) for r in rows]
        return {
            "tasks": out,
            "total": min(total, COUNT_CAP),
            "capped": total > COUNT_CAP,
            "next": f"{rows[-1][6]},{rows[-1][0]}" if more and rows else None,
        }

    def _index_hits(self, phrase: str) -> int:
        """Rows of the trigram index holding ``phrase``, counted up to just past
        :data:`SEARCH_HITS` and :data:`COUNT_CAP` (a common text is not counted through)."""
        cap = max(SEARCH_HITS, COUNT_CAP) + 1
        return int(
            self._conn()
            .execute(
                "SELECT count(*) FROM (SELECT 1 FROM tasks_text WHERE tasks_text MATCH ? LIMIT ?)",
                (phrase, cap),
            )
            .fetchone()[0]
        )

    @staticmethod
    def _narrowed(q: TaskQuery) -> bool:
        """Whether more than one indexed condition applies (then we choose the index)."""
        given = [q.state, q.name, q.worker, q.queue, q.since or q.until]
        return sum(1 for g in given if g) > 1

    def _index_for(self, q: TaskQuery) -> str:
        """The index whose condition matches the fewest rows (counted in the index alone,
        up to a cap): SQLite's planner has no per-value statistics and may walk half a
        million rows of a broad filter to find a rare combination."""
        conn = self._conn()
        cap = 50_001
        best = ("tasks_ts", cap + 1)
        for column, value in (
            ("state", q.state),
            ("name", q.name),
            ("worker", q.worker),
            ("queue", q.queue),
        ):
            if value:
                n = conn.execute(
                    f"SELECT count(*) FROM (SELECT 1 FROM tasks INDEXED BY tasks_{column} "
                    f"WHERE {column} = ? LIMIT {cap})",
                    (value,),
                ).fetchone()[0]
                if n < best[1]:
                    best = (f"tasks_{column}", n)
        if q.since or q.until:
            n = conn.execute(
                f"SELECT count(*) FROM (SELECT 1 FROM tasks INDEXED BY tasks_ts "
                f"WHERE ts >= ? AND ts < ? LIMIT {cap})",
                (q.since or "", q.until or "\uffff"),
            ).fetchone()[0]
            if n < best[1]:
                best = ("tasks_ts", n)
        return best[0]

    def task(self, task_id: str) -> dict[str, Any] | None:
        """Everything about one task: its columns, its timeline (deduplicated, in order),
        its children (tasks whose parent it is) and the members of its group/chord."""
        conn = self._conn()
        cur = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM tasks WHERE id = ?", (task_id,))
        row = cur.fetchone()
        if row is None:
            return None
        out = dict(zip(COLUMNS, row, strict=True))
        seen: set[tuple[Any, Any, Any]] = set()
        timeline = []
        for line in out.pop("timeline").splitlines():
            e = loads(line)
            mark = (e.get("hostname"), e.get("pid"), e.get("clock"))
            if mark in seen:
                continue
            seen.add(mark)
            timeline.append(e)
        timeline.sort(key=lambda e: (str(e.get("time", "")), e.get("clock") or 0))
        out["timeline"] = timeline
        out["exception"] = loads(out["exception"]) if out["exception"] else None
        out["children"] = [
            {"id": r[0], "name": r[1], "state": r[2]}
            for r in conn.execute(
                "SELECT id, name, state FROM tasks WHERE parent_id = ? ORDER BY ts LIMIT 500",
                (task_id,),
            )
        ]
        for column in ("group_id", "chord_id"):
            members: list[dict[str, Any]] = []
            if out[column]:
                members = [
                    {"id": r[0], "name": r[1], "state": r[2]}
                    for r in conn.execute(
                        f"SELECT id, name, state FROM tasks WHERE {column} = ? ORDER BY ts "
                        "LIMIT 500",
                        (out[column],),
                    )
                ]
            out[column.replace("_id", "") + "_members"] = members
        return out

    def states(self, ids: Sequence[str]) -> dict[str, str]:
        conn = self._conn()
        out: dict[str, str] = {}
        for i in range(0, len(ids), 500):
            chunk = list(ids[i : i + 500])
            marks = ", ".join("?" * len(chunk))
            out.update(conn.execute(f"SELECT id, state FROM tasks WHERE id IN ({marks})", chunk))
        return out

    def task_names(self) -> list[str]:
        rows = self._conn().execute("SELECT DISTINCT name FROM task_totals ORDER BY name")
        return [r[0] for r in rows]

    def workers(self) -> list[dict[str, Any]]:
        """The latest event of each worker (its ``info``), with ``type`` and ``time``."""
        rows = self._conn().execute("SELECT hostname, type, time, info FROM workers")
        return [
            {"hostname": h, "type": t, "time": when, "info": loads(info)}
            for h, t, when, info in rows
        ]

    def minute_counts(self, since: str) -> list[tuple[str, str, int]]:
        rows = self._conn().execute(
            "SELECT minute, state, n FROM minute_counts WHERE minute >= ? ORDER BY minute",
            (since[:16],),
        )
        return [(m, s, int(n)) for m, s, n in rows]

    def totals(self) -> list[tuple[str, str, int, float]]:
        rows = self._conn().execute("SELECT name, state, n, runtime FROM task_totals")
        return [(n, s, int(c), float(r)) for n, s, c, r in rows]

    def buckets(self) -> list[tuple[str, int, int]]:
        rows = self._conn().execute("SELECT name, bucket, n FROM runtime_buckets")
        return [(n, int(b), int(c)) for n, b, c in rows]

    def file_size(self) -> int:
        conn = self._conn()
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        return int(pages * size)


def _fold(row: list[Any], kind: str, e: Mapping[str, Any], when: str) -> None:
    """Copy what an event of ``kind`` says into its task's row."""
    get = e.get
    if kind == "task-sent":
        row[SENT] = when
        row[EXCHANGE], row[ROUTING_KEY] = get("exchange"), get("routing_key")
    else:
        row[WORKER] = get("hostname")
    if get("queue") is not None:
        row[QUEUE] = get("queue")
    if kind in ("task-sent", "task-received"):
        if kind == "task-received":
            row[RECEIVED] = when
        row[ARGS], row[KWARGS] = get("args"), get("kwargs")
        row[ETA], row[EXPIRES] = get("eta"), get("expires")
    elif kind == "task-started":
        row[STARTED] = when
    elif kind == "task-succeeded":
        row[RESULT] = get("result")
    if "retries" in e:
        row[RETRIES] = get("retries")
    if "runtime" in e:
        row[RUNTIME] = get("runtime")
    exc = get("exception")
    if exc is not None:
        row[EXCEPTION] = dumps(exc).decode()
    if get("traceback") is not None:
        row[TRACEBACK] = get("traceback")
    if get("reason") is not None:
        row[REASON] = get("reason")
    if get("detail") is not None:
        row[DETAIL] = get("detail")
    if STATE_OF.get(kind) in READY_STATES:
        row[FINISHED] = when
    for field_name, index in _WORKFLOW:
        value = get(field_name)
        if value is not None:
            row[index] = value


def _list_row(r: Sequence[Any]) -> dict[str, Any]:
    return {
        "seq": r[0],
        "id": r[1],
        "name": r[2],
        "state": r[3],
        "worker": r[4],
        "queue": r[5],
        "ts": r[6],
        "updated": r[7],
        "received": r[8],
        "started": r[9],
        "finished": r[10],
        "args": r[11],
        "kwargs": r[12],
        "result": r[13],
        "exception": loads(r[14]) if r[14] else None,
        "retries": r[15],
        "runtime": r[16],
        "reason": r[17],
    }
