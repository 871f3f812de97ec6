"""Workflows on real workers: the seed examples, failures, nested forms, results by id.

Each test runs against a real broker and a real result store (a SQLite file per test, or the
local Redis), the way a user would: tasks published with the public API, a worker started
with the CLI, results read back.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest
from broker_fixtures import ROOT, amqptasks_exe, cli_env, ledger_lines, wait_for, write_config

from amqptasks import App, TaskError, load_config
from amqptasks.canvas import chain, chord, group
from amqptasks.errors import ResultsUnavailable

BACKENDS = ["sqlite", "redis"]


def _backend(tmp_path, kind: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/results.sqlite3"
    if kind == "redis":
        return "redis://127.0.0.1:6379/1"
    return "rpc://"


@pytest.fixture(params=BACKENDS)
def setup(request, tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker, results={"backend": _backend(tmp_path, request.param)})
    ledger = tmp_path / "ledger"
    worker_factory(cfg, "-Q", "default", "-c", "4", ledger=ledger)
    app = App(load_config(cfg, env={}))
    yield app, ledger, cfg
    app.close()


def _sig(app, name, *args):
    return app.signature(f"testtasks.{name}", args)


def test_seed_group_chain_and_nested_chain(setup):
    app, _, _ = setup
    g = group(_sig(app, "add", i, i) for i in range(10))
    assert g().get(timeout=30) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]
    c = chain(_sig(app, "add", 2, 2), _sig(app, "add", 4), _sig(app, "add", 8))
    assert c().get(timeout=30) == 16
    nested = (
        _sig(app, "add", 4, 16) | _sig(app, "mul", 2) | (_sig(app, "add", 4) | _sig(app, "mul", 8))
    )
    assert nested().get(timeout=30) == 352


def test_chord_body_runs_once_with_every_result_in_order(setup):
    app, ledger, _ = setup
    header = [_sig(app, "add", i, 0) for i in range(50)]
    result = chord(header)(_sig(app, "collect"))
    assert result.get(timeout=60) == list(range(50))
    assert ledger_lines(ledger).count("collect 50") == 1


def test_nested_workflows(setup):
    app, _, _ = setup
    # a group in a chain becomes a chord; a chord inside a chain; a chain inside a group
    assert (
        chain(
            _sig(app, "add", 1, 1),
            group(_sig(app, "add", 1), _sig(app, "add", 2)),
            _sig(app, "tsum"),
        )().get(timeout=30)
        == 7
    )
    inner = chord([_sig(app, "add", 1), _sig(app, "add", 2)], _sig(app, "tsum"))
    assert chain(_sig(app, "add", 1, 1), inner, _sig(app, "add", 100))().get(timeout=30) == 107
    g = group(chain(_sig(app, "add", 1, 1), _sig(app, "add", 1)), _sig(app, "add", 5, 5))
    assert g().get(timeout=30) == [3, 10]


def test_chain_of_100_steps(setup):
    app, _, _ = setup
    steps = [_sig(app, "add", 0, 0)] + [_sig(app, "add", 1) for _ in range(99)]
    assert chain(*steps)().get(timeout=120) == 99


def test_chain_whose_third_step_fails(setup):
    app, ledger, _ = setup
    c = chain(_sig(app, "add", 1, 1), _sig(app, "add", 1), _sig(app, "boom"), _sig(app, "add", 1))
    c.link_error(_sig(app, "on_error"))
    result = c()
    with pytest.raises(TaskError) as info:
        result.get(timeout=30)
    assert isinstance(info.value, ValueError)  # the remote type, as a builtin mix-in
    failed_step = result.parent  # the third step
    wait_for(lambda: any(x.startswith("errback") for x in ledger_lines(ledger)), message="errback")
    time.sleep(0.5)  # nothing else may run after the errback
    lines = ledger_lines(ledger)
    assert [x for x in lines if x.startswith("add")] == ["add 1 1", "add 2 1"]
    assert sum(x.startswith("errback") for x in lines) == 1
    assert failed_step is not None and failed_step.failed()


def test_failed_chord_member_means_no_body_and_one_errback(setup):
    app, ledger, _ = setup
    c = chord(
        [_sig(app, "add", 1, 1), _sig(app, "boom", 1), _sig(app, "add", 2, 2)], _sig(app, "collect")
    )
    c.link_error(_sig(app, "on_error"))
    result = c()
    with pytest.raises(TaskError) as info:
        result.get(timeout=30)
    assert type(info.value).__name__ == "ChordError"
    assert "testtasks.boom" in str(info.value) and "boom" in str(info.value)
    wait_for(lambda: any(x.startswith("errback") for x in ledger_lines(ledger)), message="errback")
    assert not any(x.startswith("collect") for x in ledger_lines(ledger))


def test_a_chain_in_a_chord_header_failing_early_fails_the_chord(setup):
    """The chain's first step fails for good, so its last step (the member) never runs: the
    chord fails for it at once (ChordError naming it), the body never runs, the errback
    runs once — instead of the chord waiting for that member forever."""
    app, ledger, _ = setup
    c = chord(
        [
            _sig(app, "add", 1, 1),
            chain(_sig(app, "boom", "early"), _sig(app, "add", 5)),
            chain(_sig(app, "add", 2, 2), _sig(app, "add", 3)),
        ],
        _sig(app, "collect"),
    )
    c.link_error(_sig(app, "on_error"))
    result = c()
    with pytest.raises(TaskError) as info:
        result.get(timeout=30)
    assert type(info.value).__name__ == "ChordError"
    assert "testtasks.add" in str(info.value) and "boom" in str(info.value)
    wait_for(lambda: any(x.startswith("errback") for x in ledger_lines(ledger)), message="errback")
    assert sum(x.startswith("errback") for x in ledger_lines(ledger)) == 1
    assert not any(x.startswith("collect") for x in ledger_lines(ledger))


def test_a_chord_member_whose_result_json_cannot_hold_fails_the_chord(setup):
    """A member returns a set: its record is an EncodeError, the chord fails for it (naming
    it), the body never runs, and the worker goes on storing and acking other work."""
    app, ledger, _ = setup
    c = chord([_sig(app, "add", 1, 1), _sig(app, "as_set", 1, 2)], _sig(app, "collect"))
    result = c()
    with pytest.raises(TaskError) as info:
        result.get(timeout=30)
    assert type(info.value).__name__ == "ChordError"
    assert "testtasks.as_set" in str(info.value) and "EncodeError" in str(info.value)
    assert not any(x.startswith("collect") for x in ledger_lines(ledger))
    later = app.send_task("testtasks.add", (2, 3))
    assert later.get(timeout=30) == 5  # not stalled behind the bad member
    assert app.AsyncResult(later.id).state == "SUCCESS"  # and stored


def test_map_starmap_chunks_like_celery(setup):
    """``task.map``/``starmap``/``chunks`` mean what they mean in Celery (and ``delay_many``
    is the bulk publish that ``map`` used to be)."""
    _, _, cfg = setup
    import testtasks

    testtasks.app.close()
    testtasks.app.configure(load_config(cfg, env={}))
    try:
        assert testtasks.tsum.map([[1, 2], [3, 4, 5]]).delay().get(timeout=30) == [3, 12]
        assert testtasks.add.starmap([(2, 2), (4, 4)]).delay().get(timeout=30) == [4, 8]
        pairs = [(i, i) for i in range(10)]
        assert testtasks.add.chunks(pairs, 3)().get(timeout=30) == [
            [0, 2, 4],
            [6, 8, 10],
            [12, 14, 16],
            [18],
        ]
        assert [r.get(timeout=30) for r in testtasks.add.delay_many([(1, 1), (2, 2)])] == [2, 4]
    finally:
        testtasks.app.close()


def test_result_read_by_id_from_a_fresh_process(setup):
    app, _, cfg = setup
    result = _sig(app, "add", 20, 22).delay()
    assert result.get(timeout=30) == 42
    group_result = group(_sig(app, "add", 1, 1), _sig(app, "add", 2, 2))()
    group_result.get(timeout=30)
    app.close()  # the publisher is gone
    code = (
        "import sys; from amqptasks import App, load_config\n"
        f"app = App(load_config({str(cfg)!r}, env={{}}))\n"
        f"r = app.AsyncResult({result.id!r})\n"
        "print(r.state, r.get(timeout=10), r.date_done is not None)\n"
        f"print(app.GroupResult({group_result.id!r}).get(timeout=10))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=cli_env(cfg),
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["SUCCESS 42 True", "[2, 4]"]


def test_rpc_backend_runs_groups_and_chains_but_refuses_chords(tmp_path, broker, worker_factory):
    cfg = write_config(tmp_path, broker, results={"backend": "rpc://"})
    worker_factory(cfg, "-Q", "default")
    app = App(load_config(cfg, env={}))
    try:
        assert group(_sig(app, "add", i, i) for i in range(3))().get(timeout=30) == [0, 2, 4]
        assert chain(_sig(app, "add", 2, 2), _sig(app, "add", 4))().get(timeout=30) == 8
        with pytest.raises(ResultsUnavailable, match="chord"):
            chord([_sig(app, "add", 1, 1)], _sig(app, "tsum"))()
        with pytest.raises(ResultsUnavailable, match="rpc://"):
            app.AsyncResult(str(uuid.uuid4())).get(timeout=1)
    finally:
        app.close()


def test_waiting_on_an_unfinished_chord_does_not_poll_redis(tmp_path, broker, worker_factory):
    """A caller in another process waits on a chord whose member runs for a while: the Redis
    command counts do not grow with the waiting time (subscribe, read once, listen)."""
    import threading

    import redis

    cfg = write_config(tmp_path, broker, results={"backend": "redis://127.0.0.1:6379/1"})
    worker_factory(cfg, "-Q", "default")
    app = App(load_config(cfg, env={}))
    reader = App(load_config(cfg, env={}))  # no reply channel: it can only wait on the store
    client = redis.Redis.from_url("redis://127.0.0.1:6379/1")
    try:
        body = chord([app.signature("testtasks.record", ("slow", 20))])(
            app.signature("testtasks.collect")
        )
        got: list[object] = []
        waiter = threading.Thread(
            target=lambda: got.append(reader.AsyncResult(body.id).get(timeout=60))
        )
        waiter.start()

        def reads() -> int:
            stats = client.info("commandstats")
            return sum(
                int(v["calls"])
                for k, v in stats.items()
                if k.removeprefix("cmdstat_") in ("get", "mget", "exists", "evalsha", "eval")
            )

        time.sleep(3)  # the waiter has subscribed and read once by now
        early = reads()
        time.sleep(12)  # 12 more seconds of waiting, the member still running
        late = reads()
        waiter.join(60)
        assert got == [["slow"]]
        assert late - early == 0, f"the store was read {late - early} times while waiting"
    finally:
        client.close()
        reader.close()
        app.close()


def test_results_expire_from_every_store(tmp_path, broker, worker_factory):
    for kind in ("sqlite", "redis"):
        sub = tmp_path / kind
        sub.mkdir()
        cfg = write_config(sub, broker, results={"backend": _backend(sub, kind), "expires": 1})
        w = worker_factory(cfg, "-Q", "default")
        app = App(load_config(cfg, env={}))
        try:
            r = _sig(app, "add", 1, 2).delay()
            assert r.get(timeout=30) == 3
            assert app.AsyncResult(r.id).state == "SUCCESS"
            wait_for(
                lambda r=r, app=app: app.AsyncResult(r.id).state == "PENDING",
                timeout=10,
                message=f"the {kind} record to expire",
            )
            if kind == "sqlite":
                store = app.store
                assert store is not None
                store.purge_expired()
                assert store.stats().get("results", 0) == 0, store.stats()
            else:  # gone from the server, not only hidden from reads
                import redis

                client = redis.Redis.from_url(_backend(sub, kind))
                try:
                    assert client.keys(f"*{r.id}*") == []
                finally:
                    client.close()
        finally:
            app.close()
            w.stop()


def test_a_replayed_dead_lettered_chain_step_continues_the_chain(setup, tmp_path, broker):
    """Step 2 fails for good (dead-lettered, step 3 abandoned, get() raises); its cause is
    fixed and it is replayed from the DLQ: it runs, and the chain goes on to step 3, whose
    result any process then reads by id."""
    app, _, cfg = setup
    fixed = tmp_path / "fixed"
    c = chain(_sig(app, "add", 1, 1), _sig(app, "when_file", str(fixed)), _sig(app, "add", 10))
    r = c()
    with pytest.raises(TaskError, match="is missing"):
        r.get(timeout=30)
    wait_for(lambda: broker.depth("default.dlq") == 1, message="step 2 dead-lettered")
    fixed.touch()
    replayed = subprocess.run(
        [amqptasks_exe(), "dlq", "replay", "default", "--all", "--task", "testtasks.when_file"],
        cwd=ROOT,
        env=cli_env(cfg),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert replayed.returncode == 0 and "replayed 1 message(s)" in replayed.stdout, replayed
    reader = App(load_config(cfg, env={}))
    try:
        assert reader.AsyncResult(r.id).get(timeout=30) == 12
    finally:
        reader.close()
    assert broker.depth("default.dlq") == 0 and broker.depth("default") == 0


def test_get_reads_the_store_when_the_reply_connection_is_lost(setup, tmp_path, broker):
    """The caller's publisher connection (which carries direct reply-to) is closed by the
    broker while the task runs: its reply can never arrive, and get() reads the stored result
    as soon as it is written instead of waiting out its timeout (or forever)."""
    import urllib.parse

    from broker_fixtures import mgmt

    app, ledger, _ = setup
    gate = tmp_path / "gate"
    r = app.send_task("testtasks.gated", ("held", str(gate)))
    wait_for(lambda: any(x.startswith("start held") for x in ledger_lines(ledger)), message="run")
    vh = urllib.parse.quote(broker.vhost, safe="")

    def ours() -> list[str]:  # the management API lists a new connection a little later
        return [
            c["name"]
            for c in mgmt("GET", f"/vhosts/{vh}/connections")
            if c.get("client_properties", {}).get("connection_name") == "amqptasks publisher"
        ]

    for name in wait_for(ours, interval=0.2, message="the caller's publisher connection"):
        mgmt("DELETE", "/connections/" + urllib.parse.quote(name, safe=""))
    gate.touch()
    started = time.monotonic()
    assert r.get(timeout=120) == "held"
    assert time.monotonic() - started < 60  # the store answered: not the 120 s timeout
