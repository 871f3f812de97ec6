"""Signatures and workflows (chain, group, chord) as pure values, and how they become messages.

A workflow is a tree of *nodes*: a :class:`Signature` (one task call), a :class:`chain`, a
:class:`group` or a :class:`chord`. Nothing here does I/O. Applying a node is two steps:

1. :func:`freeze` gives every task, group and chord of the tree its id up front, so a worker
   that republishes the next step after a crash publishes it under the *same* id (a redelivered
   message never forks a workflow), and a caller can hold result handles before anything ran;
2. :func:`plan` turns a node into the messages to publish *now* — the first task(s) — each
   carrying the rest of the workflow as *links* in documented body fields (docs/protocol.md,
   section "Workflows"): ``chain`` (what runs after this task, in order), ``callbacks`` /
   ``errbacks`` (``link`` / ``link_error``), ``chord`` (this task is member ``index`` of
   ``size`` of chord ``id``, whose ``body`` runs once all members finished) and ``group_id``.

The caller (``App``) and the worker (continuing a workflow after a task finished) share
:func:`plan`, so a chain continues exactly the same way whoever applies its next node. A
client in another language only needs the wire form of nodes (:meth:`Signature.to_wire`).

Celery's meanings are kept where our users know them: a partial signature gets the parent's
result *prepended* to its arguments (``add.s(4)`` after a task returning 4 runs ``add(4, 4)``);
``si()`` is immutable; a group followed by another task in a chain becomes a chord; calling a
chain, group or chord applies it, while calling a :class:`Signature` runs the task in-process.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .protocol import SIGNATURE_OPTIONS, check_membership, check_node, new_id

if TYPE_CHECKING:
    from .results import AsyncResult, GroupResult  # noqa: F401 - used in quoted bases

__all__ = [
    "BUILTIN_TASKS",
    "MAP_TASK",
    "STARMAP_TASK",
    "Node",
    "Plan",
    "Planned",
    "Signature",
    "chain",
    "chord",
    "freeze",
    "group",
    "node_from_wire",
    "plan",
    "result_ids",
    "signature",
]

#: Built-in tasks every worker registers: run a task in-process over a list of arguments.
MAP_TASK = "amqptasks.map"
STARMAP_TASK = "amqptasks.starmap"
BUILTIN_TASKS = frozenset({MAP_TASK, STARMAP_TASK})

_LINK_OPTIONS = ("link", "link_error", "chord", "group_id")


R = TypeVar("R")


class _Applicable(Generic[R]):
    """``delay()``/``apply_async()`` (and calling, for chains and groups) of a node: its app's
    ``apply_workflow``, which returns the node's result handle."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        return self.apply_async(args, kwargs)

    def delay(self, *args: Any, **kwargs: Any) -> R:
        return self.apply_async(args, kwargs)

    def apply_async(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> R:
        node: Any = self
        result: R = _app_of(node).apply_workflow(node, args, kwargs, **options)
        return result


class Signature(_Applicable["AsyncResult"]):
    """One task call, not yet made: task name, arguments, options, immutability.

    ``app`` (anything with ``apply_workflow``, i.e. an :class:`~amqptasks.App`) is needed only
    to apply it; a signature built by ``task.s()`` knows its app, ``signature("name", ...)`` is
    given one or gets it from the workflow it joins.
    """

    __slots__ = ("app", "args", "immutable", "kwargs", "options", "task")

    def __init__(
        self,
        task: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        immutable: bool = False,
        app: Any = None,
    ) -> None:
        if not isinstance(task, str) or not task:
            raise TypeError(f"a signature needs a task name, got {task!r}")
        unknown = set(options or {}) - SIGNATURE_OPTIONS
        if unknown:
            raise TypeError(f"unknown signature option(s): {', '.join(sorted(unknown))}")
        self.task = task
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.options: dict[str, Any] = dict(options or {})
        self.immutable = immutable
        self.app = app

    # -- building -------------------------------------------------------------------------------
    def clone(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> Signature:
        """A copy with ``args`` prepended (unless immutable), ``kwargs`` and ``options`` merged."""
        # Lists are copied (link() appends in place); the nodes in them are shared, never
        # mutated by planning.
        merged = {k: list(v) if isinstance(v, list) else v for k, v in self.options.items()}
        merged.update(options)
        return Signature(
            self.task,
            self.args if self.immutable else (*args, *self.args),
            self.kwargs if self.immutable else {**self.kwargs, **(kwargs or {})},
            merged,
            immutable=self.immutable,
            app=self.app,
        )

    def set(self, **options: Any) -> Signature:
        """Set publish options (``queue=``, ``countdown=``, ...) in place; returns self."""
        unknown = set(options) - SIGNATURE_OPTIONS
        if unknown:
            raise TypeError(f"unknown signature option(s): {', '.join(sorted(unknown))}")
        self.options.update(options)
        return self

    def set_immutable(self, immutable: bool) -> Signature:
        self.immutable = immutable
        return self

    def link(self, callback: Node) -> Node:
        """Run ``callback`` with this task's result after it succeeded."""
        self.options.setdefault("link", []).append(callback)
        return callback

    def link_error(self, errback: Node) -> Node:
        """Run ``errback`` with this task's id after it failed for good."""
        self.options.setdefault("link_error", []).append(errback)
        return errback

    def __or__(self, other: Node) -> chain:
        return chain(self, other)

    @property
    def id(self) -> str | None:
        return self.options.get("task_id")

    # -- running ----------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task in this process (no broker), like calling the task itself."""
        app = _app_of(self)
        task = app.get_task(self.task)
        merged = self.clone(args, kwargs)
        return task(*merged.args, **merged.kwargs)

    # -- wire form --------------------------------------------------------------------------------
    def to_wire(self) -> dict[str, Any]:
        """The JSON-safe node of docs/protocol.md ("Workflows")."""
        out: dict[str, Any] = {"task": self.task}
        if self.args:
            out["args"] = list(self.args)
        if self.kwargs:
            out["kwargs"] = dict(self.kwargs)
        options = {}
        for key, value in self.options.items():
            if key in ("link", "link_error"):
                value = [to_wire(n) for n in value]
            elif key == "chord":
                value = {**value, "body": to_wire(value["body"])}
            elif (key == "eta" and hasattr(value, "isoformat")) or (
                key == "expires" and hasattr(value, "isoformat")
            ):
                value = value.isoformat()
            options[key] = value
        if options:
            out["options"] = options
        if self.immutable:
            out["immutable"] = True
        return out

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.task}{'.si' if self.immutable else '.s'}({', '.join(parts)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Signature) and self.to_wire() == other.to_wire()

    __hash__ = None  # type: ignore[assignment]  # mutable (options), like a dict


class chain(_Applicable["AsyncResult"]):
    """Tasks run one after another, each getting the previous result prepended."""

    __slots__ = ("app", "tasks")

    def __init__(self, *tasks: Node | Iterable[Node], app: Any = None) -> None:
        flat: list[Node] = []
        items: Any = tasks[0] if len(tasks) == 1 and _iterable(tasks[0]) else tasks
        for t in items:
            if isinstance(t, chain):
                flat.extend(t.tasks)  # chain(a, chain(b, c)) is chain(a, b, c)
            else:
                flat.append(_node(t))
        self.tasks: tuple[Node, ...] = tuple(flat)
        self.app = app

    def __or__(self, other: Node) -> chain:
        return chain(*self.tasks, other, app=self.app)

    def link_error(self, errback: Node) -> Node:
        """Run ``errback`` when any task of the chain fails for good (once: the chain stops)."""
        for t in self.tasks:
            _link_error(t, errback)
        return errback

    def to_wire(self) -> dict[str, Any]:
        return {"chain": [to_wire(t) for t in self.tasks]}

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.tasks))


class group(_Applicable["GroupResult"]):
    """Tasks run in parallel; the result is the list of their results, in order."""

    __slots__ = ("app", "id", "tasks")

    def __init__(self, *tasks: Node | Iterable[Node], app: Any = None) -> None:
        items: Any = tasks[0] if len(tasks) == 1 and _iterable(tasks[0]) else tasks
        self.tasks: tuple[Node, ...] = tuple(_node(t) for t in items)
        self.id: str | None = None
        self.app = app

    def __or__(self, other: Node) -> chain:
        return chain(self, other)

    def link_error(self, errback: Node) -> Node:
        for t in self.tasks:
            _link_error(t, errback)
        return errback

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"group": [to_wire(t) for t in self.tasks]}
        if self.id:
            out["id"] = self.id
        return out

    def __repr__(self) -> str:
        return f"group([{', '.join(map(repr, self.tasks))}])"


class chord:
    """A group (the header) whose results, in order, are given to one task (the body).

    ``chord(header)(body)`` and ``chord(header, body)()`` both apply it. The body runs once,
    after every member finished: the member that completes the chord publishes it (confirmed)
    before acking its own message, under an id fixed up front. A failed member means the body
    never runs; the chord's result raises an error naming the member.
    """

    __slots__ = ("app", "body", "header", "id")

    def __init__(
        self, header: Iterable[Node] | group, body: Node | None = None, *, app: Any = None
    ) -> None:
        tasks = header.tasks if isinstance(header, group) else tuple(header)
        self.header = group(*tasks)
        self.body: Node | None = _node(body) if body is not None else None
        self.id: str | None = None
        self.app = app

    def __call__(self, body: Node | None = None, **options: Any) -> AsyncResult:
        if body is not None:
            return chord(self.header, body, app=self.app).apply_async(**options)
        return self.apply_async(**options)

    def __or__(self, other: Node) -> chain:
        return chain(self, other)

    def apply_async(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> AsyncResult:
        if self.body is None:
            raise TypeError("a chord needs a body: chord(header)(body) or chord(header, body)")
        result: AsyncResult = _app_of(self).apply_workflow(self, args, kwargs, **options)
        return result

    def link_error(self, errback: Node) -> Node:
        """Run ``errback`` (with the chord's result id) when a member fails."""
        if self.body is None:
            raise TypeError("link_error on a chord needs its body first")
        _link_error(self.body, errback)
        return errback

    def to_wire(self) -> dict[str, Any]:
        if self.body is None:
            raise TypeError("a chord needs a body before it can travel")
        out: dict[str, Any] = {
            "header": [to_wire(t) for t in self.header.tasks],
            "body": to_wire(self.body),
        }
        if self.id:
            out["id"] = self.id
        return out

    def __repr__(self) -> str:
        return f"chord({self.header!r}, {self.body!r})"


Node = Signature | chain | group | chord


def signature(
    task: str | Mapping[str, Any],
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    *,
    immutable: bool = False,
    app: Any = None,
) -> Signature:
    """A signature by task name (for tasks the caller cannot import), or from its wire form."""
    if isinstance(task, Mapping):
        node = node_from_wire(task)
        if not isinstance(node, Signature):
            raise TypeError("signature() of a wire node needs a task node")
        node.app = app
        return node
    return Signature(task, args, kwargs, options, immutable=immutable, app=app)


# -- wire form ---------------------------------------------------------------------------------
def to_wire(node: Node | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(node, Mapping):
        return dict(node)
    return node.to_wire()


def node_from_wire(obj: Any, where: str = "node") -> Node:
    """Rebuild a node from its wire form; raises :class:`DecodeError` naming the path."""
    check_node(obj, where)
    return _build(obj)


def membership_from_wire(obj: Any, where: str) -> dict[str, Any]:
    """A chord membership ``{"id", "index", "size", "body"}`` with its body as a node."""
    check_membership(obj, where)
    return {**obj, "body": _build(obj["body"])}


def _build(obj: Mapping[str, Any]) -> Node:
    """A node from a wire form already checked by :func:`protocol.check_node`."""
    if "task" in obj:
        options = dict(obj.get("options") or {})
        for key in ("link", "link_error"):
            if key in options:
                options[key] = [_build(n) for n in options[key]]
        if "chord" in options:
            options["chord"] = {**options["chord"], "body": _build(options["chord"]["body"])}
        return Signature(
            obj["task"],
            obj.get("args", ()),
            obj.get("kwargs"),
            options,
            immutable=bool(obj.get("immutable")),
        )
    if "chain" in obj:
        return chain(*[_build(n) for n in obj["chain"]])
    if "group" in obj:
        g = group(*[_build(n) for n in obj["group"]])
        g.id = obj.get("id")
        return g
    c = chord([_build(n) for n in obj["header"]], _build(obj["body"]))
    c.id = obj.get("id")
    return c


# -- ids -----------------------------------------------------------------------------------------
def freeze(node: Node) -> Node:
    """Give every task, group and chord in ``node`` an id (in place; ids already set are kept).

    Groups followed by more tasks in a chain are upgraded to chords first, so the ids frozen
    here are the ids that run.
    """
    if isinstance(node, Signature):
        node.options.setdefault("task_id", new_id())
        for key in ("link", "link_error"):
            for n in node.options.get(key, ()):
                freeze(n)
    elif isinstance(node, chain):
        node.tasks = _upgrade(node.tasks)
        for t in node.tasks:
            freeze(t)
    elif isinstance(node, group):
        node.id = node.id or new_id()
        for t in node.tasks:
            freeze(t)
    else:
        node.id = node.id or new_id()
        node.header.tasks = tuple(_flatten_header(node.header.tasks))
        for t in node.header.tasks:
            freeze(t)
        if node.body is None:
            raise TypeError("a chord needs a body")
        freeze(node.body)
    return node


def _upgrade(tasks: Sequence[Node]) -> tuple[Node, ...]:
    """chain(..., group, X, ...) -> chain(..., chord(group, X), ...): a group that is not the
    last step hands its results, in order, to the next one."""
    out: list[Node] = []
    items = list(tasks)
    i = 0
    while i < len(items):
        t = items[i]
        if isinstance(t, group) and i + 1 < len(items):
            c = chord(t, items[i + 1])
            c.id = t.id
            out.append(c)
            i += 2
        else:
            out.append(t)
            i += 1
    return tuple(out)


def _flatten_header(tasks: Sequence[Node]) -> Iterator[Node]:
    """A group inside a chord header contributes its members to the header."""
    for t in tasks:
        if isinstance(t, group):
            yield from _flatten_header(t.tasks)
        else:
            yield t


def result_ids(node: Node) -> list[str]:
    """The ids whose results make ``node``'s result (one, or a group's members in order).
    ``node`` must be frozen."""
    if isinstance(node, Signature):
        return [node.options["task_id"]]
    if isinstance(node, chain):
        return result_ids(node.tasks[-1]) if node.tasks else []
    if isinstance(node, group):
        return [i for t in node.tasks for i in _final_id(t)]
    assert node.body is not None
    return result_ids(node.body)


def _final_id(node: Node) -> list[str]:
    ids = result_ids(node)
    if isinstance(node, group):  # a group member that is a group: its result is a list
        return ids
    return ids[-1:]


# -- planning ------------------------------------------------------------------------------------
@dataclass(slots=True)
class Planned:
    """One message to publish now: the call, its publish options, its workflow links."""

    task: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    options: dict[str, Any]
    #: Body fields: callbacks, errbacks, chain, chord, group_id (only those that apply).
    links: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Plan:
    """What applying a node means now: messages to publish and groups to register."""

    messages: list[Planned] = field(default_factory=list)
    #: (group id, result ids of its members in order), for GroupResult restore by id.
    groups: list[tuple[str, list[str]]] = field(default_factory=list)

    @property
    def has_chord(self) -> bool:
        return any("chord" in m.links for m in self.messages)


def plan(
    node: Node,
    prepend: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    continuation: Sequence[Node] = (),
    membership: Mapping[str, Any] | None = None,
) -> Plan:
    """The messages that apply frozen ``node`` now, with ``prepend`` before each first task's
    arguments (a parent's result, or the caller's partial arguments), ``continuation`` to run
    after it, and ``membership`` in a chord for its last task."""
    out = Plan()
    _plan(node, tuple(prepend), dict(kwargs or {}), tuple(continuation), membership, out)
    return out


def _plan(
    node: Node,
    prepend: tuple[Any, ...],
    kwargs: dict[str, Any],
    continuation: tuple[Node, ...],
    membership: Mapping[str, Any] | None,
    out: Plan,
) -> None:
    if isinstance(node, Signature):
        call = node.clone(prepend, kwargs)
        links: dict[str, Any] = {}
        options = {k: v for k, v in call.options.items() if k not in _LINK_OPTIONS}
        if call.options.get("link"):
            links["callbacks"] = [to_wire(n) for n in call.options["link"]]
        if call.options.get("link_error"):
            links["errbacks"] = [to_wire(n) for n in call.options["link_error"]]
        if call.options.get("group_id"):
            links["group_id"] = call.options["group_id"]
        chord_of = membership or call.options.get("chord")
        if continuation:
            rest = list(continuation)
            if chord_of is not None:  # the membership belongs to the chain's last task
                rest[-1] = _with_membership(rest[-1], chord_of)
                chord_of = None
            links["chain"] = [to_wire(n) for n in rest]
        if chord_of is not None:
            links["chord"] = {**chord_of, "body": to_wire(chord_of["body"])}
        out.messages.append(Planned(call.task, call.args, call.kwargs, options, links))
    elif isinstance(node, chain):
        tasks = _upgrade(node.tasks)
        if not tasks:
            return
        _plan(tasks[0], prepend, kwargs, (*tasks[1:], *continuation), membership, out)
    elif isinstance(node, group):
        if continuation:  # a group followed by more: its results go on as a chord
            c = chord(node, continuation[0])
            c.id = node.id
            _plan(c, prepend, kwargs, continuation[1:], membership, out)
            return
        if membership is not None:
            raise ValueError("a group cannot be a chord member as such (its members are)")
        assert node.id is not None, "freeze() the node first"
        out.groups.append((node.id, result_ids(node)))
        for t in node.tasks:
            _plan(_in_group(t, node.id), prepend, kwargs, (), None, out)
    else:
        assert node.id is not None and node.body is not None, "freeze() the node first"
        body: Node = node.body
        if continuation:
            body = chain(body, *continuation)
        if membership is not None:
            body = _with_membership(body, membership)
        members = list(_flatten_header(node.header.tasks))
        if not members:  # nothing to wait for: the body runs now with no results
            _plan(body, ([],), {}, (), None, out)
            return
        for index, member in enumerate(members):
            member_of = {"id": node.id, "index": index, "size": len(members), "body": body}
            _plan(member, prepend, kwargs, (), member_of, out)


def _with_membership(node: Node, membership: Mapping[str, Any]) -> Node:
    """``node`` with ``membership`` on the task whose completion completes it."""
    if isinstance(node, Signature):
        return node.clone(chord=dict(membership))
    if isinstance(node, chain):
        tasks = _upgrade(node.tasks)
        return chain(*tasks[:-1], _with_membership(tasks[-1], membership))
    if isinstance(node, chord):
        assert node.body is not None
        c = chord(node.header, _with_membership(node.body, membership))
        c.id = node.id
        return c
    raise ValueError("a group cannot complete a chord member (use a chord inside the header)")


def _in_group(node: Node, group_id: str) -> Node:
    """Mark the task whose result is ``node``'s result as a member of group ``group_id`` (the
    mark travels for events and results; membership itself is registered with the group)."""
    if isinstance(node, Signature):
        return node.clone(group_id=group_id)
    if isinstance(node, chain) and node.tasks:
        tasks = _upgrade(node.tasks)
        return chain(*tasks[:-1], _in_group(tasks[-1], group_id))
    return node


def _link_error(node: Node, errback: Node) -> None:
    if isinstance(node, Signature):
        node.link_error(errback)
    elif isinstance(node, (chain, group)):
        for t in node.tasks:
            _link_error(t, errback)
    elif node.body is not None:
        _link_error(node.body, errback)


def _node(value: Any) -> Node:
    if isinstance(value, (Signature, chain, group, chord)):
        return value
    if isinstance(value, Mapping):
        return node_from_wire(value)
    raise TypeError(f"not a signature or workflow: {value!r}")


def _iterable(value: Any) -> bool:
    return not isinstance(value, (Signature, chain, group, chord, Mapping, str)) and hasattr(
        value, "__iter__"
    )


def _find_app(node: Node) -> Any:
    app = getattr(node, "app", None)
    if app is not None:
        return app
    for child in _children(node):
        found = _find_app(child)
        if found is not None:
            return found
    return None


def _app_of(node: Node) -> Any:
    """The app that applies ``node``: its own, or the first one found inside it."""
    app = _find_app(node)
    if app is not None:
        return app
    raise TypeError(
        f"{node!r} has no app to publish with: build it with task.s(), or pass app= to "
        "signature()/chain()/group()/chord()"
    )


def _children(node: Node) -> Iterator[Node]:
    if isinstance(node, (chain, group)):
        yield from node.tasks
    elif isinstance(node, chord):
        yield from node.header.tasks
        if node.body is not None:
            yield node.body


# -- continuing a workflow (what a worker does after a task; pure, shared with tests) ------------
def _merge(into: Plan, other: Plan) -> None:
    into.messages.extend(other.messages)
    into.groups.extend(other.groups)


def after_success(links: Mapping[str, Any], result: Any) -> Plan:
    """What to publish once a task carrying ``links`` succeeded with ``result``: the next step
    of its chain (with the rest of the chain) and its callbacks. Chord accounting is separate
    (:func:`chord_body`), because it needs the shared store."""
    out = Plan()
    rest = [node_from_wire(n, f"chain[{i}]") for i, n in enumerate(links.get("chain") or ())]
    if rest:
        _merge(out, plan(rest[0], (result,), continuation=rest[1:]))
    for i, cb in enumerate(links.get("callbacks") or ()):
        _merge(out, plan(node_from_wire(cb, f"callbacks[{i}]"), (result,)))
    return out


def after_failure(links: Mapping[str, Any], task_id: str) -> Plan:
    """What to publish once a task carrying ``links`` failed for good: its errbacks, each with
    the failed task's id prepended (Celery's classic errback call)."""
    out = Plan()
    for i, eb in enumerate(links.get("errbacks") or ()):
        _merge(out, plan(node_from_wire(eb, f"errbacks[{i}]"), (task_id,)))
    return out


def abandoned(links: Mapping[str, Any]) -> list[str]:
    """Ids of the results that will never come because a task carrying ``links`` failed: every
    task of the rest of its chain (so waiting on the chain's result raises at once)."""
    ids: list[str] = []
    for i, n in enumerate(links.get("chain") or ()):
        ids.extend(_all_ids(node_from_wire(n, f"chain[{i}]")))
    return ids


def abandoned_members(links: Mapping[str, Any]) -> list[tuple[Signature, Mapping[str, Any]]]:
    """The abandoned tasks (see :func:`abandoned`) that would have completed a chord member,
    each with its membership: a chain in a chord's header whose earlier step failed for good.
    That member has failed, so its chord must fail too (else it waits for it forever)."""
    out: list[tuple[Signature, Mapping[str, Any]]] = []
    for i, n in enumerate(links.get("chain") or ()):
        for sig in _signatures(node_from_wire(n, f"chain[{i}]")):
            membership = sig.options.get("chord")
            if membership is not None and "task_id" in sig.options:
                out.append((sig, membership))
    return out


def chord_body(membership: Mapping[str, Any], results: list[Any]) -> Plan:
    """The chord's body applied to its members' results (one list argument, in order)."""
    body = membership["body"]
    node = body if not isinstance(body, Mapping) else node_from_wire(body, "chord.body")
    return plan(node, (results,))


def chord_failed(membership: Mapping[str, Any]) -> tuple[list[str], Plan]:
    """A chord member failed for good: the body never runs. Returns the ids of the results that
    will never come (the body's tasks) and the body's errbacks, each run once with the chord's
    result id."""
    body = membership["body"]
    node = body if not isinstance(body, Mapping) else node_from_wire(body, "chord.body")
    ids = _all_ids(node)
    final = result_ids(node)
    out = Plan()
    seen: set[str] = set()
    for sig in _signatures(node):
        for eb in sig.options.get("link_error", ()):
            key = eb.options.get("task_id") if isinstance(eb, Signature) else None
            if key is not None and key in seen:
                continue
            if key is not None:
                seen.add(key)
            _merge(out, plan(eb, (final[-1] if final else membership["id"],)))
    return ids, out


def _signatures(node: Node) -> Iterator[Signature]:
    if isinstance(node, Signature):
        yield node
    else:
        for child in _children(node):
            yield from _signatures(child)


def _all_ids(node: Node) -> list[str]:
    return [s.options["task_id"] for s in _signatures(node) if "task_id" in s.options]


def upgraded(node: chain) -> tuple[Node, ...]:
    """A chain's steps as they run (a group followed by more becomes a chord)."""
    return _upgrade(node.tasks)


def needs_store(node: Node) -> bool:
    """Whether applying ``node`` needs a result store: it contains a chord (also one made from a
    group followed by more steps), whose accounting lives in the store."""
    if isinstance(node, chord):
        return True
    if isinstance(node, chain):
        return any(needs_store(t) for t in _upgrade(node.tasks))
    if isinstance(node, group):
        return any(needs_store(t) for t in node.tasks)
    return (
        any(needs_store(n) for key in ("link", "link_error") for n in node.options.get(key, ()))
        or "chord" in node.options
    )
