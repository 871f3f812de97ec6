"""The REST API: Flower's paths (so scripts written for Flower work unchanged) and ours
(dead letters, schedules, queues, the broker, the live stream). ``/openapi.json``
(:mod:`.openapi`) documents every path; a test checks it against the real server.

Handlers reach the rest of amqptasks only through public APIs: ``App`` (publish, results,
``app.control``), the history (events), :mod:`amqptasks.deadletters` and the management
API. Blocking calls (the sync control client, result stores, SQLite reads) run in threads,
so a slow one never stalls the page streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from aiohttp import web

from ..control import COMMANDS
from ..deadletters import ReplayLedger, browse, purge, replay
from ..errors import AmqpTasksError, ResultError, RoutingError, TaskError, UnroutableError
from ..events import rfc3339
from ..protocol import dumps, loads
from ..schedule import format_utc
from ..topology import DLQ_SUFFIX, dlq_name
from .broker_api import BrokerApiError
from .history import READY_STATES, STATES, TaskQuery
from .live import KEEPALIVE
from .server import DASHBOARD, STREAMING, Dashboard

__all__ = ["add_routes"]

#: Options of async-apply/send-task taken from the body, besides args and kwargs.
SEND_OPTIONS = ("countdown", "eta", "expires", "queue", "routing_key", "exchange", "priority")
#: Seconds the list of registered task names (from the workers) is reused.
REGISTERED_TTL = 10.0


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _dash(request: web.Request) -> Dashboard:
    return request.app[DASHBOARD]


async def _json_body(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object whatever the Content-Type (curl -d sends a form type, and
    Flower reads the body as JSON too); an empty body is ``{}``."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = loads(raw)
    except Exception:
        raise _bad("the body is not JSON") from None
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    return body


def _bad(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=dumps({"error": message}).decode(), content_type="application/json"
    )


# -- tasks -----------------------------------------------------------------------------------
async def _known_tasks(dash: Dashboard) -> set[str]:
    """Task names some worker registered (asked with ``inspect registered``, reused for
    :data:`REGISTERED_TTL` s) plus every name in the history."""
    at, names = dash.registered
    if time.monotonic() - at > REGISTERED_TTL:
        online = [
            w["hostname"]
            for w in _workers(dash, await _history_workers(dash))
            if w["status"] == "online"
        ]
        replies = await asyncio.to_thread(
            dash.app.control.inspect_registered, timeout=1.0, destination=online or None
        )
        names = {name for r in replies.values() if r.ok for name in (r.result or {})}
        dash.registered = (time.monotonic(), names)
    return names | set(await asyncio.to_thread(dash.history.task_names))


def _options(body: dict[str, Any]) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    args = body.get("args", [])
    kwargs = body.get("kwargs", {})
    if not isinstance(args, list):
        raise _bad("'args' must be a JSON array")
    if not isinstance(kwargs, dict):
        raise _bad("'kwargs' must be a JSON object")
    unknown = set(body) - {"args", "kwargs", *SEND_OPTIONS}
    if unknown:
        raise _bad(f"unknown field(s) {', '.join(sorted(unknown))}")
    options = {k: body[k] for k in SEND_OPTIONS if body.get(k) is not None}
    for key in ("eta", "expires"):
        value = options.get(key)
        if isinstance(value, str):
            try:
                when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
            except ValueError:
                raise _bad(f"'{key}' must be an ISO 8601 time or seconds, got {value!r}") from None
            options[key] = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    return args, kwargs, options


async def _send(request: web.Request, check_known: bool) -> web.Response:
    dash = _dash(request)
    name = request.match_info["name"]
    body = await _json_body(request)
    args, kwargs, options = _options(body)
    topology = dash.settings.topology
    exchange, queue = options.get("exchange"), options.get("queue")
    if (
        isinstance(exchange, str)
        and exchange
        and exchange not in {e.name for e in topology.exchanges}
    ):
        return _error(400, f"exchange {exchange!r} is not declared in {dash.settings.source}")
    work_queues = {q.name for q in topology.work_queues()}
    if isinstance(queue, str) and (topology.queue(queue) is None or queue not in work_queues):
        return _error(400, f"queue {queue!r} is not a work queue of {dash.settings.source}")
    key = options.get("routing_key")
    if exchange == "" and isinstance(key, str) and key not in work_queues:
        # The default exchange routes by queue name: the same rule as 'queue', or any queue
        # of the vhost (a DLQ, the revocation stream) would take a task envelope.
        return _error(
            400,
            f"routing key {key!r} on the default exchange is not a work queue of "
            f"{dash.settings.source}",
        )
    try:
        known = not check_known or name in await _known_tasks(dash)
    except AmqpTasksError as exc:  # asking the workers which tasks they know needs the broker
        return _error(502, f"not sent: the workers could not be asked for task {name!r}: {exc}")
    if not known:
        return _error(
            404,
            f"unknown task {name!r}: no worker registered it and the history never saw it "
            "(send-task sends any name)",
        )
    try:
        handle = await dash.app.send_task_async(name, tuple(args), kwargs, **options)
    except (TypeError, ValueError, RoutingError, UnroutableError) as exc:
        return _error(400, f"not sent: {exc}")
    except AmqpTasksError as exc:
        # The broker's 404 (an exchange that does not exist) is the request's fault too.
        return _error(400 if "NOT_FOUND" in str(exc) else 502, f"not sent: {exc}")
    dash.remember(handle)
    return web.json_response({"task-id": handle.id, "state": "PENDING"})


async def async_apply(request: web.Request) -> web.Response:
    return await _send(request, check_known=True)


async def send_task(request: web.Request) -> web.Response:
    return await _send(request, check_known=False)


def _preview_value(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return loads(text)
    except Exception:
        return text  # a cut preview (ends with …) or repr text


async def task_result(request: web.Request) -> web.Response:
    dash = _dash(request)
    task_id = request.match_info["id"]
    try:
        timeout = float(request.query.get("timeout", "0"))
    except ValueError:
        return _error(400, "timeout must be seconds")
    timeout = max(0.0, min(timeout, 10.0))
    handle = dash.submitted.get(task_id) or dash.app.AsyncResult(task_id)

    def read() -> dict[str, Any] | None:
        if timeout:
            with contextlib.suppress(ResultError, TaskError):
                handle.get(timeout=timeout, propagate=False)
        try:
            state = handle.state
        except ResultError:
            return None
        if state == "PENDING":
            return None
        out: dict[str, Any] = {"task-id": task_id, "state": state, "result": None}
        if state == "SUCCESS":
            out["result"] = handle.result
        elif state in READY_STATES:
            err = handle.result
            kind = getattr(err, "exc_type", None) or type(err).__name__
            out["result"] = f"{kind}: {err}"
            out["traceback"] = handle.traceback
        return out

    try:
        found = await asyncio.to_thread(read)
    except AmqpTasksError as exc:
        return _error(502, str(exc))
    if found is not None:
        return web.json_response(found)
    # No store record and no reply: what the events said.
    task = await asyncio.to_thread(dash.history.task, task_id)
    if task is None:
        return web.json_response({"task-id": task_id, "state": "PENDING", "result": None})
    out: dict[str, Any] = {"task-id": task_id, "state": task["state"], "result": None}
    if task["state"] == "SUCCESS":
        out["result"] = _preview_value(task["result"])
    elif task["exception"]:
        out["result"] = f"{task['exception'].get('type')}: {task['exception'].get('message')}"
        out["traceback"] = task["traceback"]
    out["source"] = "events"
    return web.json_response(out)


def _flower_task(t: dict[str, Any]) -> dict[str, Any]:
    """A history row in Flower's field names (plus ours)."""
    out = dict(t)
    out["uuid"] = t["id"]
    out["timestamp"] = t.get("updated")
    if t.get("state") == "SUCCESS":
        out["succeeded"] = t.get("finished")
    elif t.get("state") == "FAILURE":
        out["failed"] = t.get("finished")
    return out


async def task_info(request: web.Request) -> web.Response:
    task = await asyncio.to_thread(_dash(request).history.task, request.match_info["id"])
    if task is None:
        return _error(404, f"no task {request.match_info['id']!r} in the history")
    return web.json_response(_flower_task(task))


def _int(request: web.Request, key: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(key)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _bad(f"'{key}' must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise _bad(f"'{key}' must be between {low} and {high}, got {value}")
    return value


def _time(request: web.Request, key: str) -> str | None:
    raw = request.query.get(key)
    if not raw:
        return None
    try:
        when = datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
    except ValueError:
        try:
            return rfc3339(float(raw))
        except ValueError:
            raise _bad(f"'{key}' must be an ISO 8601 time or a POSIX time, got {raw!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    try:
        return rfc3339(when.timestamp())
    except (OverflowError, ValueError, OSError):
        raise _bad(f"'{key}' is out of range: {raw!r}") from None


def _state(request: web.Request) -> str | None:
    state = request.query.get("state") or None
    if state is not None and state.upper() not in STATES:
        raise _bad(f"unknown state {state!r} (one of {', '.join(STATES)})")
    return state.upper() if state else None


def _query(request: web.Request, *, flower: bool) -> TaskQuery:
    before = None
    cursor = request.query.get("before")
    if cursor:
        ts, _, seq = cursor.rpartition(",")
        try:
            before = (ts, int(seq))
        except ValueError:
            raise _bad(f"'before' must be a cursor from 'next', got {cursor!r}") from None
    sort = request.query.get("sort_by", "-received")
    if sort not in ("received", "-received", "ts", "-ts"):
        raise _bad("'sort_by' must be received or -received")
    return TaskQuery(
        state=_state(request),
        name=request.query.get("taskname" if flower else "name") or None,
        worker=request.query.get("workername" if flower else "worker") or None,
        queue=request.query.get("queue") or None,
        search=request.query.get("search") or None,
        since=_time(request, "received_start" if flower else "since"),
        until=_time(request, "received_end" if flower else "until"),
        before=before,
        offset=_int(request, "offset", 0, 0, 10_000_000),
        limit=_int(request, "limit", 100 if flower else 50, 1, 1000),
        oldest_first=not sort.startswith("-"),
    )


async def tasks_flower(request: web.Request) -> web.Response:
    page = await asyncio.to_thread(_dash(request).history.tasks, _query(request, flower=True))
    return web.json_response({t["id"]: _flower_task(t) for t in page["tasks"]})


async def task_list(request: web.Request) -> web.Response:
    page = await asyncio.to_thread(_dash(request).history.tasks, _query(request, flower=False))
    return web.json_response(page)


async def task_types(request: web.Request) -> web.Response:
    return web.json_response({"task-types": sorted(await _known_tasks(_dash(request)))})


async def _command(
    dash: Dashboard,
    command: str,
    arguments: dict[str, Any],
    destination: list[str] | None,
    done: str,
) -> web.Response:
    """Run a control command; 501 when the workers have no such command yet."""
    if command not in COMMANDS:
        return _error(
            501,
            f"the workers have no {command!r} control command yet (docs/control.md lists "
            f"what they answer: {', '.join(COMMANDS)})",
        )
    try:
        # send(), not broadcast(): it does the client's part first (a revoke is stored in the
        # broker's revocations stream, so it holds for workers that are down or start later).
        replies = await asyncio.to_thread(
            dash.app.control.send, command, arguments, destination=destination, timeout=2.0
        )
    except ValueError as exc:
        return _error(400, str(exc))
    except AmqpTasksError as exc:
        return _error(502, str(exc))
    if not replies and COMMANDS[command].stored:
        return web.json_response({"message": done, "replies": {}})  # kept by the broker
    if not replies:
        who = ", ".join(destination) if destination else "no worker"
        return _error(404, f"{who} did not answer within 2s")
    failed = {h: f"{r.error_type}: {r.error_message}" for h, r in replies.items() if not r.ok}
    if failed:
        return web.json_response(
            {"error": "; ".join(f"{h}: {m}" for h, m in failed.items())}, status=400
        )
    return web.json_response(
        {"message": done, "replies": {h: r.result for h, r in replies.items()}}
    )


async def revoke(request: web.Request) -> web.Response:
    task_id = request.match_info["id"]
    args = {"ids": [task_id]}
    if request.query.get("terminate") in ("1", "true", "True"):
        args["terminate"] = True  # type: ignore[assignment]
    return await _command(_dash(request), "revoke", args, None, f"Revoked '{task_id}'")


async def rate_limit(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    body = await _json_body(request) if request.can_read_body else {}
    value = request.query.get("ratelimit") or body.get("ratelimit")
    if not value:
        return _error(400, "give ratelimit (e.g. 10/m)")
    return await _command(
        _dash(request),
        "rate-limit",
        {"task": name, "rate": str(value)},
        request.query.getall("workername", None),
        f"new rate limit set successfully for {name}",
    )


async def time_limit(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    # As Celery's time_limit: both limits are set, one not given is none (0).
    args: dict[str, Any] = {"task": name}
    for key in ("soft", "hard"):
        args[key] = request.query.get(key) or "0"
    return await _command(
        _dash(request),
        "time-limit",
        args,
        request.query.getall("workername", None),
        f"time limits set successfully for {name}",
    )


# -- workers ---------------------------------------------------------------------------------
async def _history_workers(dash: Dashboard) -> list[dict[str, Any]]:
    return await asyncio.to_thread(dash.history.workers)


def _workers(dash: Dashboard, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Online workers (the last event is not worker-offline and is younger than 2.5 x its
    heartbeat interval) first, then offline ones."""
    now = time.time()
    out = []
    for w in rows:
        info = w["info"]
        try:
            seen = datetime.fromisoformat(str(w["time"]).replace("Z", "+00:00")).timestamp()
        except ValueError:
            seen = 0.0
        interval = float(info.get("interval") or 2.0)
        age = max(0.0, now - seen)
        online = w["type"] != "worker-offline" and age < 2.5 * interval
        out.append(
            {
                "hostname": w["hostname"],
                "status": "online" if online else "offline",
                "heartbeat_age": round(age, 1),
                "last_event": w["type"],
                "time": w["time"],
                "pid": info.get("pid"),
                "pool": info.get("pool"),
                "concurrency": info.get("concurrency"),
                "prefetch": info.get("prefetch"),
                "queues": info.get("queues") or [],
                "active": info.get("active"),
                "reserved": info.get("reserved"),
                "processed": info.get("processed"),
                "loadavg": info.get("loadavg"),
                "sw": info.get("sw"),
                "interval": interval,
            }
        )
    out.sort(key=lambda w: (w["status"] != "online", w["hostname"]))
    return out


async def workers(request: web.Request) -> web.Response:
    dash = _dash(request)
    rows = _workers(dash, await _history_workers(dash))
    name = request.query.get("workername")
    if name:
        rows = [w for w in rows if w["hostname"] == name]
    status = request.query.get("status")
    if status in ("online", "offline"):
        rows = [w for w in rows if w["status"] == status]
    if request.query.get("refresh") in ("1", "true", "True"):
        replies = await asyncio.to_thread(dash.app.control.inspect_stats, timeout=1.0)
        for w in rows:
            r = replies.get(w["hostname"])
            w["stats"] = r.result if r is not None and r.ok else None
    return web.json_response({w["hostname"]: w for w in rows})


def _worker_command(command: str, done: str) -> Any:
    async def handler(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        args: dict[str, Any] = {}
        if command in ("add-consumer", "cancel-consumer"):
            queue = request.query.get("queue") or (await _json_body(request)).get("queue")
            if not queue or not isinstance(queue, str):
                return _error(400, "give the queue (?queue=NAME)")
            args["queue"] = queue
        elif command in ("pool-grow", "pool-shrink"):
            args["n"] = _int(request, "n", 1, 1, 10_000)
        elif command == "autoscale":
            args["max"] = _int(request, "max", 1, 1, 10_000)
            args["min"] = _int(request, "min", 1, 1, 10_000)
        return await _command(_dash(request), command, args, [name], done)

    return handler


# -- queues, broker --------------------------------------------------------------------------
async def queues_length(request: web.Request) -> web.Response:
    dash = _dash(request)
    try:
        queues = {q["name"]: q for q in await dash.broker.queues()}
    except BrokerApiError as exc:
        return _error(502, str(exc))
    names = [q.name for q in dash.settings.topology.work_queues()]
    return web.json_response(
        {
            "active_queues": [
                {"name": n, "messages": int((queues.get(n) or {}).get("messages", 0))}
                for n in names
            ]
        }
    )


async def queues_detail(request: web.Request) -> web.Response:
    dash = _dash(request)
    try:
        queues = await dash.broker.queues()
    except BrokerApiError as exc:
        return _error(502, str(exc))
    return web.json_response({"queues": queues})


async def broker_overview(request: web.Request) -> web.Response:
    dash = _dash(request)
    try:
        overview = await dash.broker.overview()
    except BrokerApiError as exc:
        return _error(502, str(exc))
    return web.json_response(overview)


# -- dead letters ----------------------------------------------------------------------------
def _dlq_queue(dash: Dashboard, queue: str) -> str:
    name = queue if queue.endswith(DLQ_SUFFIX) else dlq_name(queue)
    if dash.settings.topology.queue(name[: -len(DLQ_SUFFIX)]) is None:
        raise web.HTTPNotFound(
            text='{"error": "not a dead-letter queue of this config"}',
            content_type="application/json",
        )
    return name


async def dlq_list(request: web.Request) -> web.Response:
    dash = _dash(request)
    names = [dlq_name(q.name) for q in dash.settings.topology.work_queues()]
    depths: dict[str, Any] = {}
    with contextlib.suppress(BrokerApiError):
        depths = {q["name"]: q["messages"] for q in await dash.broker.queues()}
    return web.json_response({"queues": [{"name": n, "messages": depths.get(n)} for n in names]})


async def dlq_browse(request: web.Request) -> web.Response:
    dash = _dash(request)
    name = _dlq_queue(dash, request.match_info["queue"])
    limit = _int(request, "limit", 100, 1, 1000)
    try:
        letters = await browse(dash.settings.broker.urls, name, limit)
    except AmqpTasksError as exc:
        return _error(502, str(exc))
    return web.json_response(
        {
            "queue": name,
            "letters": [
                {
                    "id": d.id,
                    "task": d.task,
                    "reason": d.reason,
                    "detail": d.detail,
                    "exception": d.exception,
                    "attempts": d.attempts,
                    "first_failed_at": d.first_failed_at,
                    "last_failed_at": d.last_failed_at,
                    "original_exchange": d.original_exchange,
                    "original_routing_key": d.original_routing_key,
                    "worker": d.worker,
                    "traceback": d.traceback,
                }
                for d in letters
            ],
        }
    )


async def dlq_replay(request: web.Request) -> web.Response:
    dash = _dash(request)
    name = _dlq_queue(dash, request.match_info["queue"])
    body = await _json_body(request)
    ids = body.get("ids") or []
    every = body.get("all") is True
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        return _error(400, "'ids' must be a list of message ids")
    if bool(ids) == every:
        return _error(400, "give 'ids' or 'all': true (not both)")
    ledger = ReplayLedger(dash.ledger)
    try:
        moved, problems, skipped = await replay(
            dash.settings, name, set(ids), every, None, ledger, body.get("force") is True
        )
    except AmqpTasksError as exc:
        return _error(502, str(exc))
    finally:
        ledger.close()
    return web.json_response({"replayed": moved, "problems": problems, "skipped": dict(skipped)})


async def dlq_purge(request: web.Request) -> web.Response:
    dash = _dash(request)
    name = _dlq_queue(dash, request.match_info["queue"])
    body = await _json_body(request)
    if body.get("confirm") != name:
        return _error(400, f'confirm by sending {{"confirm": "{name}"}}')
    try:
        count = await purge(dash.settings.broker.urls, name)
    except AmqpTasksError as exc:
        return _error(502, str(exc))
    return web.json_response({"purged": count})


# -- schedules, stats, charts, live ----------------------------------------------------------
async def schedules(request: web.Request) -> web.Response:
    dash = _dash(request)
    now = datetime.now(timezone.utc)
    out = []
    for s in dash.settings.schedules:
        fires = []
        fire = now
        for _ in range(3):
            fire = s.next_after(fire)
            fires.append(format_utc(fire))
        out.append(
            {
                "name": s.name,
                "task": s.task,
                "timing": s.timing.describe(),
                "timezone": s.timezone,
                "catch_up": s.catch_up,
                "next": fires,
            }
        )
    return web.json_response({"source": dash.settings.source, "schedules": out})


def stats_of(dash: Dashboard, rows: list[dict[str, Any]]) -> dict[str, Any]:
    st = dash.ingestor.stats
    online = [w for w in _workers(dash, rows) if w["status"] == "online"]
    return {
        "events": st.events,
        "messages": st.messages,
        "batches": st.batches,
        "undecodable": st.undecodable,
        "pruned": st.pruned,
        "lag": round(st.lag, 3),
        "connected": st.connected,
        "ingest_error": st.error,
        "seconds_since_event": round(time.time() - st.last_event_at, 1)
        if st.last_event_at
        else None,
        "workers_online": len(online),
        "events_hint": not online,
        "broker_error": dash.broker_error,
    }


async def stats(request: web.Request) -> web.Response:
    dash = _dash(request)
    rows = await _history_workers(dash)
    out = stats_of(dash, rows)
    out["tasks"] = await asyncio.to_thread(dash.history.count)
    out["file_bytes"] = await asyncio.to_thread(dash.history.file_size)
    return web.json_response(out)


async def charts(request: web.Request) -> web.Response:
    dash = _dash(request)
    since = rfc3339((datetime.now(timezone.utc) - timedelta(minutes=60)).timestamp())
    rows = await asyncio.to_thread(dash.history.minute_counts, since)
    minutes: dict[str, dict[str, int]] = {}
    for minute, state, n in rows:
        minutes.setdefault(minute, {})[state] = n
    depth = [{"time": rfc3339(t), "queues": q} for t, q in list(dash.broker.samples)[-360:]]
    return web.json_response(
        {
            "minutes": [{"minute": m, "counts": c} for m, c in sorted(minutes.items())],
            "depth": depth,
        }
    )


async def live(request: web.Request) -> web.StreamResponse:
    dash = _dash(request)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
    )
    await response.prepare(request)
    request[STREAMING] = response
    q = dash.live.subscribe()
    try:
        await response.write(b"retry: 2000\n\n")
        while True:
            try:
                frame = await asyncio.wait_for(q.get(), KEEPALIVE)
            except TimeoutError:
                frame = b": keepalive\n\n"
            if frame is None:
                break
            await response.write(frame)
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        dash.live.unsubscribe(q)
    return response


async def healthcheck(_request: web.Request) -> web.Response:
    return web.Response(text="OK")


async def openapi_json(_request: web.Request) -> web.Response:
    from .openapi import document

    return web.json_response(document())


async def metrics(request: web.Request) -> web.Response:
    from .metrics import render

    body = await asyncio.to_thread(render, _dash(request))
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/healthcheck", healthcheck)
    r.add_get("/openapi.json", openapi_json)
    r.add_get("/metrics", metrics)
    r.add_post("/api/task/async-apply/{name}", async_apply)
    r.add_post("/api/task/send-task/{name}", send_task)
    r.add_get("/api/task/result/{id}", task_result)
    r.add_get("/api/task/info/{id}", task_info)
    r.add_get("/api/tasks", tasks_flower)
    r.add_get("/api/task/types", task_types)
    r.add_post("/api/task/revoke/{id}", revoke)
    r.add_post("/api/task/rate-limit/{name}", rate_limit)
    r.add_post("/api/task/timeout/{name}", time_limit)
    r.add_get("/api/workers", workers)
    r.add_post("/api/worker/shutdown/{name}", _worker_command("shutdown", "Shutting down!"))
    r.add_post("/api/worker/pool/grow/{name}", _worker_command("pool-grow", "Pool grown"))
    r.add_post("/api/worker/pool/shrink/{name}", _worker_command("pool-shrink", "Pool shrunk"))
    r.add_post("/api/worker/pool/autoscale/{name}", _worker_command("autoscale", "Autoscale set"))
    r.add_post(
        "/api/worker/queue/add-consumer/{name}",
        _worker_command("add-consumer", "add consumer done"),
    )
    r.add_post(
        "/api/worker/queue/cancel-consumer/{name}",
        _worker_command("cancel-consumer", "cancel consumer done"),
    )
    r.add_get("/api/queues/length", queues_length)
    r.add_get("/api/queues", queues_detail)
    r.add_get("/api/broker", broker_overview)
    r.add_get("/api/task-list", task_list)
    r.add_get("/api/dlq", dlq_list)
    r.add_get("/api/dlq/{queue}", dlq_browse)
    r.add_post("/api/dlq/{queue}/replay", dlq_replay)
    r.add_post("/api/dlq/{queue}/purge", dlq_purge)
    r.add_get("/api/schedules", schedules)
    r.add_get("/api/stats", stats)
    r.add_get("/api/charts", charts)
    r.add_get("/api/live", live)
