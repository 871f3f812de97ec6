"""Events into the history: a thread that reads the dashboard's durable events queue, folds
each batch into SQLite, commits, and only then acks the batch's messages.

That order is the whole guarantee of "history that survives": killed before the commit,
the messages are redelivered to the next dashboard; killed after the commit and before the
ack, they are redelivered and applied again, which the history tolerates (see
:mod:`.history`). The queue is durable and bound with ``#`` (``transport/event_listener``),
so events published while no dashboard runs wait for it.

The thread owns its listener (pika's blocking client is not thread-safe) and the history's
writing connection; the web app reads the history on other threads and hears about each
committed batch through ``on_batch`` (called on this thread: it must only hand over).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..config import redact_url
from ..errors import AmqpTasksError, DecodeError
from ..events import decode_batch
from ..transport.event_listener import EventListener
from .history import Applied, History

__all__ = ["IngestStats", "Ingestor"]

log = logging.getLogger("amqptasks.dashboard")

#: Stop gathering messages for one transaction at this many events.
BATCH_EVENTS = 20_000
#: Seconds between two retention passes.
PRUNE_EVERY = 10.0


@dataclass
class IngestStats:
    """What the ingest thread has done (``/api/stats``, ``/metrics``, the bench)."""

    events: int = 0
    messages: int = 0
    batches: int = 0
    undecodable: int = 0
    pruned: int = 0
    #: Seconds between the newest event's time and its commit, for the last batch.
    lag: float = 0.0
    last_event_at: float = 0.0
    connected: bool = False
    error: str = ""
    started: float = field(default_factory=time.time)


class Ingestor:
    """Runs the ingest loop on its own thread; :meth:`stop` ends it (unacked messages go
    back to the queue)."""

    def __init__(
        self,
        url: str | Sequence[str],
        queue: str,
        history: History,
        on_batch: Callable[[Applied], None] | None = None,
        *,
        prefetch: int = 500,
        reconnect_delay: float = 2.0,
        queue_type: str = "classic",
    ) -> None:
        self.url = url
        self.queue_type = queue_type
        self.queue = queue
        self.history = history
        self.on_batch = on_batch
        self.prefetch = prefetch
        self.reconnect_delay = reconnect_delay
        self.stats = IngestStats()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dashboard-ingest", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wait_ready(self, timeout: float) -> bool:
        """Whether the queue was declared and consumed within ``timeout`` seconds."""
        return self._ready.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        last_prune = 0.0
        while not self._stop.is_set():
            listener = EventListener(
                self.url,
                queue=self.queue,
                prefetch=self.prefetch,
                name="amqptasks dashboard",
                queue_type=self.queue_type,
            )
            try:
                listener.open()
                self.stats.connected, self.stats.error = True, ""
                self._ready.set()
                log.info("reading events from durable queue %r", self.queue)
                while not self._stop.is_set():
                    busy = self._once(listener)
                    # Between batches, in slices: nothing is acked later for it.
                    self.history.index_pending(idle=not busy)
                    if time.monotonic() - last_prune > PRUNE_EVERY:
                        last_prune = time.monotonic()
                        self.stats.pruned += self.history.prune()
            except AmqpTasksError as exc:
                self.stats.connected, self.stats.error = False, str(exc)
                log.warning(
                    "events from %s: %s; retrying in %.0fs",
                    redact_url(listener.url),
                    exc,
                    self.reconnect_delay,
                )
                self._stop.wait(self.reconnect_delay)
            except Exception:  # a bug or a broken file: say so, keep trying
                self.stats.connected = False
                self.stats.error = "internal error (see the log)"
                log.exception("the ingest loop failed; retrying in %.0fs", self.reconnect_delay)
                self._stop.wait(self.reconnect_delay)
            finally:
                listener.close()
                self.stats.connected = False

    def _once(self, listener: EventListener) -> bool:
        """Fold what has arrived into one commit, then ack it; False when nothing had."""
        messages = listener.poll(0.2)
        if not messages:
            return False
        while sum(len(m.body) for m in messages) < BATCH_EVENTS * 200:
            more = listener.poll(0)  # take what has already arrived into the same commit
            if not more:
                break
            messages += more
        events: list[dict[str, Any]] = []
        for m in messages:
            try:
                events += decode_batch(m.body)
            except DecodeError as exc:
                # It can never be read: keeping it would block nothing but would redeliver
                # forever after every restart. Counted and logged, then acked.
                self.stats.undecodable += 1
                log.warning(
                    "an events message (routing key %r, %d bytes) is not an events batch: %s",
                    m.routing_key,
                    len(m.body),
                    exc,
                )
        applied = self.history.apply(events)
        for m in messages:  # committed: now the broker may forget them
            listener.done(m)
        now = time.time()
        st = self.stats
        st.events += applied.events
        st.messages += len(messages)
        st.batches += 1
        st.last_event_at = now
        newest = max((str(e.get("time", "")) for e in events), default="")
        st.lag = _age(newest, now)
        if self.on_batch is not None:
            self.on_batch(applied)
        return True


def _age(rfc3339_text: str, now: float) -> float:
    try:
        then = datetime.fromisoformat(rfc3339_text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0
    return max(0.0, now - then)
