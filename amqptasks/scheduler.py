"""The periodic scheduler (``amqptasks beat``): exactly one active, any number on standby.

Every scheduler joins the broker lock (see :mod:`amqptasks.transport.beat_lock`) and waits.
The one the broker makes active:

1. reads the shared state — per schedule a *cursor*: every fire time at or before it has been
   handled (fired, or skipped by policy);
2. applies each schedule's ``catch_up`` policy to the fire times missed while no scheduler
   ran (``none`` | ``one`` | ``all``, default ``one``) and commits them with the new state;
3. then loops: every due fire time is published together with the advanced cursors in one
   transaction. A firing's message id is ``<schedule>:<fire time UTC>``.

A schedule never seen before starts at "now" (no catch-up for the time before it existed).
Cursors of schedules this scheduler does not know are kept, so schedulers with different
configs never erase each other's state. ``docs/scheduler.md`` has the guarantees and limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from .config import Settings
from .errors import (
    AmqpTasksError,
    BrokerError,
    BrokerRefused,
    ConfigError,
    RoutingError,
    TopologyError,
)
from .protocol import Envelope, dumps, encode, loads
from .routing import Router
from .schedule import (
    FIRE_TIME_HEADER,
    SCHEDULE_HEADER,
    Schedule,
    format_utc,
    plan_catch_up,
)
from .transport.aio import declare_topology
from .transport.beat_lock import RENEW_INTERVAL, BeatLink, Firing
from .transport.failover import Addresses

__all__ = [
    "LOCK_QUEUE",
    "STATE_QUEUE",
    "Scheduler",
    "collect_schedules",
    "decode_state",
    "encode_state",
    "run_with_beat",
]

log = logging.getLogger("amqptasks.beat")

LOCK_QUEUE = "amqptasks.beat.lock"
STATE_QUEUE = "amqptasks.beat.state"
STATE_VERSION = 1
#: Firings per transaction when a catch-up (``all``) has many to send.
BATCH = 200
_MAX_RETRY_DELAY = 30.0
#: A session that fired, or lasted this long, was healthy: the next one starts without a pause.
_HEALTHY_SESSION = 10.0
#: The longest pause before rejoining after a session that held the lock and could not fire.
_MAX_REJOIN_DELAY = 5.0


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


# -- state document ---------------------------------------------------------------------------
def encode_state(cursors: Mapping[str, datetime], writer: str, now: datetime) -> bytes:
    """The state document: ``{"v": 1, "writer", "written_at", "cursors": {name: time}}``."""
    return dumps(
        {
            "v": STATE_VERSION,
            "writer": writer,
            "written_at": format_utc(now),
            "cursors": {name: format_utc(t) for name, t in sorted(cursors.items())},
        }
    )


def decode_state(body: bytes | None) -> dict[str, datetime]:
    """Cursors from a state document; an unreadable document counts as empty (and is logged):
    schedules then start afresh rather than fire a guessed backlog."""
    if body is None:
        return {}
    try:
        doc = loads(body)
        if not isinstance(doc, dict) or doc.get("v") != STATE_VERSION:
            raise ValueError(f"not a version {STATE_VERSION} state document")
        return {
            str(name): datetime.fromisoformat(str(value).replace("Z", "+00:00"))
            for name, value in dict(doc["cursors"]).items()
        }
    except Exception as exc:
        log.error("beat state in %r is unreadable (%s); schedules start afresh", STATE_QUEUE, exc)
        return {}


# -- schedules --------------------------------------------------------------------------------
def collect_schedules(settings: Settings, modules: Iterable[str] | None = None) -> list[Schedule]:
    """The config's ``schedules`` plus module-level :class:`Schedule` objects of the
    (already imported) ``imports`` modules. Two schedules with one name are an error."""
    found: dict[str, tuple[Schedule, str]] = {}
    for s in settings.schedules:
        found[s.name] = (s, settings.source)
    for module_name in settings.imports if modules is None else modules:
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
        for value in vars(module).values():
            if not isinstance(value, Schedule):
                continue
            other = found.get(value.name)
            if other is not None and other[0] is not value:
                raise ConfigError(
                    f"<python: {module_name}>",
                    f"schedules.{value.name}",
                    f"already defined in {other[1]}",
                )
            found[value.name] = (value, f"module {module_name}")
    return [s for s, _ in found.values()]


def _firing(router: Router, s: Schedule, fire: datetime) -> Firing:
    route = router.route(s.task, exchange=s.exchange, routing_key=s.routing_key, queue=s.queue)
    envelope = Envelope(
        task=s.task,
        id=s.fire_id(fire),
        args=s.args,
        kwargs=dict(s.kwargs),
        expires=fire + s.expires if s.expires is not None else None,
        headers={SCHEDULE_HEADER: s.name, FIRE_TIME_HEADER: format_utc(fire)},
    )
    body, props = encode(envelope)
    return Firing(route.exchange, route.routing_key, body, props)


def default_hostname() -> str:
    return f"beat@{socket.gethostname()}"


class Scheduler:
    """Runs the schedules while holding the broker lock; ``await run()`` returns an exit code."""

    def __init__(
        self,
        settings: Settings,
        schedules: Sequence[Schedule],
        *,
        hostname: str = "",
        heartbeat: int = 5,
        declare: bool = True,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        names = [s.name for s in schedules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise AmqpTasksError(f"schedule name(s) used twice: {', '.join(dupes)}")
        self.settings = settings
        self.schedules = list(schedules)
        self.router = settings.router()
        for s in self.schedules:  # Python schedules are checked here, YAML ones in config
            try:
                _firing(self.router, s, clock())
            except RoutingError as exc:
                raise AmqpTasksError(f"schedule {s.name!r}: {exc}") from None
        self.hostname = hostname or default_hostname()
        self.heartbeat = heartbeat
        self.declare = declare
        self.clock = clock
        self.role = "starting"
        #: Called with the new role ("standby", "active") — the CLI prints it.
        self.on_role: Callable[[str], None] | None = None
        self.fired = 0
        self._stop = asyncio.Event()
        self._exit_code = 0
        self._declared = False

    def stop(self) -> None:
        """Stop: an active scheduler finishes its current commit and releases the lock."""
        self._stop.set()

    def _set_role(self, role: str) -> None:
        if role != self.role:
            self.role = role
            if self.on_role is not None:
                self.on_role(role)

    async def run(self, *, handle_signals: bool = True) -> int:
        """Join, wait for the lock, fire while holding it; rejoin after a lost connection."""
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        delay = 0.5
        addresses = Addresses(self.settings.broker.urls)
        topology = self.settings.topology
        in_round = 0  # addresses tried since the last sleep (a cluster: the next node at once)
        try:
            while not self._stop.is_set():
                url = addresses.preferred
                link = BeatLink(
                    url,
                    lock_queue=LOCK_QUEUE,
                    state_queue=STATE_QUEUE,
                    name=f"amqptasks {self.hostname} pid {os.getpid()}",
                    heartbeat=self.heartbeat,
                    timeout=self.settings.broker.publish_timeout,
                    queue_type=topology.default_queue_type,
                    replicas=topology.replicas,
                )
                try:
                    await link.open()
                except BrokerRefused as exc:  # asking again gets the same answer: stop
                    log.error("%s", exc)
                    self._exit_code = 1
                    return 1
                except BrokerError as exc:
                    self._set_role("connecting")
                    addresses.failed(url)
                    in_round += 1
                    if in_round < len(addresses):
                        log.warning("beat %s: %s; trying the next address", self.hostname, exc)
                        continue
                    in_round = 0
                    log.warning("beat %s: %s; retrying in %.1fs", self.hostname, exc, delay)
                    await _wait(self._stop, timeout=delay)
                    delay = min(delay * 2, _MAX_RETRY_DELAY)
                    continue
                in_round = 0
                addresses.answered(url)
                opened, fired = time.monotonic(), self.fired
                try:
                    await self._session(link)
                except (TopologyError, BrokerRefused) as exc:
                    log.error("%s", exc)
                    self._exit_code = 1
                    return 1
                except BrokerError as exc:
                    log.warning("beat %s: %s", self.hostname, exc)
                finally:
                    await link.close()
                if link.lost.is_set() and len(addresses) > 1:
                    addresses.failed(url)  # rejoin through the next node first
                    in_round = 1
                healthy = self.fired > fired or time.monotonic() - opened > _HEALTHY_SESSION
                if healthy or not link.activated.is_set():
                    delay = 0.5
                elif not self._stop.is_set():
                    # Held the lock and could not fire (on a cluster: a quorum queue whose
                    # leader died and whose new one is not known yet closes the connection at
                    # once). Rejoining at once, the schedulers would hand the lock back and
                    # forth thousands of times a second and load the very nodes electing it.
                    rejoin = min(delay, _MAX_REJOIN_DELAY)
                    log.warning(
                        "beat %s: held the lock but could not fire; rejoining in %.1fs",
                        self.hostname,
                        rejoin,
                    )
                    await _wait(self._stop, timeout=rejoin)
                    delay = min(delay * 2, _MAX_RETRY_DELAY)
        finally:
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
        return self._exit_code

    async def _session(self, link: BeatLink) -> None:
        if self.declare and not self._declared:
            # Declared while still on standby, so a takeover does not wait for it.
            await declare_topology(
                link.url,
                self.settings.topology,
                timeout=self.settings.broker.publish_timeout,
            )
            self._declared = True
        self._set_role("standby")
        log.info("beat %s: standby, waiting for the lock on %r", self.hostname, LOCK_QUEUE)
        waited = time.monotonic()
        while not link.activated.is_set():
            link.keepalive()
            await _wait(link.activated, link.lost, self._stop, timeout=1.0)
            if self._stop.is_set() or link.lost.is_set():
                return
        log.info(
            "beat %s: active, holding the lock on %r (after %.3fs standby)",
            self.hostname,
            LOCK_QUEUE,
            time.monotonic() - waited,
        )
        await self._lead(link)

    async def _lead(self, link: BeatLink) -> None:
        state = decode_state(await link.read_state())
        now = self.clock()
        cursors = dict(state)
        backlog: list[tuple[Schedule, datetime]] = []
        for s in self.schedules:
            cursor = state.get(s.name)
            if cursor is None:
                cursors[s.name] = now  # new schedule: nothing before now to catch up
                continue
            missed = plan_catch_up(s.timing, cursor, now, s.catch_up)
            if s.next_after(cursor) <= now:
                log.info(
                    "schedule %s: fire times missed since %s (no scheduler ran); "
                    "catch_up=%s fires %d of them",
                    s.name,
                    format_utc(cursor),
                    s.catch_up,
                    len(missed),
                )
            backlog.extend((s, f) for f in missed)
            cursors[s.name] = max(cursor, now)
        self._set_role("active")
        for i in range(0, max(len(backlog), 1), BATCH):
            await self._commit(link, backlog[i : i + BATCH], cursors, catch_up=True)
        upcoming = {s.name: s.next_after(cursors[s.name]) for s in self.schedules}
        renewed = time.monotonic()
        while not self._stop.is_set() and not link.lost.is_set():
            link.keepalive()
            now = self.clock()
            due: list[tuple[Schedule, datetime]] = []
            advanced = dict(cursors)
            for s in self.schedules:
                fire = upcoming[s.name]
                while s.publish_at(fire) <= now and len(due) < BATCH:
                    due.append((s, fire))
                    advanced[s.name] = fire
                    fire = s.next_after(fire)
            if due:
                await self._commit(link, due, advanced, catch_up=False)
                cursors = advanced
                upcoming.update({s.name: s.next_after(cursors[s.name]) for s, _ in due})
                continue  # a long batch may have let more come due
            if time.monotonic() - renewed > RENEW_INTERVAL:
                await link.renew()
                renewed = time.monotonic()
            wake = min((s.publish_at(upcoming[s.name]) for s in self.schedules), default=None)
            pause = 1.0 if wake is None else (wake - self.clock()).total_seconds()
            await _wait(self._stop, link.lost, timeout=min(max(pause, 0.0), 1.0))

    async def _commit(
        self,
        link: BeatLink,
        batch: Sequence[tuple[Schedule, datetime]],
        cursors: Mapping[str, datetime],
        *,
        catch_up: bool,
    ) -> None:
        firings = [_firing(self.router, s, f) for s, f in batch]
        state = encode_state(cursors, self.hostname, self.clock())
        returned = await link.commit(firings, state)
        done = self.clock()
        for s, fire in batch:
            log.info(
                "fired %s late=%.3fs%s",
                s.fire_id(fire),
                (done - fire).total_seconds(),
                " (catch-up)" if catch_up else "",
            )
        self.fired += len(batch)
        for r in returned:
            log.error(
                "firing %s was unroutable: exchange %r routing key %r reaches no queue (%s); "
                "declare the topology ('amqptasks topology apply')",
                r.message_id,
                r.exchange,
                r.routing_key,
                r.reply_text,
            )


async def _wait(*events: asyncio.Event, timeout: float) -> None:
    """Until any of ``events`` is set or ``timeout`` seconds pass."""
    if any(e.is_set() for e in events):
        return
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


def _report_crash(task: asyncio.Future[int]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the embedded scheduler stopped: %r", task.exception())


async def run_with_beat(
    main: Coroutine[Any, Any, int], settings: Settings, *, hostname: str = ""
) -> int:
    """Run ``main`` (the worker) with an embedded scheduler on the same loop (``worker -B``).

    The scheduler joins the same lock as ``amqptasks beat`` processes, so several ``-B``
    workers still fire each tick once. Its errors are logged; the worker's exit code counts.
    """
    try:
        schedules = collect_schedules(settings)
        beat = (
            Scheduler(settings, schedules, hostname=f"{hostname or default_hostname()} (-B)")
            if schedules
            else None
        )
    except BaseException:
        main.close()  # never started: do not leave an un-awaited coroutine behind
        raise
    if beat is None:
        log.warning("--beat: no schedules configured; the embedded scheduler is not started")
        return await main
    task = asyncio.ensure_future(beat.run(handle_signals=False))
    task.add_done_callback(_report_crash)
    try:
        return await main
    finally:
        beat.stop()
        with contextlib.suppress(Exception):  # a crash was reported when it happened
            await asyncio.wait_for(task, timeout=15)
