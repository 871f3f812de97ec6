"""Dead letters on the broker: browse, replay (confirmed copy, then the ack, with a ledger
for interrupted runs) and purge, over ``transport/aio``'s :class:`DeadLetterSession`.

Shared by ``amqptasks dlq`` and the dashboard; :mod:`amqptasks.dlq` is the pure part (what a
dead letter says, what its replayed copy is).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from .config import Settings, redact_url
from .dlq import DeadLetter, describe, replay_message, replay_skip_reason
from .errors import UnroutableError
from .transport.aio import DeadLetterSession, Delivery

__all__ = ["ReplayLedger", "browse", "browse_counted", "purge", "replay", "view_of"]


def view_of(d: Delivery) -> DeadLetter:
    return describe(d.body, d.properties, d.exchange, d.routing_key)


async def browse(url: str | Sequence[str], queue: str, limit: int) -> list[DeadLetter]:
    """Up to ``limit`` dead letters of ``queue``, oldest first; none is removed."""
    letters, _count = await browse_counted(url, queue, limit)
    return letters


async def browse_counted(
    url: str | Sequence[str], queue: str, limit: int
) -> tuple[list[DeadLetter], int]:
    """:func:`browse`, and how many the queue held when it was opened (so a listing that
    stopped at ``limit`` can say how many it left out)."""
    session = DeadLetterSession(url, queue)
    try:
        count = await session.open()
        out = []
        for _ in range(min(count, limit)):
            d = await session.fetch()
            if d is None:
                break
            out.append(view_of(d))
        return out, count
    finally:
        await session.close()  # nothing was acked: everything goes back


async def purge(url: str | Sequence[str], queue: str) -> int:
    """Delete every message of ``queue``; returns how many."""
    session = DeadLetterSession(url, queue)
    try:
        await session.open()
        return await session.purge()
    finally:
        await session.close()


class ReplayLedger:
    """Remembers copies published but whose dead letter was not yet acked (an interrupted
    replay), so the next run acks those dead letters instead of publishing them again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pending: set[str] = set()
        if path.exists():
            for line in path.read_text().splitlines():
                state, _, key = line.partition(" ")
                if state == "sent":
                    self.pending.add(key)
                elif state == "settled":
                    self.pending.discard(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a")

    @staticmethod
    def key(vhost_url: str, queue: str, d: Delivery) -> str:
        digest = hashlib.sha256(d.body)
        digest.update(repr(sorted((d.properties.headers or {}).items())).encode())
        return f"{hashlib.sha256(vhost_url.encode()).hexdigest()[:12]}:{queue}:{digest.hexdigest()}"

    def write(self, state: str, key: str) -> None:
        self._file.write(f"{state} {key}\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


async def replay(
    settings: Settings,
    name: str,
    ids: set[str],
    every: bool,
    task: str | None,
    ledger: ReplayLedger,
    force: bool = False,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[int, list[str], Counter[str]]:
    """Replay the dead letters of queue ``name`` named in ``ids`` (or ``every`` one, of
    ``task`` when given): each copy confirmed before its dead letter is acked, the ledger
    written in between. Returns (moved, problems, skipped by reason); ``progress(total,
    done)`` is called once with ``done=0``, then once per dead letter looked at."""
    session = DeadLetterSession(settings.broker.urls, name, timeout=settings.broker.publish_timeout)
    moved = 0
    problems: list[str] = []
    skipped: Counter[str] = Counter()  # reason -> dead letters left in place
    try:
        count = await session.open()
        if progress is not None:
            progress(count, 0)
        for i in range(count):
            d = await session.fetch()
            if d is None:
                break
            if progress is not None:
                progress(count, i + 1)
            view = view_of(d)
            if not every and view.id not in ids:
                continue
            if task is not None and view.task != task:
                continue
            why = None if force else replay_skip_reason(view)
            if why is not None:  # it would come straight back: leave it, say so
                skipped[view.reason] += 1
                if not every:
                    problems.append(
                        f"{view.id}: reason {view.reason}: {why}; --force replays it anyway"
                    )
                    ids.discard(view.id)
                continue
            key = ReplayLedger.key(redact_url(settings.broker.url), name, d)
            if key not in ledger.pending:  # else: sent by an interrupted run already
                marker = key.rsplit(":", 1)[1][:32]
                body, props = replay_message(d.body, d.properties, marker)
                try:
                    await session.publish(
                        view.original_exchange, view.original_routing_key, body, props
                    )
                except UnroutableError as exc:
                    problems.append(f"{view.id}: {exc}")
                    continue
                ledger.write("sent", key)
            await d.ack()
            ledger.write("settled", key)
            moved += 1
            ids.discard(view.id)
    finally:
        await session.close()
    problems += [f"{i}: not found" for i in sorted(ids)]
    return moved, problems, skipped
