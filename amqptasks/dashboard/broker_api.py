"""The broker's management HTTP API, read for the queues and overview pages (depth, ready,
unacked, consumers, publish and deliver rates) with aiohttp's client.

The URL defaults to ``http://<broker host>:15672`` with the broker URL's user and password
(``dashboard.management_url`` overrides it); with several broker addresses (a cluster), one
such URL per broker host, the next used when one stops answering. The password travels only in the
``Authorization`` header: it is never part of a URL that an error message could show.
"""

from __future__ import annotations

import base64
import time
from collections import deque
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import aiohttp

from ..config import redact_url

__all__ = ["BrokerApi", "BrokerApiError", "management_target"]


def _basic(user: str, password: str) -> str:
    """An HTTP Basic ``Authorization`` value (aiohttp's ``BasicAuth`` is deprecated)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


class BrokerApiError(Exception):
    """The management API could not be read (its message names the URL, password hidden)."""


def management_target(broker_url: str, management_url: str | None) -> tuple[str, str, str, str]:
    """``(base URL without credentials, user, password, vhost)``."""
    b = urlsplit(broker_url)
    vhost = unquote(b.path[1:]) if len(b.path) > 1 else "/"
    user, password = unquote(b.username or "guest"), unquote(b.password or "guest")
    if management_url:
        m = urlsplit(management_url)
        if m.username:
            user, password = unquote(m.username), unquote(m.password or "")
        port = f":{m.port}" if m.port else ""
        base = f"{m.scheme}://{m.hostname}{port}{m.path.rstrip('/')}"
    elif b.scheme == "amqps":
        # A broker reached over TLS gets its credentials sent over TLS too: the management
        # plugin's TLS listener (15671 by convention), never plain HTTP with the password.
        base = f"https://{b.hostname or 'localhost'}:15671"
    else:
        base = f"http://{b.hostname or 'localhost'}:15672"
    return base, user, password, vhost


class BrokerApi:
    """A small client: the vhost's queues, the overview, and a depth history sampled by the
    dashboard (kept in memory: one hour at one sample per 5 s)."""

    def __init__(self, broker_url: str | Sequence[str], management_url: str | None = None) -> None:
        urls = [broker_url] if isinstance(broker_url, str) else list(broker_url)
        # One management API per broker host (a cluster's nodes each serve the whole cluster's
        # view): the first that answers is used, the next one after it stops answering. An
        # explicit management_url is the only one.
        targets: list[tuple[str, str, str, str]] = []
        for url in urls if not management_url else urls[:1]:
            target = management_target(url, management_url)
            if target[0] not in [t[0] for t in targets]:
                targets.append(target)
        self._targets = targets
        self._current = 0
        self.base, _, _, self.vhost = targets[0]
        self.shown = redact_url(management_url) if management_url else self.base
        self._session: aiohttp.ClientSession | None = None
        self.samples: deque[tuple[float, dict[str, int]]] = deque(maxlen=720)

    def _use(self, index: int) -> None:
        self._current = index
        self.base, _, _, self.vhost = self._targets[index]
        if len(self._targets) > 1:
            self.shown = self.base

    async def _get(self, path: str) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        tried: list[str] = []
        for step in range(len(self._targets)):
            index = (self._current + step) % len(self._targets)
            base, user, password, _ = self._targets[index]
            try:
                async with self._session.get(
                    base + "/api" + path, headers={"Authorization": _basic(user, password)}
                ) as resp:
                    if resp.status != 200:
                        raise BrokerApiError(
                            f"management API {self.shown} answered {resp.status} for {path}"
                        )
                    self._use(index)
                    return await resp.json()
            except (aiohttp.ClientError, TimeoutError) as exc:
                tried.append(f"{base}: {type(exc).__name__}")
        raise BrokerApiError(f"management API unreachable ({'; '.join(tried)})")

    async def queues(self) -> list[dict[str, Any]]:
        rows = await self._get(f"/queues/{quote(self.vhost, safe='')}")
        out = []
        for q in rows:
            stats = q.get("message_stats") or {}
            out.append(
                {
                    "name": q.get("name"),
                    "type": q.get("type"),
                    "durable": q.get("durable"),
                    "messages": q.get("messages", 0),
                    "ready": q.get("messages_ready", 0),
                    "unacked": q.get("messages_unacknowledged", 0),
                    "consumers": q.get("consumers", 0),
                    "publish_rate": (stats.get("publish_details") or {}).get("rate", 0.0),
                    "deliver_rate": (stats.get("deliver_get_details") or {}).get("rate", 0.0),
                    "ack_rate": (stats.get("ack_details") or {}).get("rate", 0.0),
                    "state": q.get("state"),
                }
            )
        out.sort(key=lambda q: str(q["name"]))
        return out

    async def overview(self) -> dict[str, Any]:
        o = await self._get("/overview")
        totals = o.get("queue_totals") or {}
        stats = o.get("message_stats") or {}
        objects = o.get("object_totals") or {}
        return {
            "rabbitmq_version": o.get("rabbitmq_version"),
            "erlang_version": o.get("erlang_version"),
            "cluster_name": o.get("cluster_name"),
            "node": o.get("node"),
            "vhost": self.vhost,
            "management_api": self.shown,
            "messages": totals.get("messages", 0),
            "ready": totals.get("messages_ready", 0),
            "unacked": totals.get("messages_unacknowledged", 0),
            "publish_rate": (stats.get("publish_details") or {}).get("rate", 0.0),
            "deliver_rate": (stats.get("deliver_get_details") or {}).get("rate", 0.0),
            "connections": objects.get("connections", 0),
            "channels": objects.get("channels", 0),
            "queues": objects.get("queues", 0),
            "consumers": objects.get("consumers", 0),
        }

    async def sample(self) -> None:
        """Record every queue's depth now (the depth-over-time chart)."""
        queues = await self.queues()
        self.samples.append((time.time(), {str(q["name"]): int(q["messages"]) for q in queues}))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
