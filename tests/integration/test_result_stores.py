"""Both result stores against their real back ends: SQLite files and the local redis-server.

Every behaviour the ResultStore protocol promises is tested on both stores (the ``store``
fixture is parametrized); what only one store does (polling-free waits on Redis, purge on
SQLite) is tested on that one. Several processes are real subprocesses.
"""

from __future__ import annotations

import json
import random
import socket
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from broker_fixtures import wait_for
from store_fixtures import ROOT, StoreFactory, child_command, child_env, raw_redis, run_child

from amqptasks.errors import ResultStoreError
from amqptasks.results import store_from_url
from amqptasks.results.meta import (
    FAILURE,
    RETRY,
    REVOKED,
    STARTED,
    SUCCESS,
    ResultMeta,
    utcnow,
)
from amqptasks.results.redis import RedisStore
from amqptasks.results.sqlite import SqliteStore


@pytest.fixture(params=["sqlite", "redis"])
def factory(request: pytest.FixtureRequest) -> StoreFactory:
    made: StoreFactory = request.getfixturevalue(f"{request.param}_store_factory")
    return made


@pytest.fixture
def store(factory: StoreFactory) -> Any:
    return factory()


def uid() -> str:
    return uuid.uuid4().hex


def success(task_id: str, result: Any = None, **fields: Any) -> ResultMeta:
    return ResultMeta(id=task_id, status=SUCCESS, result=result, **fields)


# -- records ------------------------------------------------------------------------------------
def test_save_get_forget_round_trips_every_field(store: Any) -> None:
    tid = uid()
    full = ResultMeta(
        id=tid,
        status=FAILURE,
        task="examples.tasks.add",
        result={"partial": [1, 2.5, None, "x"]},
        error_type="ZeroDivisionError",
        error_message="division by zero",
        traceback="Traceback (most recent call last): ...",
        reason="unknown-task",
        date_done=utcnow(),
        retries=3,
        worker="host-1",
        parent_id="p",
        root_id="r",
        group_id="g",
        children=("c1", "c2"),
    )
    assert store.get(tid) is None
    store.save([ResultMeta(id=tid, status=STARTED, task="examples.tasks.add")])
    assert store.get(tid) == ResultMeta(id=tid, status=STARTED, task="examples.tasks.add")
    store.save([full])
    assert store.get(tid) == full
    store.forget([tid, "never-written"])
    assert store.get(tid) is None
    store.forget([])


def test_a_ready_record_is_not_hidden_by_a_late_started_or_retry(store: Any) -> None:
    tid = uid()
    store.save([success(tid, 5)])
    store.save([ResultMeta(id=tid, status=STARTED)])
    store.save([ResultMeta(id=tid, status=RETRY, retries=1)])
    assert store.get(tid) == success(tid, 5)

    other = uid()  # within one batch too, in order
    store.save(
        [
            ResultMeta(id=other, status=STARTED),
            success(other, 1),
            ResultMeta(id=other, status=RETRY),
        ]
    )
    assert store.get(other) == success(other, 1)


@pytest.mark.parametrize("one_statement", [True, False], ids=["json_each", "per-row"])
def test_sqlite_batches_keep_order_and_the_ready_rule_either_way(
    sqlite_store: SqliteStore, one_statement: bool
) -> None:
    # A batch is one json_each statement where SQLite has JSON1, one statement per row where
    # it has not: both must apply a batch's rows in order, against rows saved before.
    sqlite_store._json_each = one_statement
    done, late, fresh = uid(), uid(), uid()
    sqlite_store.save([success(done, 1)])
    sqlite_store.save(
        [
            ResultMeta(id=done, status=STARTED),  # a READY record stays
            ResultMeta(id=late, status=SUCCESS, result="first"),
            ResultMeta(id=late, status=FAILURE, error_type="E", error_message="second"),
            ResultMeta(id=fresh, status=STARTED),
            ResultMeta(id=fresh, status=RETRY, retries=1),  # replaced within the batch
        ]
    )
    assert sqlite_store.get_many([done, late, fresh]) == [
        success(done, 1),
        ResultMeta(id=late, status=SUCCESS, result="first"),
        ResultMeta(id=fresh, status=RETRY, retries=1),
    ]


def test_a_non_ready_record_is_replaced(store: Any) -> None:
    tid = uid()
    store.save([ResultMeta(id=tid, status=STARTED, worker="a")])
    store.save([ResultMeta(id=tid, status=RETRY, retries=1)])
    assert store.get(tid) == ResultMeta(id=tid, status=RETRY, retries=1)
    store.save([ResultMeta(id=tid, status=STARTED, retries=1, worker="b")])
    assert store.get(tid) == ResultMeta(id=tid, status=STARTED, retries=1, worker="b")


@pytest.mark.parametrize(
    "first",
    [
        ResultMeta(id="x", status=SUCCESS, result=1),
        ResultMeta(id="x", status=FAILURE, error_type="E", error_message="m"),
        ResultMeta(id="x", status=REVOKED, reason="revoked"),
    ],
    ids=["success", "failure", "revoked"],
)
def test_the_first_ready_state_wins(store: Any, first: ResultMeta) -> None:
    store.save([first])
    store.save([success("x", 2)])
    store.save([ResultMeta(id="x", status=FAILURE, error_type="Other", error_message="late")])
    store.save([ResultMeta(id="x", status=REVOKED)])
    assert store.get("x") == first


def test_get_many_keeps_the_callers_order(store: Any) -> None:
    ids = [uid() for _ in range(5)]
    store.save([success(t, i) for i, t in enumerate(ids) if i != 2])
    asked = [ids[4], "missing", ids[0], ids[2], ids[4], ids[1]]
    got = store.get_many(asked)
    assert [m.result if m else None for m in got] == [4, None, 0, None, 4, 1]
    assert [m.id if m else None for m in got] == [ids[4], None, ids[0], None, ids[4], ids[1]]
    assert store.get_many([]) == []


def test_a_batch_is_atomic_for_readers(factory: StoreFactory) -> None:
    writer, reader = factory(), factory()
    batches = [[success(f"batch{b}-{i}", i) for i in range(50)] for b in range(40)]
    seen: list[int] = []
    done = threading.Event()

    def read() -> None:
        rng = random.Random(1)
        while not done.is_set():
            batch = batches[rng.randrange(len(batches))]
            found = sum(m is not None for m in reader.get_many([m.id for m in batch]))
            seen.append(found)

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for batch in batches:
            writer.save(batch)
    finally:
        done.set()
        thread.join(30)
    assert seen, "the reader never ran"
    assert set(seen) <= {0, 50}, f"a reader saw part of a batch: {sorted(set(seen))}"


def test_an_unserialisable_result_fails_the_whole_batch_before_writing(store: Any) -> None:
    good, bad = uid(), uid()
    with pytest.raises(ValueError, match=f"{bad}.*not JSON-serialisable"):
        store.save([success(good, 1), success(bad, {1, 2})])
    assert store.get_many([good, bad]) == [None, None]


def test_a_record_written_by_one_process_is_read_by_another(factory: StoreFactory) -> None:
    store = factory()
    mine = success(uid(), {"from": "parent"}, task="t")
    store.save([mine])
    assert json.loads(run_child(factory.spec(), "read", mine.id)) == mine.to_dict()

    theirs = uid()
    run_child(factory.spec(), "write", theirs)
    got = store.get(theirs)
    assert got is not None and got.status == SUCCESS
    assert set(got.result) == {"pid"} and got.result["pid"] != 0


# -- groups -------------------------------------------------------------------------------------
def test_groups_are_saved_and_read(store: Any) -> None:
    gid = uid()
    members = [uid() for _ in range(3)]
    assert store.get_group(gid) is None
    store.save_group(gid, members)
    assert store.get_group(gid) == members
    store.save_group(gid, members[:1])
    assert store.get_group(gid) == members[:1]


# -- chords -------------------------------------------------------------------------------------
SIZE = 1000
DUPLICATES = 300


def chord_plan(seed: int) -> list[int]:
    """Every index once plus DUPLICATES random repeats, shuffled."""
    rng = random.Random(seed)
    plan = list(range(SIZE)) + [rng.randrange(SIZE) for _ in range(DUPLICATES)]
    rng.shuffle(plan)
    return plan


def check_chord_calls(calls: list[dict[str, Any]]) -> None:
    """What chord_add guarantees under concurrency, checked over every call's answer."""
    assert len(calls) == SIZE + DUPLICATES
    recorded = [c for c in calls if c["recorded"]]
    # Exactly one recording call per index, and their counts are exactly 1..SIZE, each once.
    assert sorted(c["index"] for c in recorded) == list(range(SIZE))
    assert sorted(c["done"] for c in recorded) == list(range(1, SIZE + 1))
    # Exactly one call recorded the member that completed the chord.
    assert [c["done"] for c in recorded if c["complete"]] == [SIZE]
    assert sum(not c["recorded"] for c in calls) == DUPLICATES
    assert all(c["done"] <= SIZE and c["complete"] == (c["done"] == SIZE) for c in calls)
    # Results in index order whenever complete; none before.
    assert all(c["results_ok"] for c in calls)
    # However many saw it complete, exactly one won the body.
    assert sum(c["complete"] for c in calls) >= 1
    assert sum(c["won"] for c in calls) == 1


@pytest.mark.parametrize("batch", [1, 7], ids=["chord_add", "chord_add_many"])
def test_chord_add_from_8_threads_counts_exactly(factory: StoreFactory, batch: int) -> None:
    """Members added from 8 threads on two clients at once, one call each (``chord_add``)
    or in batches (``chord_add_many``, as the store thread sends them): every member is
    counted once and exactly one caller wins the body."""
    stores = [factory(), factory()]  # two clients (connections) share the threads
    chord_id = uid()
    plan = chord_plan(seed=8 + batch)
    calls: list[dict[str, Any]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def add(store: Any, members: list[Any]) -> list[Any]:
        if batch == 1:
            return [store.chord_add(*members[0])]
        return list(store.chord_add_many(members))

    def run(worker: int) -> None:
        store = stores[worker % 2]
        mine = plan[worker::8]
        barrier.wait()
        for start in range(0, len(mine), batch):
            members = [
                (chord_id, SIZE, i, success(f"{chord_id}-{i}", i))
                for i in mine[start : start + batch]
            ]
            for (_c, _s, index, _m), progress in zip(members, add(store, members), strict=True):
                won = progress.complete and store.chord_mark_body_sent(chord_id)
                results_ok = (
                    progress.results == list(range(SIZE))
                    if progress.complete
                    else progress.results is None
                )
                call = {
                    "index": index,
                    "recorded": progress.recorded,
                    "done": progress.done,
                    "complete": progress.complete,
                    "won": won,
                    "results_ok": results_ok and progress.failed is None and progress.size == SIZE,
                }
                with lock:
                    calls.append(call)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    check_chord_calls(calls)

    again = stores[0].chord_add(chord_id, SIZE, 17, success("late-duplicate", -1))
    assert (again.recorded, again.done, again.complete) == (False, SIZE, True)
    assert again.body_sent
    assert again.results is not None and again.results[17] == 17


def test_chord_add_from_2_processes_counts_exactly(factory: StoreFactory) -> None:
    chord_id = uid()
    plan = chord_plan(seed=2)
    halves = [plan[0::2], plan[1::2]]
    procs = [
        subprocess.Popen(
            [*child_command(factory.spec()), "chord", chord_id, str(SIZE), "4"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=child_env(),
        )
        for _ in halves
    ]
    outputs = [
        p.communicate(json.dumps(half), timeout=180) for p, half in zip(procs, halves, strict=True)
    ]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    calls = [json.loads(line) for out, _ in outputs for line in out.splitlines() if line]
    assert len({c["pid"] for c in calls}) == 2
    check_chord_calls(calls)


def test_chord_reports_its_first_failed_member_and_no_results(store: Any) -> None:
    chord_id = uid()
    failure_3 = ResultMeta(id="m3", status=FAILURE, error_type="KeyError", error_message="'k'")
    failure_7 = ResultMeta(id="m7", status=FAILURE, error_type="ValueError", error_message="v")
    progress = store.chord_add(chord_id, 10, 0, success("m0", 0))
    assert progress.failed is None
    progress = store.chord_add(chord_id, 10, 3, failure_3)
    assert (progress.done, progress.failed) == (2, failure_3)
    progress = store.chord_add(chord_id, 10, 7, failure_7)
    assert progress.failed == failure_3
    for i in (1, 2, 4, 5, 6, 8, 9):
        progress = store.chord_add(chord_id, 10, i, success(f"m{i}", i))
    assert progress.complete and progress.done == 10
    assert progress.failed == failure_3
    assert progress.results is None


def test_a_revoked_member_fails_the_chord(store: Any) -> None:
    chord_id = uid()
    revoked = ResultMeta(id="m1", status=REVOKED, reason="revoked")
    store.chord_add(chord_id, 2, 0, success("m0", 0))
    progress = store.chord_add(chord_id, 2, 1, revoked)
    assert progress.complete and progress.failed == revoked and progress.results is None


def test_the_first_record_for_an_index_wins(store: Any) -> None:
    chord_id = uid()
    first = store.chord_add(chord_id, 2, 0, success("m0", "first"))
    second = store.chord_add(chord_id, 2, 0, ResultMeta(id="m0", status=FAILURE))
    assert first.recorded and not second.recorded
    assert second.done == 1 and second.failed is None
    final = store.chord_add(chord_id, 2, 1, success("m1", "second"))
    assert final.results == ["first", "second"]


def test_chord_add_refuses_bad_calls(store: Any) -> None:
    chord_id = uid()
    store.chord_add(chord_id, 3, 0, success("m0"))
    with pytest.raises(ValueError, match=f"chord '{chord_id}' has size 3, not 4"):
        store.chord_add(chord_id, 4, 1, success("m1"))
    with pytest.raises(ValueError, match=r"index must be in 0\.\.2, got 3"):
        store.chord_add(chord_id, 3, 3, success("m3"))
    with pytest.raises(ValueError, match="STARTED"):
        store.chord_add(chord_id, 3, 1, ResultMeta(id="m1", status=STARTED))
    assert store.chord_add(chord_id, 3, 0, success("m0")).done == 1  # nothing else counted


def test_chord_add_many_answers_like_one_call_per_member(store: Any) -> None:
    """The worker's batched form: each member's answer is the one chord_add would give, in
    order; a refused member gets its ValueError and the others are still recorded."""
    chord_id, other = uid(), uid()
    answers = store.chord_add_many(
        [
            (chord_id, 3, 0, success("m0", "a")),
            (chord_id, 4, 1, success("m1", "wrong size")),  # refused: the chord has 3
            (other, 1, 0, success("o0", "only")),  # another chord in the same batch
            (chord_id, 3, 1, success("m1", "b")),
            (chord_id, 3, 1, success("m1", "dup")),  # a duplicate within the batch
            (chord_id, 3, 5, success("m5")),  # refused: no index 5
            (chord_id, 3, 2, success("m2", "c")),
        ]
    )
    assert [type(a).__name__ for a in answers] == [
        "ChordProgress",
        "ValueError",
        "ChordProgress",
        "ChordProgress",
        "ChordProgress",
        "ValueError",
        "ChordProgress",
    ]
    assert "has size 3, not 4" in str(answers[1]) and "0..2, got 5" in str(answers[5])
    assert [(a.recorded, a.done) for a in (answers[0], answers[3], answers[4], answers[6])] == [
        (True, 1),
        (True, 2),
        (False, 2),
        (True, 3),
    ]
    assert answers[2].complete and answers[2].results == ["only"]
    assert answers[6].complete and answers[6].results == ["a", "b", "c"]
    assert store.chord_add(chord_id, 3, 0, success("m0")).done == 3  # nothing else counted


def test_body_sent_is_won_once_and_a_token_repeats(store: Any) -> None:
    chord_id = uid()
    progress = store.chord_add(chord_id, 1, 0, success("m0"))
    assert progress.complete and not progress.body_sent
    winners: list[bool] = []
    threads = [
        threading.Thread(target=lambda: winners.append(store.chord_mark_body_sent(chord_id)))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(winners) == [False] * 7 + [True]
    assert store.chord_add(chord_id, 1, 0, success("m0")).body_sent

    other = uid()
    store.chord_add(other, 1, 0, success("n0"))
    assert store.chord_mark_body_sent(other, token="member-message-id")
    assert store.chord_mark_body_sent(other, token="member-message-id")  # redelivered: again
    assert not store.chord_mark_body_sent(other, token="another-message")
    assert not store.chord_mark_body_sent(other)
    with pytest.raises(ResultStoreError, match="does not exist"):
        store.chord_mark_body_sent("no-such-chord")


# -- waiting ------------------------------------------------------------------------------------
def saver(store: Any, meta: ResultMeta, delay: float) -> threading.Timer:
    timer = threading.Timer(delay, lambda: store.save([meta]))
    timer.start()
    return timer


def test_wait_returns_as_soon_as_a_record_lands(store: Any) -> None:
    first, second = uid(), uid()
    store.save([success(first)])
    timer = saver(store, success(second), 0.5)
    start = time.monotonic()
    try:
        assert store.wait([first, second], timeout=10) is True
    finally:
        timer.join()
    assert 0.5 <= time.monotonic() - start < 0.7


def test_wait_is_woken_by_a_save_in_another_process(factory: StoreFactory) -> None:
    store = factory()
    tid = uid()
    landed: list[float] = []
    child = threading.Thread(
        target=lambda: landed.append(float(run_child(factory.spec(), "write", tid, "0.5")))
    )
    child.start()
    try:
        assert store.wait([tid], timeout=30) is True
        woke = time.time()
    finally:
        child.join(60)
    # SQLite notices another process's commit within its 250 ms backoff cap; Redis at once.
    assert woke - landed[0] < 0.4


def test_wait_ignores_non_ready_records_and_times_out(store: Any) -> None:
    tid = uid()
    timer = saver(store, ResultMeta(id=tid, status=STARTED), 0.1)
    start = time.monotonic()
    try:
        assert store.wait([tid, uid()], timeout=0.6) is False
    finally:
        timer.join()
    assert 0.6 <= time.monotonic() - start < 1.0


def test_wait_on_ready_or_no_ids_returns_at_once(store: Any) -> None:
    tid = uid()
    store.save([ResultMeta(id=tid, status=REVOKED)])
    start = time.monotonic()
    assert store.wait([tid], timeout=0) is True
    assert store.wait([], timeout=0) is True
    assert store.wait([uid()], timeout=0) is False
    assert time.monotonic() - start < 0.2


# -- expiry -------------------------------------------------------------------------------------
def test_expired_records_groups_and_chords_are_really_removed(factory: StoreFactory) -> None:
    store = factory(expires=1)
    tid, gid, cid = uid(), uid(), uid()
    store.save([success(tid)])
    store.save_group(gid, [tid])
    store.chord_add(cid, 2, 0, success("m0"))
    assert store.get(tid) is not None and store.get_group(gid) == [tid]

    wait_for(
        lambda: store.get(tid) is None and store.get_group(gid) is None,
        timeout=5,
        message="records to expire",
    )
    with pytest.raises(ResultStoreError, match="does not exist"):
        store.chord_mark_body_sent(cid)
    if isinstance(store, SqliteStore):
        # Unreadable at once, on disk until purged: purge really deletes the rows.
        assert store.stats() == {"results": 1, "groups": 1, "chords": 1, "chord_members": 1}
        assert store.purge_expired() == 3
        assert store.stats() == {"results": 0, "groups": 0, "chords": 0, "chord_members": 0}
    else:
        assert store.purge_expired() == 0  # Redis expires the keys itself
        with raw_redis() as client:
            keys = [store._result_key(tid), store._group_key(gid), store._chord_key(cid)]
            assert client.exists(*keys) == 0
            assert list(client.scan_iter(match=f"{store.namespace}:*")) == []
        assert store.stats() == {"results": 0, "groups": 0, "chords": 0}


def test_every_saved_key_carries_a_ttl_on_redis(redis_store: RedisStore) -> None:
    tid, gid, cid = uid(), uid(), uid()
    redis_store.save([ResultMeta(id=tid, status=STARTED)])
    redis_store.save_group(gid, [tid])
    redis_store.chord_add(cid, 2, 0, success("m0"))
    with raw_redis() as client:
        for key in (
            redis_store._result_key(tid),
            redis_store._group_key(gid),
            redis_store._chord_key(cid),
        ):
            assert 86_000_000 < client.pttl(key) <= 86_400_000, key


def test_sqlite_purge_removes_only_what_has_expired(sqlite_store_factory: StoreFactory) -> None:
    store = sqlite_store_factory(expires=60)
    store.save([success("old")])
    assert store.purge_expired(now=utcnow() + timedelta(seconds=30)) == 0
    assert store.purge_expired(now=utcnow() + timedelta(seconds=61)) == 1
    assert store.stats()["results"] == 0


def test_records_without_expiry_live_on(factory: StoreFactory) -> None:
    store = factory(expires=None)
    store.save([success("kept")])
    assert store.purge_expired(now=utcnow() + timedelta(days=3650)) == 0
    assert store.get("kept") == success("kept")
    if isinstance(store, RedisStore):
        with raw_redis() as client:
            assert client.pttl(store._result_key("kept")) == -1


# -- Redis: no polling, reconnection, a Redis that is down --------------------------------------
READ_COMMANDS = ("get", "mget", "exists", "hget", "hmget", "hgetall", "evalsha", "eval", "scan")


def command_calls(client: Any) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def test_redis_wait_does_not_poll(redis_store: RedisStore) -> None:
    with raw_redis() as client:
        before = command_calls(client)
        start = time.monotonic()
        assert redis_store.wait([uid()], timeout=5) is False
        assert time.monotonic() - start >= 5
        after = command_calls(client)
    grew = {c: after.get(c, 0) - before.get(c, 0) for c in after}
    reads = sum(grew.get(c, 0) for c in READ_COMMANDS)
    assert reads <= 3, grew  # read, subscribe, read again: then only waiting
    others = {c: n for c, n in grew.items() if n and c not in ("info",)}
    assert sum(others.values()) <= 10, others


def kill_connections(name: str, *, subscribers_only: bool = False) -> int:
    killed = 0
    with raw_redis() as client:
        for conn in client.client_list():
            if conn.get("name") == name and (not subscribers_only or int(conn["sub"]) > 0):
                client.client_kill_filter(_id=conn["id"])
                killed += 1
    return killed


def test_redis_reconnects_after_its_connections_are_killed(
    redis_store_factory: StoreFactory,
) -> None:
    store = redis_store_factory()
    tid = uid()
    store.save([success(tid, 1)])
    assert kill_connections(redis_store_factory.client_name) >= 1
    assert store.get(tid) == success(tid, 1)
    store.save([success(uid())])


def test_redis_wait_survives_a_killed_subscription(redis_store_factory: StoreFactory) -> None:
    waiter, writer = redis_store_factory(), redis_store_factory()
    tid = uid()
    outcome: list[bool] = []
    thread = threading.Thread(target=lambda: outcome.append(waiter.wait([tid], timeout=15)))
    thread.start()
    try:
        wait_for(
            lambda: kill_connections(redis_store_factory.client_name, subscribers_only=True),
            timeout=5,
            message="the waiter's subscription",
        )
        writer.save([success(tid)])
    finally:
        thread.join(30)
    assert outcome == [True]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.parametrize(
    "operation",
    [
        lambda s: s.get("x"),
        lambda s: s.save([success("x")]),
        lambda s: s.wait(["x"], timeout=60),
        lambda s: s.chord_add("c", 2, 0, success("x")),
        lambda s: s.get_group("g"),
        lambda s: s.stats(),
    ],
    ids=["get", "save", "wait", "chord_add", "get_group", "stats"],
)
def test_a_redis_that_is_down_is_a_clear_error_in_bounded_time(
    operation: Callable[[Any], Any],
) -> None:
    port = closed_port()
    store = store_from_url(f"redis://:s3cret@127.0.0.1:{port}/0")
    assert isinstance(store, RedisStore)
    try:
        start = time.monotonic()
        with pytest.raises(ResultStoreError) as info:
            operation(store)
        assert time.monotonic() - start < 5
    finally:
        store.close()
    message = str(info.value)
    assert f"redis://:***@127.0.0.1:{port}/0" in message
    assert "s3cret" not in message and "s3cret" not in repr(store)
    assert "unreachable" in message and "refused" in message.lower()


# -- SQLite specifics ---------------------------------------------------------------------------
def test_sqlite_url_relative_to_the_current_directory_creates_its_parents(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = store_from_url("sqlite:///state/deeper/results.sqlite3", expires=60)
    assert isinstance(store, SqliteStore)
    try:
        store.save([success("x")])
        monkeypatch.chdir("/")  # a later chdir does not move the store
        assert store.get("x") == success("x")
    finally:
        store.close()
    assert (tmp_path / "state" / "deeper" / "results.sqlite3").is_file()
    with sqlite3.connect(tmp_path / "state" / "deeper" / "results.sqlite3") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_sqlite_store_is_used_from_many_threads(sqlite_store: SqliteStore) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(50):
                sqlite_store.save([success(f"t{n}-{i}", i)])
                assert sqlite_store.get(f"t{n}-{i}") == success(f"t{n}-{i}", i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sqlite_store.stats()["results"] == 400


def test_a_corrupt_record_is_a_clear_error(factory: StoreFactory) -> None:
    store = factory()
    store.save([success("bad")])
    if isinstance(store, SqliteStore):
        with sqlite3.connect(store.path) as conn:
            conn.execute("UPDATE results SET meta = '{\"id\": \"bad\"}' WHERE id = 'bad'")
    else:
        with raw_redis() as client:
            client.hset(store._result_key("bad"), "meta", b"not json")
    with pytest.raises(ResultStoreError, match="record 'bad' is corrupt"):
        store.get("bad")


def test_a_closed_store_says_so(store: Any) -> None:
    store.close()
    with pytest.raises(ResultStoreError, match="closed"):
        store.get("x")
    store.close()  # twice is fine


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Any) -> None:
    path = tmp_path / "results.sqlite3"
    path.write_bytes(b"these are not the results you are looking for" * 100)
    with pytest.raises(
        ResultStoreError, match=r"cannot prepare the database.*not a database"
    ) as info:
        SqliteStore(path)
    assert str(path) in str(info.value)


def test_a_directory_that_cannot_be_created_is_a_clear_error(tmp_path: Any) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ResultStoreError, match="cannot create directory"):
        store_from_url(f"sqlite:///{tmp_path}/file/results.sqlite3")


@pytest.mark.parametrize("lock", ["IMMEDIATE", "EXCLUSIVE"])
def test_opening_waits_for_a_writer_that_holds_the_file(tmp_path: Any, lock: str) -> None:
    # Another process in the middle of a write while a store opens the file (two processes
    # starting on a fresh file do this): switching to WAL gets "database is locked" at once,
    # without SQLite's busy handler, so the store must wait and retry by itself.
    path = tmp_path / "results.sqlite3"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        other.execute("CREATE TABLE unrelated (x)")
        other.execute(f"BEGIN {lock}")
        other.execute("INSERT INTO unrelated VALUES (1)")
        release = threading.Timer(0.3, lambda: other.execute("COMMIT"))
        release.start()
        start = time.monotonic()
        store = SqliteStore(path, busy_timeout=10)
        release.join()
    finally:
        other.close()
    try:
        assert 0.3 <= time.monotonic() - start < 5
        store.save([success("x")])
        assert store.get("x") == success("x")
    finally:
        store.close()


def test_store_runner_calls_done_only_after_the_record_is_stored(
    sqlite_store_factory: StoreFactory,
) -> None:
    # The fast path acks from save_then's callback: done(None) must mean "readable in the
    # store", and a store that cannot write must end in done(exc) — never done(None).
    import asyncio

    from amqptasks.worker.storecalls import StoreRunner

    writer, reader = sqlite_store_factory(), sqlite_store_factory()
    kept, lost = uid(), uid()

    async def scenario() -> list[tuple[str, BaseException | None, ResultMeta | None]]:
        runner = StoreRunner(writer, max_retry_delay=0.01)
        runner.start()
        seen: list[tuple[str, BaseException | None, ResultMeta | None]] = []
        answered = asyncio.Event()

        def done_for(tid: str) -> Callable[[BaseException | None], None]:
            def done(exc: BaseException | None) -> None:
                seen.append((tid, exc, reader.get(tid)))
                answered.set()

            return done

        runner.save_then(success(kept, 1), done_for(kept))
        await asyncio.wait_for(answered.wait(), 10)
        writer.close()  # the outage: every write now fails, and is retried
        answered.clear()
        runner.save_then(success(lost, 2), done_for(lost))
        await runner.close(timeout=0.2)  # gives up retrying: the callback gets the error
        await asyncio.wait_for(answered.wait(), 10)
        return seen

    seen = asyncio.run(scenario())
    assert seen[0] == (kept, None, success(kept, 1))
    assert seen[1][0] == lost
    assert isinstance(seen[1][1], ResultStoreError), seen[1][1]
    assert seen[1][2] is None


def test_the_store_thread_batches_chord_adds_and_answers_each_member(factory: StoreFactory) -> None:
    """Members finishing together are one chord_add_many on the store thread (one round trip
    or transaction), and each caller still gets its own answer — a refused one its error."""
    import asyncio

    from amqptasks.worker.storecalls import StoreRunner

    store = factory()
    calls: list[int] = []
    many = store.chord_add_many

    def counted(members: Any) -> Any:
        calls.append(len(members))
        return many(members)

    store.chord_add_many = counted  # type: ignore[method-assign]
    chord_id = uid()

    async def scenario() -> list[Any]:
        runner = StoreRunner(store)
        runner.start()
        try:
            futures = [runner.chord_add(chord_id, 200, i, success(f"m{i}", i)) for i in range(200)]
            futures.append(runner.chord_add(chord_id, 7, 0, success("bad")))
            return await asyncio.gather(*futures, return_exceptions=True)
        finally:
            await runner.close()

    answers = asyncio.run(scenario())
    assert sum(calls) == 201 and len(calls) < 20, calls  # batched, every member once
    assert isinstance(answers[-1], ValueError) and "has size 200, not 7" in str(answers[-1])
    done = sorted(a.done for a in answers[:-1])
    assert done == list(range(1, 201))
    [last] = [a for a in answers[:-1] if a.complete]
    assert last.results == list(range(200))
