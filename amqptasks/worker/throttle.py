"""The rate-limit stage of the pipeline: a throttled task waits for its token *before* it takes
a concurrency slot, so waiting never holds a slot; it only holds its delivery, which the
broker already counts against the consumer's prefetch (``basic.qos``). So a worker never holds
more unacked deliveries than the prefetch the user configured, throttled or not.

Two scopes (``TaskPolicy.rate_limit``, :class:`~amqptasks.rate.RateLimit`):

* ``worker`` — a :class:`TokenBucket` per task in this process (capacity ``burst``, 1 by
  default as in Celery), refilled at the rate. Waiters are served in arrival order by one
  small pump per task, which also picks up a rate changed at run time at once.
* ``fleet`` — the tokens live in the broker, in a queue per task
  (:func:`~amqptasks.topology.rate_tokens_queue`). Every worker with that limit consumes it
  with prefetch 1 and *spends* a token by acking it just before the task takes its slot; an
  unspent token is held (unacked) at most :data:`HOLD_SECONDS`, then given back. Exactly one
  worker refills it: the one the broker makes the single active consumer of the task's lock
  queue (:func:`~amqptasks.topology.rate_lock_queue`, ``x-single-active-consumer``), which
  holds a lock message there. When that worker's connection dies the broker requeues the
  message to the next consumer at once, which starts refilling: failover is pushed by the
  broker within milliseconds, like ``amqptasks beat``'s lock. The refiller ticks at the rate
  (at most :data:`MAX_TICKS_PER_SECOND`), reads the queue's depth (a passive declare) and
  publishes only what keeps the ready tokens at ``burst`` or fewer, so tokens never pile up
  while nobody needs them. It uses its own policy's rate (docs/reliability.md: what that
  means when workers disagree, and the measured accuracy).

Tokens are consumed on a side channel of the consuming connection; they are published by the
worker's publisher (its own connection: a resource alarm must not block the acks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from ..config import TaskPolicy
from ..protocol import Envelope, Properties
from ..rate import RateLimit
from ..topology import RATE_LOCK_ARGUMENTS, rate_lock_queue, rate_tokens_queue
from ..transport.pika_consumer import PikaConsumer, SideChannel, SideDelivery
from .middleware import Publish

__all__ = ["HOLD_SECONDS", "MAX_TICKS_PER_SECOND", "Throttle", "TokenBucket"]

log = logging.getLogger("amqptasks.worker")

#: An unspent fleet token is given back to its queue after this long (a delivery held past
#: the broker's consumer_timeout would close the channel).
HOLD_SECONDS = 20.0
#: The refiller publishes at most this many batches of tokens a second.
MAX_TICKS_PER_SECOND = 50.0
#: The refiller renews its lock message this often (well inside the consumer_timeout).
LOCK_RENEW_SECONDS = 60.0
#: Clock arithmetic in floats: a token 1e-9 short of whole counts as whole.
_EPSILON = 1e-9
_TOKEN = Properties(content_type="text/plain", delivery_mode=1)
_LOCK = Properties(content_type="text/plain", delivery_mode=2)


#: A bucket keeps up to this much of a token above its capacity: a timer that fires a little
#: late must not lose what the rate earned meanwhile (a quarter of an interval here).
_SLACK = 0.25


class TokenBucket:
    """``capacity`` tokens, refilled at ``rate`` a second; pure (the clock is passed in).

    It holds at most ``capacity + 0.25`` (the slack a late timer needs not to lose pace), so
    after a quiet spell ``capacity`` start at once, and the next one a little sooner than
    ``1/rate`` later.
    """

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float, capacity: int, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = float(capacity)
        self.stamp = now

    def _fill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity + _SLACK, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)

    def take(self, now: float) -> bool:
        """Spend a token if there is one now."""
        self._fill(now)
        if self.tokens >= 1.0 - _EPSILON:
            self.tokens = max(0.0, self.tokens - 1.0)
            return True
        return False

    def wait(self, now: float) -> float:
        """Seconds until a token is there (0: now)."""
        self._fill(now)
        return 0.0 if self.tokens >= 1.0 - _EPSILON else (1.0 - self.tokens) / self.rate

    def configure(self, rate: float, capacity: int, now: float) -> None:
        self._fill(now)
        self.rate, self.capacity = rate, capacity
        self.tokens = min(self.tokens, capacity + _SLACK)


def _tick(limit: RateLimit) -> float:
    """Seconds between two refills of a fleet limit: one token's worth, within
    [1/MAX_TICKS_PER_SECOND, 1]."""
    return min(1.0, max(1.0 / MAX_TICKS_PER_SECOND, 1.0 / limit.per_second))


_Waiter = tuple[str, "asyncio.Future[bool]"]


class _Limiter:
    """Waiters for one task's tokens (served in arrival order)."""

    scope = ""

    def __init__(self, task: str, limit: RateLimit) -> None:
        self.task = task
        self.limit = limit
        self.waiters: deque[_Waiter] = deque()

    def _next(self) -> _Waiter | None:
        while self.waiters and self.waiters[0][1].done():
            self.waiters.popleft()
        return self.waiters[0] if self.waiters else None

    def enqueue(self, task_id: str) -> asyncio.Future[bool]:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.waiters.append((task_id, future))
        return future

    def release(self, ids: set[str] | None, value: bool) -> None:
        """Let waiters go without a token: those of ``ids`` (None: all) with ``value``."""
        for task_id, future in self.waiters:
            if (ids is None or task_id in ids) and not future.done():
                future.set_result(value)

    def take_now(self) -> bool:
        """A token without waiting, if one is there and nobody waits before us."""
        return False

    def update(self, limit: RateLimit) -> None:
        self.limit = limit

    def close(self) -> None:
        self.release(None, True)  # the limit is gone: they go on at once

    def describe(self) -> dict[str, Any]:
        return {**self.limit.describe(), "waiting": sum(not f.done() for _i, f in self.waiters)}


class _LocalLimiter(_Limiter):
    scope = "worker"

    def __init__(self, task: str, limit: RateLimit, clock: Callable[[], float]) -> None:
        super().__init__(task, limit)
        self.clock = clock
        self.bucket = TokenBucket(limit.per_second, limit.burst, clock())
        self._changed = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None

    def take_now(self) -> bool:
        return self._next() is None and self.bucket.take(self.clock())

    def enqueue(self, task_id: str) -> asyncio.Future[bool]:
        future = super().enqueue(task_id)
        if self._pump is None or self._pump.done():
            self._pump = asyncio.get_running_loop().create_task(self._serve())
        return future

    async def _serve(self) -> None:
        while (waiter := self._next()) is not None:
            wait = self.bucket.wait(self.clock())
            if wait > 0:
                self._changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), wait)
                continue
            self.bucket.take(self.clock())
            self.waiters.popleft()
            waiter[1].set_result(True)

    def update(self, limit: RateLimit) -> None:
        super().update(limit)
        self.bucket.configure(limit.per_second, limit.burst, self.clock())
        self._changed.set()

    def close(self) -> None:
        super().close()
        if self._pump is not None:
            self._pump.cancel()


class _FleetLimiter(_Limiter):
    scope = "fleet"

    def __init__(self, task: str, limit: RateLimit, throttle: Throttle) -> None:
        super().__init__(task, limit)
        self.throttle = throttle
        self.tokens_queue = rate_tokens_queue(task)
        self.lock_queue = rate_lock_queue(task)
        self.side: SideChannel | None = None
        self._consumers: list[str] = []
        #: The token this worker holds unspent (its delivery tag) and since when.
        self.held: int | None = None
        self.held_since = 0.0
        #: The lock message's tag while this worker is the refiller.
        self.lock_tag: int | None = None
        self._refill: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self.spent = 0
        self.published = 0

    # -- the broker side ----------------------------------------------------------------------
    async def join(self, side: SideChannel) -> None:
        """Consume the task's tokens and stand for refilling them (after each connect)."""
        self.side = side
        await side.declare(self.tokens_queue)
        await side.declare(self.lock_queue, dict(RATE_LOCK_ARGUMENTS))
        # Every candidate brings a lock message; x-max-length 1 keeps one spare at most.
        await self.throttle.publish("", self.lock_queue, b"lock", _LOCK)
        self._consumers = [
            side.consume(self.tokens_queue, self._on_token),
            side.consume(self.lock_queue, self._on_lock),
        ]

    async def leave(self) -> None:
        """Stop consuming and refilling; give back what this worker holds."""
        side, self.side = self.side, None
        self._stop_refill()
        if side is None or not side.is_open:
            self.held = self.lock_tag = None
            return
        for tag in self._consumers:
            with contextlib.suppress(Exception):
                await side.cancel(tag)
        for held in (self.held, self.lock_tag):
            if held is not None:
                side.requeue(held)  # the next consumer gets the token, or becomes refiller
        self.held = self.lock_tag = None

    def lost(self) -> None:
        """The connection went: the broker requeued what we held."""
        self.side = None
        self.held = self.lock_tag = None
        self._stop_refill()

    def _on_token(self, delivery: SideDelivery) -> None:
        side = self.side
        if side is None:
            return
        waiter = self._next()
        if waiter is not None:
            side.ack(delivery.tag)  # spent
            self.spent += 1
            self.waiters.popleft()
            waiter[1].set_result(True)
        else:
            self.held, self.held_since = delivery.tag, time.monotonic()

    def _on_lock(self, delivery: SideDelivery) -> None:
        """The broker made us the single active consumer: refill (or a renewed lock)."""
        side = self.side
        if side is None:
            return
        old, self.lock_tag = self.lock_tag, delivery.tag
        if old is not None:  # not expected (prefetch 1): keep one
            side.ack(old)
        if self._refill is None or self._refill.done():
            log.info(
                "rate limit %s of %s: this worker refills the fleet's tokens", self.limit, self.task
            )
            self._refill = asyncio.get_running_loop().create_task(self._refilling())

    def _stop_refill(self) -> None:
        if self._refill is not None:
            self._refill.cancel()
            self._refill = None

    async def _refilling(self) -> None:
        loop = asyncio.get_running_loop()
        # A new refiller fills the bucket (the queue may be new): at most `burst` extra starts
        # per election.
        credit = float(self.limit.burst)
        last = renewed = loop.time()
        while self.side is not None:
            limit = self.limit
            tick = _tick(limit)
            now = loop.time()
            elapsed, last = now - last, now
            # When a tick earns more than one token (above MAX_TICKS_PER_SECOND, or a turn
            # slowed by the broker's answers), the ready tokens may reach what it earned: a
            # bucket of 1 would cap the rate at one token a turn (measured before this: 50/s
            # at most whatever was asked, and 81/s at 100/s on a loaded box).
            # Rounded, not ceiled, for a late turn: a turn 5 ms late at 5/s earns 1.03 tokens,
            # and letting 2 be ready would make a bucket of 1 a bucket of 2 (measured: 6.9/s
            # at 5/s). A stall (a blocked loop) earns at most a quarter second's worth.
            cap = max(
                limit.burst,
                math.ceil(limit.per_second * tick - _EPSILON),
                round(limit.per_second * min(elapsed, 0.25)),
            )
            # Capped a token above that: a turn that comes late must not lose what it earned
            # (the depth check below keeps the ready tokens at `cap` anyway).
            credit = min(cap + 1.0, credit + elapsed * limit.per_second)
            try:
                if credit >= 1.0:
                    ready = await self.side.declare(self.tokens_queue, passive=True)
                    n = min(int(credit), cap - ready)
                    if n > 0:
                        await asyncio.gather(
                            *(
                                self.throttle.publish("", self.tokens_queue, b"1", _TOKEN)
                                for _ in range(n)
                            )
                        )
                        self.published += n
                        credit -= n
                if now - renewed >= LOCK_RENEW_SECONDS and self.lock_tag is not None:
                    # A fresh lock message (so the held one never meets consumer_timeout):
                    # published first, then the old one acked; the broker then delivers the
                    # new one to us, still its single active consumer (prefetch 1: only then).
                    await self.throttle.publish("", self.lock_queue, b"lock", _LOCK)
                    if self.side is not None and self.lock_tag is not None:
                        self.side.ack(self.lock_tag)
                        self.lock_tag = None
                    renewed = now
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the link is going; the next refiller takes over
                log.warning("refilling the tokens of %s failed: %s", self.task, exc)
                await asyncio.sleep(1.0)
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):  # a turn lasts one tick in all
                await asyncio.wait_for(self._changed.wait(), max(0.0, tick - (loop.time() - now)))

    # -- waiting ------------------------------------------------------------------------------
    def take_now(self) -> bool:
        side = self.side
        if self._next() is None and self.held is not None and side is not None:
            side.ack(self.held)
            self.spent += 1
            self.held = None
            return True
        return False

    def recycle(self) -> None:
        """Give back a token held unspent too long (each consumer may hold one)."""
        if (
            self.held is not None
            and self.side is not None
            and time.monotonic() - self.held_since > HOLD_SECONDS
        ):
            self.side.requeue(self.held)
            self.held = None

    def update(self, limit: RateLimit) -> None:
        super().update(limit)
        self._changed.set()

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "refilling": self._refill is not None and not self._refill.done(),
            "holding": self.held is not None,
            "spent": self.spent,
            "published": self.published,
        }


class Throttle:
    """Rate limits of one worker's tasks (see the module docstring); with no policies, none.

    ``policies`` is the worker's own mapping: :meth:`refresh` after changing it.
    ``exempt(task_id)`` lets a delivery pass without a token (a revoked id: it will not run).
    """

    def __init__(
        self,
        policies: Mapping[str, TaskPolicy] | None = None,
        *,
        publish: Publish | None = None,
        exempt: Callable[[str], bool] = lambda _id: False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policies: Mapping[str, TaskPolicy] = policies if policies is not None else {}
        self._publish = publish
        self.exempt = exempt
        self.clock = clock
        self.limiters: dict[str, _Limiter] = {}
        #: Tasks with an active limit (the pipeline only awaits :meth:`admit` for these).
        self.limited: frozenset[str] = frozenset()
        self._consumer: PikaConsumer | None = None
        self._side: SideChannel | None = None
        self._stopping: asyncio.Event | None = None
        self._watch: asyncio.Task[None] | None = None
        self._recycler: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[Any]] = set()
        self.refresh()

    async def publish(self, exchange: str, key: str, body: bytes, props: Properties) -> None:
        assert self._publish is not None, "a fleet limit needs the worker's publisher"
        await self._publish(exchange, key, body, props)

    def refresh(self) -> None:
        """Follow the policies: limiters for new limits, updates, removals."""
        for name, policy in self.policies.items():
            limit = policy.rate_limit
            current = self.limiters.get(name)
            if limit is None or not limit.active:
                if current is not None:
                    self._drop(name)
            elif current is None or current.scope != limit.scope:
                if current is not None:
                    self._drop(name)
                self._add(name, limit)
            else:
                current.update(limit)
        self.limited = frozenset(self.limiters)

    def _add(self, name: str, limit: RateLimit) -> None:
        if limit.scope == "fleet":
            fleet = _FleetLimiter(name, limit, self)
            self.limiters[name] = fleet
            if self._consumer is not None:
                self._spawn(self._join(fleet))
        else:
            self.limiters[name] = _LocalLimiter(name, limit, self.clock)

    def _drop(self, name: str) -> None:
        limiter = self.limiters.pop(name)
        limiter.close()
        if isinstance(limiter, _FleetLimiter):
            self._spawn(limiter.leave())

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _join(self, fleet: _FleetLimiter) -> None:
        try:
            side = await self._side_channel()
            if side is not None and self.limiters.get(fleet.task) is fleet:
                await fleet.join(side)
        except Exception as exc:
            log.error("fleet rate limit of %s: cannot consume its tokens: %s", fleet.task, exc)

    async def _side_channel(self) -> SideChannel | None:
        """The side channel of the current connection (opened on first need)."""
        consumer = self._consumer
        if self._side is None and consumer is not None and not consumer.is_closed:
            side = await consumer.side_channel()
            await side.qos(1)  # one token (or lock message) per consumer at a time
            if self._side is None:
                self._side = side
                side.closed.add_done_callback(lambda _f: self._lost(side))
            else:
                side.close()
        return self._side

    # -- the pipeline stage -------------------------------------------------------------------
    async def admit(self, env: Envelope, stopping: asyncio.Event) -> bool:
        """Wait for ``env``'s token; False when the worker began stopping first."""
        limiter = self.limiters.get(env.task)
        if limiter is None or self.exempt(env.id):
            return True
        if limiter.take_now():
            return True
        if self._stopping is not stopping:
            self._watch_stopping(stopping)
        if stopping.is_set():
            return False
        return await limiter.enqueue(env.id)

    def _watch_stopping(self, stopping: asyncio.Event) -> None:
        self._stopping = stopping

        async def watch() -> None:
            await stopping.wait()
            for limiter in self.limiters.values():
                limiter.release(None, False)

        if self._watch is not None:
            self._watch.cancel()
        self._watch = asyncio.get_running_loop().create_task(watch())

    def release(self, ids: set[str]) -> None:
        """Revoked ids go on without a token (their ``should_run`` settles them)."""
        for limiter in self.limiters.values():
            limiter.release(ids, True)

    # -- the broker link ----------------------------------------------------------------------
    async def attach(self, consumer: PikaConsumer) -> None:
        """After each (re)connect: join the fleets (a side channel with prefetch 1)."""
        self._consumer = consumer
        self._side = None
        fleets = [f for f in self.limiters.values() if isinstance(f, _FleetLimiter)]
        if fleets:
            side = await self._side_channel()
            assert side is not None
            for fleet in fleets:
                await fleet.join(side)
        if self._recycler is None:
            self._recycler = asyncio.get_running_loop().create_task(self._recycle())

    def _lost(self, side: SideChannel) -> None:
        if self._side is side:
            self._side = None
        for limiter in self.limiters.values():
            if isinstance(limiter, _FleetLimiter) and limiter.side is side:
                limiter.lost()

    async def _recycle(self) -> None:
        while True:
            await asyncio.sleep(HOLD_SECONDS / 4)
            for limiter in list(self.limiters.values()):
                if isinstance(limiter, _FleetLimiter):
                    limiter.recycle()

    def describe(self) -> dict[str, Any]:
        """``inspect stats``: each limited task's limit, waiters and (fleet) token state."""
        return {name: limiter.describe() for name, limiter in sorted(self.limiters.items())}

    async def close(self) -> None:
        """Shutdown: leave the fleets (tokens and the lock go to the next worker at once)."""
        for task in (self._watch, self._recycler):
            if task is not None:
                task.cancel()
        for limiter in list(self.limiters.values()):
            if isinstance(limiter, _FleetLimiter):
                with contextlib.suppress(Exception):
                    await limiter.leave()
            elif isinstance(limiter, _LocalLimiter) and limiter._pump is not None:
                limiter._pump.cancel()
        for task in list(self._pending):
            task.cancel()
