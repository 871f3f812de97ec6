"""What one worker has done so far: counters the worker's parts share (and ``inspect stats``
reports)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["OUTCOMES", "Stats"]

#: What became of a delivery this worker took, as counted per task.
OUTCOMES = ("succeeded", "failed", "retried", "rejected", "expired", "revoked")


@dataclass(slots=True)
class Stats:
    """Counters of one worker process; mutated on its event loop only."""

    #: Deliveries whose task ran and whose outcome was settled (any outcome).
    processed: int = 0
    #: Tasks running right now (a slot is held).
    running: int = 0
    #: Times the consuming connection was re-established after a loss.
    reconnects: int = 0
    started: float = field(default_factory=time.time)
    #: (task name, outcome in :data:`OUTCOMES`) -> how many.
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: Events published (confirmed by the broker) and dropped (never published: the broker
    #: was unreachable for longer than the events buffer holds).
    events_published: int = 0
    events_dropped: int = 0

    def by_task(self) -> dict[str, dict[str, int]]:
        """``{task: {outcome: count}}`` for the outcomes that happened."""
        out: dict[str, dict[str, int]] = {}
        for (task, outcome), n in sorted(self.outcomes.items()):
            out.setdefault(task, {})[outcome] = n
        return out
