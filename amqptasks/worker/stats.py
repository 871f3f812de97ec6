"""What one worker has done so far: counters the worker's parts share (and later report)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["Stats"]


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
