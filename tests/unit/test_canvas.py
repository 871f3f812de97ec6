"""The canvas: signatures and workflows, planned into messages and continued after each task.

``Sim`` runs planned messages in memory with the same pure continuation functions the worker
calls (``after_success``, ``after_failure``, ``abandoned``, ``chord_body``, ``chord_failed``),
so these tests pin the workflow semantics; tests/e2e runs the same workflows on real workers.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import orjson
import pytest

from amqptasks.canvas import (
    Signature,
    abandoned,
    after_failure,
    after_success,
    chain,
    chord,
    chord_body,
    chord_failed,
    freeze,
    group,
    node_from_wire,
    plan,
    result_ids,
    signature,
)
from amqptasks.errors import DecodeError


def s(name: str, *args: Any, **kwargs: Any) -> Signature:
    return Signature(name, args, kwargs)


def si(name: str, *args: Any) -> Signature:
    return Signature(name, args, immutable=True)


def _fail(*_args: Any) -> None:
    raise ValueError("boom")


TASKS = {
    "add": lambda x, y: x + y,
    "mul": lambda x, y: x * y,
    "tsum": lambda xs: sum(xs),
    "ident": lambda *a: list(a),
    "fail": _fail,
    "errback": lambda task_id: task_id,
}


class Sim:
    """An in-memory model of broker + workers: FIFO messages, a result dict, chord accounting."""

    def __init__(self) -> None:
        self.queue: deque[Any] = deque()
        self.results: dict[str, tuple[str, Any]] = {}
        self.groups: dict[str, list[str]] = {}
        self.chords: dict[str, dict[int, Any]] = {}
        self.failed_chords: set[str] = set()
        self.ran: list[tuple[str, tuple[Any, ...]]] = []

    def apply(self, node: Any, *args: Any) -> list[str]:
        freeze(node)
        self.publish(plan(node, args))
        self.run()
        return result_ids(node)

    def publish(self, p: Any) -> None:
        # Every planned message must be JSON on the wire, links included.
        for m in p.messages:
            orjson.dumps({"task": m.task, "args": list(m.args), "kwargs": m.kwargs, **m.links})
        self.queue.extend(p.messages)
        self.groups.update(dict(p.groups))

    def run(self) -> None:
        while self.queue:
            m = self.queue.popleft()
            tid = m.options["task_id"]
            self.ran.append((m.task, m.args))
            try:
                value = TASKS[m.task](*m.args, **m.kwargs)
            except Exception as exc:
                self.results[tid] = ("FAILURE", exc)
                self.publish(after_failure(m.links, tid))
                for lost in abandoned(m.links):
                    self.results[lost] = ("FAILURE", exc)
                membership = m.links.get("chord")
                if membership and membership["id"] not in self.failed_chords:
                    self.failed_chords.add(membership["id"])
                    lost_ids, errbacks = chord_failed(membership)
                    for lost in lost_ids:
                        self.results[lost] = ("FAILURE", f"chord member {tid} failed")
                    self.publish(errbacks)
                continue
            self.results[tid] = ("SUCCESS", value)
            self.publish(after_success(m.links, value))
            membership = m.links.get("chord")
            if membership:
                done = self.chords.setdefault(membership["id"], {})
                done.setdefault(membership["index"], value)
                if len(done) == membership["size"]:
                    self.publish(chord_body(membership, [done[i] for i in sorted(done)]))

    def value(self, task_id: str) -> Any:
        status, value = self.results[task_id]
        assert status == "SUCCESS", value
        return value


def test_seed_group_returns_results_in_order():
    sim = Sim()
    ids = sim.apply(group(s("add", i, i) for i in range(10)))
    assert [sim.value(i) for i in ids] == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]


def test_seed_chain_passes_each_result_on():
    sim = Sim()
    [last] = sim.apply(chain(s("add", 2, 2), s("add", 4), s("add", 8)))
    assert sim.value(last) == 16


def test_seed_nested_chains_flatten():
    sim = Sim()
    [last] = sim.apply(s("add", 4, 16) | s("mul", 2) | (s("add", 4) | s("mul", 8)))
    assert sim.value(last) == 352


def test_chord_body_gets_every_header_result_in_order():
    sim = Sim()
    [body] = sim.apply(chord([s("add", i, i) for i in range(5)], s("ident")))
    assert sim.value(body) == [[0, 2, 4, 6, 8]]


def test_chord_called_with_its_body():
    c = chord([s("add", 1, 1), s("add", 2, 2)])
    full = chord(c.header, s("tsum"))
    sim = Sim()
    [body] = sim.apply(full)
    assert sim.value(body) == 6


def test_group_in_a_chain_becomes_a_chord():
    sim = Sim()
    [last] = sim.apply(chain(s("add", 1, 1), group(s("add", 1), s("add", 2)), s("tsum")))
    assert sim.value(last) == 7  # add(2, 1) + add(2, 2)


def test_chain_ending_in_a_group_gives_the_group_result():
    sim = Sim()
    ids = sim.apply(chain(s("add", 1, 1), group(s("add", 1), s("add", 2))))
    assert [sim.value(i) for i in ids] == [3, 4]


def test_chain_inside_a_group():
    sim = Sim()
    ids = sim.apply(group(chain(s("add", 1, 1), s("add", 1)), s("add", 5, 5)))
    assert [sim.value(i) for i in ids] == [3, 10]


def test_chord_inside_a_chain_continues_after_its_body():
    sim = Sim()
    node = chain(s("add", 1, 1), chord([s("add", 1), s("add", 2)], s("tsum")), s("add", 100))
    [last] = sim.apply(node)
    assert sim.value(last) == 107


def test_chord_inside_a_chord_header():
    sim = Sim()
    inner = chord([s("add", 1, 1), s("add", 2, 2)], s("tsum"))
    [body] = sim.apply(chord([inner, s("add", 3, 3)], s("tsum")))
    assert sim.value(body) == 12


def test_chain_as_a_chord_member():
    sim = Sim()
    [body] = sim.apply(chord([chain(s("add", 1, 1), s("mul", 10)), s("add", 1, 2)], s("ident")))
    assert sim.value(body) == [[20, 3]]


def test_empty_chord_header_runs_the_body_with_no_results():
    sim = Sim()
    [body] = sim.apply(chord([], s("ident")))
    assert sim.value(body) == [[]]


def test_immutable_signature_ignores_the_parent_result():
    sim = Sim()
    [last] = sim.apply(chain(s("add", 1, 1), si("add", 5, 5)))
    assert sim.value(last) == 10


def test_link_callback_gets_the_result():
    sim = Sim()
    first = s("add", 2, 2)
    cb = first.link(s("add", 10))
    sim.apply(first)
    assert sim.value(cb.options["task_id"]) == 14


def test_partial_arguments_from_the_caller_are_prepended():
    sim = Sim()
    ids = sim.apply(group(s("add", 1), s("mul", 3)), 10)
    assert [sim.value(i) for i in ids] == [11, 30]


def test_chain_whose_third_step_fails_stops_and_runs_its_errback_once():
    sim = Sim()
    c = chain(s("add", 1, 1), s("add", 1), s("fail"), s("add", 1))
    eb = c.link_error(s("errback"))
    [last] = sim.apply(c)
    assert [t for t, _ in sim.ran].count("add") == 2  # the 4th step never ran
    assert sim.results[last][0] == "FAILURE"
    failed_id = c.tasks[2].options["task_id"]
    errback_runs = [a for t, a in sim.ran if t == "errback"]
    assert errback_runs == [(failed_id,)]
    assert eb.options["task_id"] in sim.results


def test_failed_chord_member_means_no_body_and_one_errback():
    sim = Sim()
    c = chord([s("add", 1, 1), s("fail"), s("fail"), s("add", 2, 2)], s("tsum"))
    c.link_error(s("errback"))
    [body] = sim.apply(c)
    assert "tsum" not in [t for t, _ in sim.ran]
    assert sim.results[body][0] == "FAILURE"
    assert [a for t, a in sim.ran if t == "errback"] == [(body,)]


def test_replanning_a_continuation_gives_the_same_ids():
    """A worker that crashed after publishing the next step publishes it again on redelivery:
    the ids must be the ones frozen at the start, or the workflow would fork."""
    node = chain(s("add", 1, 1), s("add", 2), s("add", 3))
    freeze(node)
    [first] = plan(node).messages
    again = after_success(first.links, 2).messages
    once_more = after_success(first.links, 2).messages
    assert [m.options["task_id"] for m in again] == [m.options["task_id"] for m in once_more]
    assert again[0].options["task_id"] == node.tasks[1].options["task_id"]


def test_wire_round_trip_keeps_everything():
    node = chain(
        s("add", 1, 1).set(queue="web_tasks", countdown=5),
        group(s("mul", 2), si("add", 1, 1)),
        chord([s("add", 1)], s("tsum")),
    )
    freeze(node)
    wire = node.to_wire()
    back = node_from_wire(orjson.loads(orjson.dumps(wire)))
    assert back.to_wire() == wire


def test_signature_by_name_and_from_wire():
    sig = signature("tasks.add", (2, 3), {"z": 1}, {"queue": "q"})
    assert sig.to_wire() == {
        "task": "tasks.add",
        "args": [2, 3],
        "kwargs": {"z": 1},
        "options": {"queue": "q"},
    }
    assert signature(sig.to_wire()) == sig


@pytest.mark.parametrize(
    ("wire", "problem"),
    [
        ([], "'node': a workflow node must be a JSON object"),
        ({"tsk": "x"}, "not a workflow node"),
        ({"task": ""}, "'node.task' must be a non-empty string"),
        ({"task": "x", "options": {"qeue": "q"}}, "'node.options': unknown option(s) qeue"),
        ({"chain": [{"task": "x"}, 5]}, "'node.chain[1]': a workflow node must be a JSON object"),
        ({"header": [{"task": "x"}]}, "a chord node needs 'body'"),
        (
            {"task": "x", "options": {"chord": {"id": "c", "index": 3, "size": 2, "body": {}}}},
            "node.options.chord.index",
        ),
    ],
)
def test_bad_wire_nodes_name_the_path(wire, problem):
    with pytest.raises(DecodeError) as info:
        node_from_wire(wire)
    assert problem in str(info.value)


def test_unknown_signature_option_is_refused():
    with pytest.raises(TypeError, match="qeue"):
        Signature("x", options={"qeue": "q"})
    with pytest.raises(TypeError, match="qeue"):
        s("x").set(qeue="q")


def test_applying_without_an_app_says_how_to_get_one():
    with pytest.raises(TypeError, match="app="):
        signature("x").delay()


def test_the_parent_result_comes_first_like_celery():
    sim = Sim()
    [last] = sim.apply(chain(s("add", 1, 1), s("ident", "a", "b")))
    assert sim.value(last) == [2, "a", "b"]
