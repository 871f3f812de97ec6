"""The worker's side of inspect/control: its control queue and what each command does.

Each worker consumes an exclusive, auto-delete queue bound to the fanout
:data:`~amqptasks.topology.CONTROL_EXCHANGE` on its consuming connection (a channel of its
own, no acks): the queue lives and dies with that connection, is declared again after every
reconnect, and keeps answering during a warm shutdown until the connection closes. A command
addressed to this worker (``destination`` empty or naming it) runs on the event loop; the
answer goes to the command's ``reply_to`` through the worker's publisher (confirmed; a
caller that is gone is logged at debug level).

:data:`HANDLERS` maps each command of :data:`amqptasks.control.COMMANDS` to a coroutine
``handler(worker, arguments) -> result``. A new command is a spec there and a handler here,
registered with :func:`handler`; the server needs no change. ``rate-limit`` and ``time-limit``
change ``Worker.policies`` (the one mapping every part reads) and tell the parts that cache
from it (the fast path's task list, the throttle) to look again. A handler raising
:class:`CommandError` answers ``ok: false`` with its message; anything else it raises is
logged and answered as ``InternalError``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any

from ..config import MAX_REVOKE_EXPIRES, TaskPolicy
from ..control import (
    COMMANDS,
    Command,
    ControlReply,
    check_arguments,
    decode_command,
    encode_reply,
)
from ..events import rfc3339
from ..protocol import CONTENT_TYPE_JSON, Properties
from ..rate import RateLimit, rate_limit
from ..topology import CONTROL_EXCHANGE
from ..transport.pika_consumer import PikaConsumer

if TYPE_CHECKING:
    from .core import Worker

__all__ = ["HANDLERS", "CommandError", "ControlServer", "handler"]

log = logging.getLogger("amqptasks.control")

Handler = Callable[["Worker", Mapping[str, Any]], Awaitable[Any]]
#: Command name -> what it does in a worker.
HANDLERS: dict[str, Handler] = {}


class CommandError(Exception):
    """A command that cannot be done as asked; answered ``ok: false`` with this text."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


def handler(name: str) -> Callable[[Handler], Handler]:
    """Register the handler of command ``name`` (which must be in ``COMMANDS``)."""

    def register(fn: Handler) -> Handler:
        if name not in COMMANDS:
            raise ValueError(f"command {name!r} has no CommandSpec in amqptasks.control")
        HANDLERS[name] = fn
        return fn

    return register


class ControlServer:
    """Consumes this worker's control queue and answers what is addressed to it."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.pid = os.getpid()
        #: Exclusive queues are per connection: the suffix keeps two workers given one name
        #: from refusing each other's queue (both answer; the client shows both).
        self.queue = f"{CONTROL_EXCHANGE}.{worker.hostname}.{os.urandom(4).hex()}"
        self._tasks: set[asyncio.Task[None]] = set()

    async def attach(self, consumer: PikaConsumer) -> None:
        """Declare and consume the control queue on ``consumer``'s connection."""
        await consumer.declare_exchange(CONTROL_EXCHANGE, "fanout")
        await consumer.consume_broadcast(CONTROL_EXCHANGE, self.queue, self.on_message)

    def on_message(self, props: Properties, body: bytes) -> None:
        try:
            cmd = decode_command(body)
        except Exception as exc:
            log.warning("undecodable control command ignored: %s", exc)
            return
        if not cmd.addressed_to(self.worker.hostname):
            return
        task = asyncio.get_running_loop().create_task(self._answer(cmd, props))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self, cmd: Command) -> ControlReply:
        """Do ``cmd`` here and say how it went."""
        hostname = self.worker.hostname
        fn = HANDLERS.get(cmd.name)
        try:
            if fn is None:
                raise CommandError(
                    "UnknownCommand",
                    f"{hostname} does not know the command {cmd.name!r} "
                    f"(it knows: {', '.join(sorted(HANDLERS))})",
                )
            try:
                arguments = check_arguments(cmd.name, cmd.arguments)
            except ValueError as exc:
                raise CommandError("BadArguments", str(exc)) from None
            result = await fn(self.worker, arguments)
        except CommandError as exc:
            return ControlReply(
                cmd.id, cmd.name, hostname, self.pid, False, None, exc.error_type, str(exc)
            )
        except Exception as exc:
            log.exception("control command %s failed", cmd.name)
            return ControlReply(
                cmd.id,
                cmd.name,
                hostname,
                self.pid,
                False,
                None,
                "InternalError",
                f"{type(exc).__name__}: {exc}",
            )
        return ControlReply(cmd.id, cmd.name, hostname, self.pid, True, result)

    async def _answer(self, cmd: Command, props: Properties) -> None:
        reply = await self.run(cmd)
        acts = COMMANDS[cmd.name].group == "control" if cmd.name in COMMANDS else False
        log.log(
            logging.INFO if acts else logging.DEBUG,
            "control command %s: %s",
            cmd.name,
            "done" if reply.ok else f"{reply.error_type}: {reply.error_message}",
        )
        if not props.reply_to:
            return
        out = Properties(
            content_type=CONTENT_TYPE_JSON,
            correlation_id=props.correlation_id or cmd.id,
            delivery_mode=1,
        )
        try:
            await self.worker.publisher.publish("", props.reply_to, encode_reply(reply), out)
        except Exception as exc:  # the caller gave up waiting (its reply queue is gone)
            log.debug("control reply for %s not delivered: %s", cmd.name, exc)


# -- the commands --------------------------------------------------------------------------------
def _held(worker: Worker, which: dict[int, Any]) -> list[dict[str, Any]]:
    now = time.time()
    out = [h.describe(now) for h in which.values()]
    for entry in out:
        entry["pid"] = worker.control.pid
    return sorted(out, key=lambda e: (e.get("started") or e["received"], e["id"]))


@handler("ping")
async def ping(worker: Worker, arguments: Mapping[str, Any]) -> Any:
    return {"pong": True, "uptime": round(time.time() - worker.stats.started, 3)}


@handler("active")
async def active(worker: Worker, arguments: Mapping[str, Any]) -> Any:
    return _held(worker, worker.tracker.active)


@handler("reserved")
async def reserved(worker: Worker, arguments: Mapping[str, Any]) -> Any:
    return _held(worker, worker.tracker.reserved)


@handler("stats")
async def stats(worker: Worker, arguments: Mapping[str, Any]) -> Any:
    s = worker.stats
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "pid": worker.control.pid,
        "uptime": round(time.time() - s.started, 3),
        "started": rfc3339(s.started),
        "pool": worker.options.pool,
        "concurrency": worker.pool.size,
        "prefetch": worker.pool.prefetch,
        "prefetch_in_use": worker.consuming.held,
        "autoscale": _autoscale(worker),
        "queues": list(worker.consuming.queues),
        "processed": s.processed,
        "running": len(worker.tracker.active),
        "reserved": len(worker.tracker.reserved),
        "by_task": s.by_task(),
        "reconnects": s.reconnects,
        "events": {
            "enabled": worker.events is not None,
            "published": s.events_published,
            "dropped": s.events_dropped,
        },
        "revocations": worker.revocations.describe(),
        "rate_limits": worker.throttle.describe(),
        "rusage": {
            "utime": usage.ru_utime,
            "stime": usage.ru_stime,
            "maxrss_kib": usage.ru_maxrss,
        },
    }


def _policy(worker: Worker, name: str) -> dict[str, Any]:
    policy = worker.policies[name]
    out: dict[str, Any] = {f.name: getattr(policy, f.name) for f in fields(policy)}
    limit = policy.rate_limit
    out["rate_limit"] = limit.describe() if limit is not None and limit.active else None
    # The decorator's exception classes and the config's class names, as names.
    classes = [c.__name__ for c in worker.tasks[name].autoretry_for]
    out["autoretry_for"] = classes + [n for n in policy.autoretry_for or () if n not in classes]
    return out


@handler("registered")
async def registered(worker: Worker, arguments: Mapping[str, Any]) -> Any:
    return {
        name: {
            "async": task.is_async,
            "bind": task.bind,
            "policy": _policy(worker, name),
        }
        for name, task in sorted(worker.tasks.items())
    }


@handler("conf")
async def conf(worker: Worker, arguments: Mapping[str, Any]) -> Any:
    s = worker.settings
    o = worker.options
    return {
        "source": s.source,
        "hostname": worker.hostname,
        "broker": {
            "url": s.broker.display,
            "publish_timeout": s.broker.publish_timeout,
            "heartbeat": s.broker.heartbeat,
            "consumer_timeout": s.broker.consumer_timeout,
            "reconnect_max_delay": s.broker.reconnect_max_delay,
        },
        "imports": list(s.imports),
        "queues": list(worker.consuming.queues),
        "worker": {
            "pool": o.pool,
            "concurrency": o.concurrency,
            "prefetch_multiplier": o.prefetch_multiplier,
            "prefetch": o.prefetch,
            "declare": o.declare,
            "max_tasks_per_child": o.max_tasks_per_child,
            "max_memory_per_child": o.max_memory_per_child,
        },
        "events": {
            "enabled": worker.events is not None,
            "send_sent": s.events.send_sent,
            "heartbeat_interval": s.events.heartbeat_interval,
        },
        "results": {"ignore_result": s.results.ignore_result},
        "revoke": {"expires": s.revoke.expires, "max_ids": s.revoke.max_ids},
        "serialization": {
            "accept": sorted(s.accept),
            "max_body_size": s.max_body_size,
            "celery_ingest": s.celery_ingest,
        },
        "timezone": s.timezone,
        "schedules": [sch.name for sch in s.schedules],
    }


@handler("query-task")
async def query_task(worker: Worker, arguments: Mapping[str, Any]) -> Any:
    out = {}
    for task_id in arguments["ids"]:
        state, held = worker.tracker.state_of(task_id)
        entry: dict[str, Any] = {"state": state}
        if held:
            entry["deliveries"] = [h.describe() for h in held]
        out[task_id] = entry
    return out


@handler("shutdown")
async def shutdown(worker: Worker, arguments: Mapping[str, Any]) -> Any:
    log.warning("control: warm shutdown requested")
    asyncio.get_running_loop().call_soon(worker.request_stop)
    return {"shutdown": "warm", "running": len(worker.tracker.active)}


def _known_queue(worker: Worker, queue: str) -> None:
    declared = [q.name for q in worker.settings.topology.work_queues()]
    if queue not in declared:
        raise CommandError(
            "UnknownQueue",
            f"queue {queue!r} is not declared in {worker.settings.source} "
            f"(declared: {', '.join(declared)})",
        )


@handler("add-consumer")
async def add_consumer(worker: Worker, arguments: Mapping[str, Any]) -> Any:
    queue = arguments["queue"]
    _known_queue(worker, queue)
    if queue in worker.consuming.queues:
        raise CommandError("AlreadyConsuming", f"{worker.hostname} already consumes {queue!r}")
    await worker.consuming.add_queue(queue)
    return {"queues": list(worker.consuming.queues)}


@handler("cancel-consumer")
async def cancel_consumer(worker: Worker, arguments: Mapping[str, Any]) -> Any:
    queue = arguments["queue"]
    if queue not in worker.consuming.queues:
        raise CommandError("NotConsuming", f"{worker.hostname} does not consume {queue!r}")
    await worker.consuming.cancel_queue(queue)
    return {"queues": list(worker.consuming.queues)}


# -- the pool's size ---------------------------------------------------------------------------
def _autoscale(worker: Worker) -> dict[str, int] | None:
    scaler = worker.pool.autoscaler
    return None if scaler is None else {"max": scaler.maximum, "min": scaler.minimum}


def _pool(worker: Worker) -> dict[str, Any]:
    return {
        "concurrency": worker.pool.size,
        "prefetch": worker.pool.prefetch,
        "autoscale": _autoscale(worker),
    }


@handler("pool-grow")
async def pool_grow(worker: Worker, arguments: Mapping[str, Any]) -> Any:
    try:
        await worker.pool.grow(arguments["n"])
    except ValueError as exc:
        raise CommandError("BadArguments", str(exc)) from None
    return _pool(worker)


@handler("pool-shrink")
async def pool_shrink(worker: Worker, arguments: Mapping[str, Any]) -> Any:
    try:
        await worker.pool.shrink(arguments["n"])
    except ValueError as exc:
        raise CommandError("BadArguments", str(exc)) from None
    return _pool(worker)


@handler("autoscale")
async def autoscale(worker: Worker, arguments: Mapping[str, Any]) -> Any:
    try:
        # The worker's --autoscale-idle holds however autoscaling was turned on.
        await worker.pool.autoscale(
            arguments["max"], arguments["min"], idle=worker.options.autoscale_idle
        )
    except ValueError as exc:
        raise CommandError("BadArguments", str(exc)) from None
    return _pool(worker)


@handler("revoke")
async def revoke(worker: Worker, arguments: Mapping[str, Any]) -> Any:
    """The ids never start here until the revocation expires (the client stored it in the
    stream already, which this worker follows too); with ``terminate`` what runs is stopped."""
    ids = list(dict.fromkeys(arguments["ids"]))
    expires = arguments.get("expires", worker.settings.revoke.expires)
    if not 0 < expires <= MAX_REVOKE_EXPIRES:
        raise CommandError(
            "BadArguments", f"expires must be > 0 and at most {MAX_REVOKE_EXPIRES:.0f} seconds"
        )
    until = time.time() + expires
    worker.revocations.revoke(ids, until)
    terminated = worker.revocations.terminate(ids) if arguments.get("terminate") else []
    if terminated:
        log.warning("control: terminated %s", ", ".join(terminated))
    return {"revoked": ids, "terminated": terminated, "expires": rfc3339(until)}


def _task(worker: Worker, name: str) -> TaskPolicy:
    policy = worker.policies.get(name)
    if policy is None:
        known = ", ".join(sorted(worker.policies)) or "none"
        raise CommandError(
            "UnknownTask", f"task {name!r} is not registered on {worker.hostname} (known: {known})"
        )
    return policy


def _set_policy(worker: Worker, name: str, policy: TaskPolicy) -> None:
    """Change one task's policy from now on, and tell the parts that cache from it."""
    worker.policies[name] = policy
    worker.fast.refresh()
    worker.throttle.refresh()


def _limit(limit: RateLimit | None) -> dict[str, Any] | None:
    return limit.describe() if limit is not None and limit.active else None


@handler("rate-limit")
async def rate_limit_command(worker: Worker, arguments: Mapping[str, Any]) -> Any:
    name = arguments["task"]
    policy = _task(worker, name)
    was = policy.rate_limit
    try:
        new = rate_limit(
            arguments["rate"],
            arguments.get("scope") or (was.scope if was is not None and was.active else None),
            was.burst if was is not None else None,
        )
    except ValueError as exc:
        raise CommandError("BadArguments", f"rate-limit: {exc}") from None
    _set_policy(worker, name, replace(policy, rate_limit=new))
    log.warning("control: task %s rate limit %s (was %s)", name, new, was or "off")
    return {"task": name, "rate_limit": _limit(new), "was": _limit(was)}


@handler("time-limit")
async def time_limit_command(worker: Worker, arguments: Mapping[str, Any]) -> Any:
    name = arguments["task"]
    policy = _task(worker, name)
    # SOFT below HARD was checked by check_arguments (Control.run, for every command): the
    # same words whichever client sent it. What only a worker knows is checked here.
    soft, hard = arguments["soft"], arguments["hard"]
    timeout = worker.settings.broker.consumer_timeout
    if hard >= timeout:
        raise CommandError(
            "BadArguments",
            f"time-limit: hard {hard:g}s is not below the broker's consumer_timeout "
            f"({timeout:g}s, broker.consumer_timeout)",
        )
    _set_policy(worker, name, replace(policy, soft_time_limit=soft, time_limit=hard))
    if (soft or hard) and not worker.tasks[name].is_async and worker.options.pool == "asyncio":
        log.warning("task %s: --pool asyncio cannot enforce time limits of sync tasks", name)
    log.warning("control: task %s soft_time_limit %gs, time_limit %gs", name, soft, hard)
    return {"task": name, "soft_time_limit": soft, "time_limit": hard}
