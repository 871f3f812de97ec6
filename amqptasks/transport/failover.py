"""Several broker addresses (the nodes of one cluster) and which one to try next.

``broker.url`` may list several addresses. Every connection — the publishers, the worker's
consumer, the scheduler's lock, ``topology apply``, ``dlq``, ``events`` — goes to the first
that answers, and after a loss (or a failed attempt) on to the next, wrapping around. The
address that failed is tried last, not first again: a dead node is not asked before each
healthy one, and a node that came back is used again once the others fail. Waits stay what
they were with one address: a publish still gives up after ``broker.publish_timeout``, a
worker still backs off (between *rounds*, a round being one attempt at each address).

This module holds the order, and (:class:`Attempts`) the publishers' rules for trying the
addresses in turn before a deadline; each transport makes its own connections.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from ..config import redact_url, redact_urls
from ..errors import BrokerError, BrokerRefused, PublishTimeout

__all__ = ["Addresses", "Attempts"]

log = logging.getLogger("amqptasks.publisher")


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


class Attempts:
    """One publish's way to an open channel, as decisions without I/O: how long to wait for
    this attempt's link, and after it the next address, a backoff pause, or an error. The
    sync publisher (which blocks or drives its link) and the worker's asyncio one (which
    awaits it) follow the same rules through it:

    * each attempt goes to the preferred address; a failed or lost one hands over to the
      next (:class:`Addresses`);
    * with several addresses an attempt that hangs (a node that does not answer at all) gets
      its share of the remaining time, so the others are still tried before the deadline;
    * the backoff pause comes after a whole round of addresses failed, never between two;
    * a refusal (login, vhost) is raised again at once: asking again gets the same answer.
    """

    def __init__(self, addresses: Addresses, deadline: float) -> None:
        self.addresses = addresses
        self.deadline = deadline
        self.tried = 0
        self._delay = 0.1
        self._many = len(addresses) > 1
        #: The address whose attempt closed last, and why (named if the deadline then cuts
        #: the next attempt at that same address short).
        self._failure: tuple[str, BaseException | None] | None = None

    def share(self) -> float:
        """Seconds to wait for this attempt's link to open."""
        remaining = max(0.0, self.deadline - time.monotonic())
        if not self._many:
            return remaining
        left_in_round = len(self.addresses) - self.tried % len(self.addresses)
        return max(remaining / left_in_round, min(remaining, 1.0))

    def hung(self, url: str, waited: float, last_error: BaseException | None = None) -> None:
        """The link to ``url`` did not open within its share: the next address is tried
        (the caller closes the link), or an error when there is none or no time is left:
        :class:`BrokerError` naming why the last attempt failed when one did (a refused
        connection retried until the deadline), else :class:`PublishTimeout` (no broker
        answered at all)."""
        if not self._many or time.monotonic() >= self.deadline:
            if self._failure is not None and self._failure[0] == url:
                raise BrokerError(
                    f"broker {self.addresses} unreachable; nothing was published "
                    f"(last error: {self._failure[1]})"
                )
            last = f" (last error: {last_error})" if last_error else ""
            raise PublishTimeout(
                f"could not open a channel to {self.addresses} within the publish timeout; "
                f"nothing was published{last}"
            )
        log.warning(
            "broker %s did not answer within %.1fs; trying the next address",
            redact_url(url),
            waited,
        )
        self.addresses.failed(url)
        self.tried += 1

    def opened(self, url: str) -> None:
        """The link to ``url`` is open: keep preferring it."""
        if self.tried:
            log.warning("publishing through broker %s", redact_url(url))
        self.addresses.answered(url)

    def closed(self, url: str, error: BaseException | None) -> float:
        """The link to ``url`` closed before it opened (``error`` says why): seconds to pause before
        the next attempt (0: the next address at once; the caller's next link replaces the
        closed one and marks its address failed), or the error to give up with."""
        if isinstance(error, BrokerRefused):
            raise BrokerRefused(str(error), error.reason)
        self._failure = (url, error)
        self.tried += 1
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise BrokerError(
                f"broker {self.addresses} unreachable; nothing was published (last error: {error})"
            )
        if self._many and self.tried % len(self.addresses):
            return 0.0
        pause = min(self._delay, remaining)
        self._delay = min(self._delay * 2, 1.0)
        return pause
