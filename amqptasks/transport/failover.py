"""Several broker addresses (the nodes of one cluster) and which one to try next.

``broker.url`` may list several addresses. Every connection — the publishers, the worker's
consumer, the scheduler's lock, ``topology apply``, ``dlq``, ``events`` — goes to the first
that answers, and after a loss (or a failed attempt) on to the next, wrapping around. The
address that failed is tried last, not first again: a dead node is not asked before each
healthy one, and a node that came back is used again once the others fail. Waits stay what
they were with one address: a publish still gives up after ``broker.publish_timeout``, a
worker still backs off (between *rounds*, a round being one attempt at each address).

This module holds only the order; each transport makes its own connections.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from ..config import redact_urls

__all__ = ["Addresses"]


class Addresses:
    """The broker's addresses in failover order, and the one to try first. Thread-safe."""

    def __init__(self, urls: str | Sequence[str]) -> None:
        self.urls: tuple[str, ...] = (urls,) if isinstance(urls, str) else tuple(urls)
        if not self.urls:
            raise ValueError("at least one broker address is needed")
        self._first = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.urls)

    def __str__(self) -> str:
        return redact_urls(self.urls)

    def __repr__(self) -> str:
        return f"<Addresses {self}>"

    @property
    def preferred(self) -> str:
        """The address to try first now: the last that answered, else the next after the
        last that failed."""
        with self._lock:
            return self.urls[self._first]

    def round(self) -> list[str]:
        """Every address once, the preferred one first, then in list order (wrapping)."""
        with self._lock:
            start = self._first
        n = len(self.urls)
        return [self.urls[(start + i) % n] for i in range(n)]

    def answered(self, url: str) -> None:
        """``url`` is connected: keep preferring it."""
        with self._lock:
            if url in self.urls:
                self._first = self.urls.index(url)

    def failed(self, url: str) -> None:
        """A connection to ``url`` failed or was lost: prefer the next address."""
        with self._lock:
            if url in self.urls and self.urls[self._first] == url:
                self._first = (self._first + 1) % len(self.urls)
