"""Task name -> (exchange, routing key).

Precedence, most specific first: an explicit option on the call, then ``routes`` by exact task
name, then ``routes`` globs in the order the config lists them, then ``default_route``. Globs are
compiled once into a single regex per pattern. No route at all is a :class:`RoutingError`, never
a silent publish to nowhere.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import RoutingError

__all__ = ["DEFAULT_EXCHANGE", "Route", "Router"]

#: AMQP's default exchange: routing key = queue name reaches that queue directly.
DEFAULT_EXCHANGE = ""
# Task names are few in practice; the bound only guards against a producer inventing names.
_CACHE_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class Route:
    """Where a message is published: an exchange and a routing key."""

    exchange: str
    routing_key: str

    @classmethod
    def to_queue(cls, queue: str) -> Route:
        """Publish straight into ``queue`` through the default exchange."""
        return cls(DEFAULT_EXCHANGE, queue)


def is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


class Router:
    """Chooses a :class:`Route` for a task name; pure and cheap to call on every publish."""

    def __init__(self, routes: Mapping[str, Route], default: Route | None = None) -> None:
        self._exact = {name: route for name, route in routes.items() if not is_glob(name)}
        self._globs = [
            (re.compile(fnmatch.translate(name)), route)
            for name, route in routes.items()
            if is_glob(name)
        ]
        self.default = default
        self._cache: dict[str, Route] = {}

    def route(
        self,
        task: str,
        *,
        exchange: str | None = None,
        routing_key: str | None = None,
        queue: str | None = None,
    ) -> Route:
        """The route for ``task``; explicit ``exchange``/``routing_key``/``queue`` win.

        ``queue=`` alone publishes through the default exchange to that queue. ``routing_key=``
        alone keeps the routed exchange and replaces its key; ``exchange=`` alone keeps the key.
        """
        if queue is not None:
            if exchange is not None or routing_key is not None:
                raise RoutingError("give either queue= or exchange=/routing_key=, not both")
            return Route.to_queue(queue)
        if exchange is not None and routing_key is not None:
            return Route(exchange, routing_key)
        base = self._configured(task)
        if base is None:
            raise RoutingError(
                f"no route for task {task!r}: add it to 'routes', set 'default_route', "
                f"or pass exchange= and routing_key="
            )
        if exchange is None and routing_key is None:
            return base
        return Route(
            base.exchange if exchange is None else exchange,
            base.routing_key if routing_key is None else routing_key,
        )

    def _configured(self, task: str) -> Route | None:
        cached = self._cache.get(task)
        if cached is not None:
            return cached
        route = self._exact.get(task)
        if route is None:
            route = next((r for rx, r in self._globs if rx.match(task)), self.default)
        if route is not None and len(self._cache) < _CACHE_LIMIT:
            self._cache[task] = route
        return route
