"""Task name -> route: explicit options, exact names, globs in order, the default route."""

from __future__ import annotations

import pytest

from amqptasks.errors import RoutingError
from amqptasks.routing import DEFAULT_EXCHANGE, Route, Router

EXACT = Route("tasks", "task.add")
FIRST_GLOB = Route("tasks", "task.examples")
LATER_GLOB = Route("tasks", "task.web")
QUESTION_GLOB = Route("direct_tasks", "v")
DEFAULT = Route("tasks", "task.default")


@pytest.fixture
def router() -> Router:
    # Declaration order matters for globs; the exact name is listed after a glob that also
    # matches it, to show exact names win regardless of order.
    return Router(
        {
            "examples.*": FIRST_GLOB,
            "examples.tasks.add": EXACT,
            "examples.web.*": LATER_GLOB,  # shadowed by "examples.*", declared first
            "report.v?": QUESTION_GLOB,
        },
        DEFAULT,
    )


def test_explicit_exchange_and_routing_key_win_over_everything(router: Router) -> None:
    route = router.route("examples.tasks.add", exchange="other", routing_key="rk")
    assert route == Route("other", "rk")


def test_explicit_route_needs_no_configuration() -> None:
    assert Router({}).route("anything", exchange="x", routing_key="y") == Route("x", "y")


def test_queue_option_publishes_through_the_default_exchange(router: Router) -> None:
    assert router.route("examples.tasks.add", queue="urgent") == Route(DEFAULT_EXCHANGE, "urgent")
    assert Router({}).route("unrouted", queue="urgent") == Route("", "urgent")


def test_exact_name_beats_globs_declared_before_it(router: Router) -> None:
    assert router.route("examples.tasks.add") == EXACT


def test_globs_match_in_declaration_order(router: Router) -> None:
    assert router.route("examples.web.sendmail") == FIRST_GLOB
    later_first = Router({"examples.web.*": LATER_GLOB, "examples.*": FIRST_GLOB})
    assert later_first.route("examples.web.sendmail") == LATER_GLOB
    assert later_first.route("examples.tasks.sub") == FIRST_GLOB


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ("report.v1", QUESTION_GLOB),
        ("report.v12", DEFAULT),
        ("examples", DEFAULT),  # "examples.*" needs the dot
        ("examples.", FIRST_GLOB),
        ("other.examples.x", DEFAULT),  # globs are anchored at the start
        ("EXAMPLES.x", DEFAULT),  # and case-sensitive
    ],
)
def test_glob_syntax(router: Router, task: str, expected: Route) -> None:
    assert router.route(task) == expected


def test_star_spans_dots(router: Router) -> None:
    # fnmatch semantics, not AMQP topic semantics: '*' matches any characters, dots included.
    assert router.route("examples.a.b.c") == FIRST_GLOB


def test_default_route_when_nothing_matches(router: Router) -> None:
    assert router.route("billing.charge") == DEFAULT


def test_routing_key_alone_keeps_the_routed_exchange(router: Router) -> None:
    assert router.route("examples.tasks.add", routing_key="task.urgent") == Route(
        "tasks", "task.urgent"
    )
    assert router.route("billing.charge", routing_key="task.x") == Route("tasks", "task.x")


def test_exchange_alone_keeps_the_routed_key(router: Router) -> None:
    assert router.route("examples.tasks.add", exchange="audit") == Route("audit", "task.add")


def test_explicit_empty_routing_key_is_honoured(router: Router) -> None:
    assert router.route("examples.tasks.add", routing_key="") == Route("tasks", "")


def test_no_route_is_an_error_naming_the_task() -> None:
    router = Router({"examples.*": FIRST_GLOB})
    with pytest.raises(RoutingError, match=r"no route for task 'billing\.charge'"):
        router.route("billing.charge")


@pytest.mark.parametrize("partial", [{"exchange": "x"}, {"routing_key": "y"}])
def test_partial_override_without_a_route_is_an_error(partial: dict[str, str]) -> None:
    with pytest.raises(RoutingError, match="no route"):
        Router({}).route("billing.charge", **partial)


@pytest.mark.parametrize(
    "extra",
    [{"exchange": "tasks"}, {"routing_key": "task.add"}, {"exchange": "", "routing_key": "q"}],
)
def test_queue_with_exchange_or_routing_key_is_an_error(
    router: Router, extra: dict[str, str]
) -> None:
    with pytest.raises(RoutingError, match="either queue= or exchange=/routing_key="):
        router.route("examples.tasks.add", queue="urgent", **extra)


def test_repeated_lookups_give_the_same_route(router: Router) -> None:
    first = [router.route(name) for name in ("examples.tasks.add", "examples.x", "zzz")]
    again = [router.route(name) for name in ("examples.tasks.add", "examples.x", "zzz")]
    assert first == again == [EXACT, FIRST_GLOB, DEFAULT]


def test_to_queue() -> None:
    assert Route.to_queue("default") == Route("", "default")
