"""The dashboard's SQLite history, on real files: folding events, queries, paging, the
search index (and a file from before it), retention that really deletes. How fast the
task list answers with a million tasks is measured by ``python -m bench.dashboard_history``
(over HTTP, printed), not here."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from amqptasks.dashboard import history as history_module
from amqptasks.dashboard.history import History, TaskQuery
from amqptasks.events import rfc3339

T0 = 1_900_000_000.0


def ev(kind: str, tid: str | None, at: float, clock: int, **fields: Any) -> dict[str, Any]:
    e = {"v": 1, "type": kind, "time": rfc3339(at), "hostname": fields.pop("host", "w1@h"),
         "pid": 7, "clock": clock}  # fmt: skip
    if kind.startswith("task-"):
        e.update({"id": tid, "task": fields.pop("task", "t.add"), "queue": "default"})
    e.update(fields)
    return e


def run(
    tid: str,
    at: float,
    clock: int,
    outcome: str = "task-succeeded",
    host: str = "w1@h",
    **extra: Any,
) -> list:
    end = {"runtime": 0.01, "result": "3"} if outcome == "task-succeeded" else {}
    if outcome == "task-failed":
        end = {"runtime": 0.01, "exception": {"type": "ValueError", "message": "bad"},
               "traceback": "Traceback ...", "reason": "task-failed", "retries": 0}  # fmt: skip
    return [
        ev(
            "task-received",
            tid,
            at,
            clock,
            args="[1,2]",
            kwargs="{}",
            retries=0,
            host=host,
            **extra,
        ),
        ev("task-started", tid, at + 0.001, clock + 1, host=host),
        ev(outcome, tid, at + 0.002, clock + 2, host=host, **end),
    ]


@pytest.fixture
def history(tmp_path: Path) -> History:
    h = History(tmp_path / "h.sqlite3", max_tasks=1_000_000, retention=10 * 365 * 86400)
    yield h
    h.close()


def test_a_task_s_events_fold_into_one_row_with_its_timeline(history):
    history.apply(run("a", T0, 0))
    t = history.task("a")
    assert t["state"] == "SUCCESS" and t["result"] == "3" and t["worker"] == "w1@h"
    assert t["args"] == "[1,2]" and t["runtime"] == 0.01
    assert [e["type"] for e in t["timeline"]] == ["task-received", "task-started", "task-succeeded"]
    assert t["received"] == rfc3339(T0) and t["finished"] == rfc3339(T0 + 0.002)


def test_events_of_one_task_in_separate_batches_give_the_same_row(history):
    for e in run("a", T0, 0, "task-failed"):
        history.apply([e])
    t = history.task("a")
    assert t["state"] == "FAILURE"
    assert t["exception"] == {"type": "ValueError", "message": "bad"}
    assert t["traceback"] == "Traceback ..." and t["reason"] == "task-failed"


def test_a_late_task_sent_never_replaces_a_later_state(history):
    history.apply(run("a", T0, 0))
    history.apply([ev("task-sent", "a", T0 - 1, 0, host="pub", exchange="tasks",
                      routing_key="task.add", args="[1,2]", kwargs="{}")])  # fmt: skip
    t = history.task("a")
    assert t["state"] == "SUCCESS" and t["exchange"] == "tasks" and t["sent"] == rfc3339(T0 - 1)
    history.apply([ev("task-sent", "b", T0, 1, host="pub")])
    assert history.task("b")["state"] == "PENDING"


def test_a_retried_task_shows_the_new_attempt(history):
    history.apply([*run("a", T0, 0, "task-retried")])
    assert history.task("a")["state"] == "RETRY"
    history.apply([ev("task-received", "a", T0 + 5, 10, retries=1)])
    assert history.task("a")["state"] == "RECEIVED"
    history.apply(run("a", T0 + 5, 11))
    t = history.task("a")
    assert t["state"] == "SUCCESS" and t["retries"] == 0
    assert [e["type"] for e in t["timeline"]].count("task-started") == 2


def test_a_batch_applied_twice_leaves_the_same_task_and_timeline(history):
    batch = run("a", T0, 0)
    history.apply(batch)
    history.apply(batch)  # a redelivery after a kill between commit and ack
    t = history.task("a")
    assert t["state"] == "SUCCESS" and len(t["timeline"]) == 3
    assert history.count() == 1


def test_an_undecodable_body_s_rejection_is_kept_under_a_made_up_id(history):
    history.apply([ev("task-rejected", None, T0, 5, reason="decode-error", detail="not JSON")])
    page = history.tasks(TaskQuery())
    assert [t["id"] for t in page["tasks"]] == ["?w1@h:7:5"]
    assert page["tasks"][0]["state"] == "REJECTED" and page["tasks"][0]["reason"] == "decode-error"


def test_workflow_links_children_group_and_chord(history):
    history.apply(run("root", T0, 0))
    history.apply(run("kid1", T0 + 1, 3, parent_id="root", root_id="root", group_id="g"))
    history.apply(run("kid2", T0 + 2, 6, parent_id="root", root_id="root", group_id="g",
                      chord_id="c"))  # fmt: skip
    t = history.task("root")
    assert [c["id"] for c in t["children"]] == ["kid1", "kid2"]
    kid = history.task("kid2")
    assert kid["parent_id"] == "root" and [m["id"] for m in kid["group_members"]] == [
        "kid1",
        "kid2",
    ]
    assert [m["id"] for m in kid["chord_members"]] == ["kid2"]


def test_workers_keep_their_latest_event(history):
    history.apply([ev("worker-online", None, T0, 0, pool="threads", concurrency=4)])
    history.apply([ev("worker-heartbeat", None, T0 + 2, 1, pool="threads", concurrency=4,
                      processed=9)])  # fmt: skip
    [w] = history.workers()
    assert w["hostname"] == "w1@h" and w["type"] == "worker-heartbeat"
    assert w["info"]["processed"] == 9


def fill(history: History, n: int, start: float = T0, prefix: str = "id") -> list[str]:
    ids = []
    events = []
    for i in range(n):
        tid = f"{prefix}-{i:07d}"
        ids.append(tid)
        outcome = "task-failed" if i % 10 == 0 else "task-succeeded"
        events += run(tid, start + i, 3 * i, outcome, host=f"w{i % 2}@h")
        if len(events) >= 3000:
            history.apply(events)
            events = []
    history.apply(events)
    return ids


def test_filters_search_and_keyset_paging(history):
    ids = fill(history, 250)
    page = history.tasks(TaskQuery(limit=100))
    assert page["total"] == 250 and not page["capped"]
    assert page["tasks"][0]["id"] == ids[-1]  # newest first
    seen = [t["id"] for t in page["tasks"]]
    while page["next"]:
        ts, _, seq = page["next"].rpartition(",")
        page = history.tasks(TaskQuery(limit=100, before=(ts, int(seq))))
        seen += [t["id"] for t in page["tasks"]]
    assert seen == list(reversed(ids))
    failed = history.tasks(TaskQuery(state="FAILURE", limit=1000))
    assert failed["total"] == 25 and {t["state"] for t in failed["tasks"]} == {"FAILURE"}
    assert history.tasks(TaskQuery(worker="w1@h"))["total"] == 125
    assert history.tasks(TaskQuery(search="id-0000042"))["tasks"][0]["id"] == "id-0000042"
    assert history.tasks(TaskQuery(search="[1,2"))["total"] == 250
    assert history.tasks(TaskQuery(search="100%_"))["total"] == 0  # LIKE wildcards are text
    window = history.tasks(TaskQuery(since=rfc3339(T0 + 10), until=rfc3339(T0 + 20)))
    assert window["total"] == 10
    assert history.tasks(TaskQuery(offset=240))["tasks"][-1]["id"] == ids[0]


def test_max_tasks_and_retention_really_delete(tmp_path):
    h = History(tmp_path / "r.sqlite3", max_tasks=100, retention=3600)
    now = T0 + 10_000
    fill(h, 300, start=now - 300)  # all within the hour
    fill(h, 50, start=now - 7200, prefix="old")  # too old, although newer in seq order
    assert h.count() == 350
    deleted = h.prune(now)
    assert deleted == 250 and h.count() == 100
    kept = [t["id"] for t in h.tasks(TaskQuery(limit=1000))["tasks"]]
    assert kept == [f"id-{i:07d}" for i in range(299, 199, -1)]  # the newest 100
    h.close()


def test_the_file_stops_growing_and_reads_back_after_a_restart(tmp_path):
    path = tmp_path / "g.sqlite3"
    h = History(path, max_tasks=2000, retention=10 * 365 * 86400)
    sizes = []
    for cycle in range(6):
        fill(h, 2000, start=T0 + cycle * 10_000, prefix=f"c{cycle}")
        h.prune(T0 + cycle * 10_000 + 5000)
        sizes.append(h.file_size())
        assert h.count() == 2000
    h.close()
    # Each cycle adds 2,000 new tasks and prunes the 2,000 before: the file reuses what was
    # freed instead of growing by a cycle's worth each time.
    assert max(sizes[2:]) <= sizes[1] * 1.2, sizes
    again = History(path, max_tasks=2000, retention=10 * 365 * 86400)
    page = again.tasks(TaskQuery(limit=5))
    assert again.count() == 2000 and page["tasks"][0]["state"] in ("SUCCESS", "FAILURE")
    again.close()


def _ids(page: dict[str, Any]) -> list[str]:
    return [t["id"] for t in page["tasks"]]


def _walk(history: History, q: TaskQuery) -> list[str]:
    """Every id of ``q``, page after page by the keyset cursor."""
    page = history.tasks(q)
    seen = _ids(page)
    while page["next"]:
        ts, _, seq = page["next"].rpartition(",")
        page = history.tasks(dataclasses.replace(q, before=(ts, int(seq))))
        seen += _ids(page)
    return seen


def mixed(history: History, n: int) -> list[dict[str, Any]]:
    """``n`` tasks over 4 workers, 3 names, 2 queues, 1 in 7 failed (in time order); returns
    what each looks like, to compute the expected answers independently of SQL."""
    names = ("t.add", "t.reduce", "web.sendmail")
    tasks, events = [], []
    for i in range(n):
        t = {"id": f"task-{i:05d}", "name": names[i % 3], "worker": f"w{i % 4}@h",
             "queue": ("default", "web_tasks")[i % 2], "at": T0 + i,
             "args": f"[{i},{i + 1}]", "failed": i % 7 == 0}  # fmt: skip
        tasks.append(t)
        end = (
            {"exception": {"type": "ValueError", "message": f"bad input {i}"}}
            if t["failed"]
            else {"result": f"'out-{i}'"}
        )
        events += [
            ev("task-received", t["id"], t["at"], 3 * i, task=t["name"], host=t["worker"],
               queue=t["queue"], args=t["args"], kwargs='{"k": "v"}'),
            ev("task-started", t["id"], t["at"] + 0.001, 3 * i + 1, task=t["name"],
               host=t["worker"], queue=t["queue"]),
            ev("task-failed" if t["failed"] else "task-succeeded", t["id"], t["at"] + 0.002,
               3 * i + 2, task=t["name"], host=t["worker"], queue=t["queue"], runtime=0.01,
               **end),
        ]  # fmt: skip
        if len(events) >= 600:  # received/started/ended of one task may span two batches
            history.apply(events)
            events = []
    history.apply(events)
    return tasks


def test_the_bench_s_queries_answer_right_on_a_small_history(history):
    """The queries ``bench.dashboard_history`` times, each checked against what was
    written (computed in Python, newest first)."""
    tasks = mixed(history, 600)
    newest = list(reversed(tasks))

    def expect(pred: Any) -> list[str]:
        return [t["id"] for t in newest if pred(t)]

    cases = {
        "first page": (TaskQuery(), lambda t: True),
        "state": (TaskQuery(state="FAILURE"), lambda t: t["failed"]),
        "name": (TaskQuery(name="t.reduce"), lambda t: t["name"] == "t.reduce"),
        "worker": (TaskQuery(worker="w3@h"), lambda t: t["worker"] == "w3@h"),
        "queue": (TaskQuery(queue="web_tasks"), lambda t: t["queue"] == "web_tasks"),
        "window": (
            TaskQuery(since=rfc3339(T0 + 100), until=rfc3339(T0 + 130)),
            lambda t: T0 + 100 <= t["at"] < T0 + 130,
        ),
        "state + worker": (
            TaskQuery(state="FAILURE", worker="w1@h"),
            lambda t: t["failed"] and t["worker"] == "w1@h",
        ),
        "search by id": (TaskQuery(search="task-00300"), lambda t: t["id"] == "task-00300"),
        "text, common": (TaskQuery(search="sendmail"), lambda t: t["name"] == "web.sendmail"),
        "text, one task": (TaskQuery(search="[300,301]"), lambda t: t["args"] == "[300,301]"),
        "text in a result": (TaskQuery(search="'out-43'"), lambda t: t["id"] == "task-00043"),
        "text in an exception": (
            TaskQuery(search="bad input 42"),
            lambda t: t["failed"] and str(int(t["id"][5:])).startswith("42"),  # 42, 420, 427
        ),
        "text + worker": (
            TaskQuery(search="sendmail", worker="w1@h"),
            lambda t: t["name"] == "web.sendmail" and t["worker"] == "w1@h",
        ),
        "text, any case": (TaskQuery(search="SENDMAIL"), lambda t: t["name"] == "web.sendmail"),
        "text, 2 characters": (TaskQuery(search="1]"), lambda t: t["args"].endswith("1]")),
        "text, nothing": (TaskQuery(search="no such text"), lambda t: False),
        "text, nothing (common trigrams)": (TaskQuery(search="[1,1]"), lambda t: False),
    }
    for indexed in (False, True):  # the newest rows wait for the index: found all the same
        assert history.unindexed() == (0 if indexed else 600)
        for label, (q, pred) in cases.items():
            want = expect(pred)
            assert bool(want) != ("nothing" in label), label
            page = history.tasks(dataclasses.replace(q, limit=50))
            assert _ids(page) == want[:50], (label, indexed)
            assert page["total"] == len(want) and not page["capped"], (label, indexed)
            assert _walk(history, dataclasses.replace(q, limit=40)) == want, (label, indexed)
        history.index_pending(idle=True)
    # Flower's offset paging: page 3 of 50.
    assert _ids(history.tasks(TaskQuery(offset=100, limit=50))) == expect(lambda t: True)[100:150]


def test_text_search_answers_the_same_from_the_index_and_from_the_scan(history, monkeypatch):
    """Few hits are read through the trigram index, many by a scan newest first: both
    paths give the same pages for the same text (SEARCH_HITS decides which one runs)."""
    mixed(history, 300)
    texts = ["sendmail", "[30", "bad input", "out-2", '{"k"', "1]", "nothing here"]
    queries = [TaskQuery(search=t, limit=25) for t in texts]
    queries += [TaskQuery(search=t, worker="w2@h", state="SUCCESS") for t in texts]

    def answers() -> list[tuple[list[str], int]]:
        return [(_walk(history, q), history.tasks(q)["total"]) for q in queries]

    monkeypatch.setattr(history_module, "INDEX_SLICE", 120)
    not_yet = answers()  # every row waits for the index: scanned by seq
    assert history.index_pending(idle=True) == 120
    half = answers()  # 120 rows in the index, 180 not yet
    while history.index_pending(idle=True):
        pass
    by_index = answers()
    monkeypatch.setattr(history_module, "SEARCH_HITS", 0)  # always the scan newest first
    by_scan = answers()
    assert by_index == by_scan == half == not_yet
    assert [len(ids) for ids, _ in by_index[:4]] == [100, 1, 43, 95]


def test_a_busy_ingest_indexes_in_slices_an_idle_one_at_once(history, monkeypatch):
    monkeypatch.setattr(history_module, "INDEX_SLICE", 100)
    monkeypatch.setattr(history_module, "INDEX_EVERY", 3600.0)
    fill(history, 150)
    assert history.index_pending(idle=False) == 100  # a slice's worth waited
    assert history.index_pending(idle=False) == 0  # 50 wait: not yet, while busy
    assert history.unindexed() == 50
    assert history.index_pending(idle=True) == 50
    assert history.unindexed() == 0 and history.index_pending(idle=True) == 0


def _search_index_holds(path: Path) -> None:
    """FTS5's own check that the index matches the rows of ``tasks`` exactly."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("INSERT INTO tasks_text(tasks_text) VALUES ('integrity-check')")
    finally:
        conn.close()


def test_the_search_index_follows_updates_and_deletes(tmp_path):
    h = History(tmp_path / "i.sqlite3", max_tasks=50, retention=3600)
    now = T0 + 10_000
    fill(h, 80, start=now - 80)
    # A task's received and succeeded in separate batches, indexed in between: its result
    # becomes searchable through the index (the update trigger), not only by the scan.
    h.apply([ev("task-received", "late", now, 900, args='["late-arg"]', kwargs="{}")])
    assert _ids(h.tasks(TaskQuery(search="late-arg"))) == ["late"]
    h.index_pending(idle=True)
    assert h.unindexed() == 0 and h._index_hits('"late-arg"') == 1
    assert h.tasks(TaskQuery(search="late-result"))["total"] == 0
    h.apply([ev("task-succeeded", "late", now + 1, 901, result="'late-result'")])
    assert h._index_hits('"late-result"') == 1
    assert _ids(h.tasks(TaskQuery(search="late-result"))) == ["late"]
    assert h.prune(now) == 31  # 81 tasks, 50 kept
    assert h.tasks(TaskQuery(search="bad"))["total"] == 4  # fill()'s failures among the kept
    assert h._index_hits('"[1,2]"') == 49  # pruned rows left the index too
    _search_index_holds(tmp_path / "i.sqlite3")
    # The newest row pruned (an old event arriving late): its seq may be given again, to a
    # row the index does not hold; the mark follows, so it is scanned and then indexed.
    h.apply([ev("task-received", "old-late", now - 7200, 950, args='["from-before"]')])
    assert h.prune(now) == 1
    h.apply([ev("task-received", "next", now + 2, 960, args='["after-it"]', kwargs="{}")])
    assert h.unindexed() == 1
    assert _ids(h.tasks(TaskQuery(search="after-it"))) == ["next"]
    h.index_pending(idle=True)
    assert _ids(h.tasks(TaskQuery(search="after-it"))) == ["next"]
    assert h.tasks(TaskQuery(search="from-before"))["total"] == 0
    h.close()
    _search_index_holds(tmp_path / "i.sqlite3")


def test_a_history_from_before_the_search_index_opens_and_gets_it(tmp_path):
    """A layout 1 file (no ``tasks_text``, user_version 1) opens, its tasks become
    searchable, and what is written afterwards is indexed too."""
    path = tmp_path / "old.sqlite3"
    h = History(path, max_tasks=1000, retention=10 * 365 * 86400)
    fill(h, 120)
    h.close()
    conn = sqlite3.connect(path)  # take it back to what layout 1 wrote
    conn.executescript("DROP TABLE tasks_text; DROP TABLE search_state; PRAGMA user_version = 1;")
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name LIKE 'tasks_text%'"
                        ).fetchone()[0] == 0  # fmt: skip
    conn.close()
    again = History(path, max_tasks=1000, retention=10 * 365 * 86400)
    failures = [f"id-{i:07d}" for i in range(110, -1, -10)]
    assert again.unindexed() == 120  # opened at once; its rows wait for the index
    assert _ids(again.tasks(TaskQuery(search="bad"))) == failures  # scanned meanwhile
    assert again.index_pending(idle=True) == 120
    assert again._index_hits('"bad"') == 12  # the old rows are in the index
    assert _ids(again.tasks(TaskQuery(search="bad"))) == failures
    again.apply([ev("task-received", "new-one", T0 + 5000, 9000, args="[7,7]", kwargs="{}")])
    assert _ids(again.tasks(TaskQuery(search="[7,7]"))) == ["new-one"]
    again.index_pending(idle=True)
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 2
    again.close()
    _search_index_holds(path)


def test_a_history_from_a_newer_layout_is_refused(tmp_path):
    path = tmp_path / "new.sqlite3"
    History(path, max_tasks=10, retention=3600).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(ValueError, match="written by a newer amqptasks"):
        History(path, max_tasks=10, retention=3600)


def test_a_search_text_holding_a_nul_or_fts_syntax_is_searched_not_an_error(history):
    # Found by schemathesis against the real server: FTS5 ends a query string at NUL and
    # answered "unterminated string" (a 500); the text is scanned instead.
    fill(history, 30)
    history.index_pending()
    for text in ("ab\x00cd", "x\u0080\x00y", 'a"b OR c', "NEAR(x y)", "*"):
        page = history.tasks(TaskQuery(search=text))
        assert page["total"] == 0 and page["tasks"] == []
