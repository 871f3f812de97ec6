"""``/openapi.json``: the REST API as OpenAPI 3.0, built here by hand (one table per path)
and checked against the real server by the test suite (schemathesis)."""

from __future__ import annotations

from typing import Any

from .history import STATES

__all__ = ["document"]

_ERROR = {"$ref": "#/components/schemas/Error"}
_OBJ: dict[str, Any] = {"type": "object"}
_STR = {"type": "string"}
_TIME = {"type": "string", "format": "date-time"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "bad input (the message says which)",
        401: "no or wrong credentials",
        403: "cross-site request, or a session request without its CSRF token",
        404: "not found",
        501: "the workers have no such control command yet",
        502: "the broker or its management API failed",
    }
    return {str(c): _json(_ERROR, text[c]) for c in (401, 403, *codes)}


def _path(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": _STR,
        "description": description,
    }


def _query(
    name: str, schema: dict[str, Any], description: str, required: bool = False
) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "schema": schema,
        "description": description,
    }


_SEND_BODY = {
    "required": False,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "args": {"type": "array"},
                    "kwargs": {"type": "object"},
                    "countdown": {"type": "number"},
                    "eta": {"type": "string", "format": "date-time"},
                    "expires": {
                        "oneOf": [{"type": "number"}, {"type": "string", "format": "date-time"}]
                    },
                    "queue": _STR,
                    "routing_key": _STR,
                    "exchange": _STR,
                    "priority": {"type": "integer", "minimum": 0, "maximum": 255},
                },
            }
        }
    },
}
_SENT = {
    "type": "object",
    "required": ["task-id", "state"],
    "properties": {"task-id": _STR, "state": _STR},
}
_LIST_FILTERS = [
    _query("state", {"type": "string", "enum": list(STATES)}, "task state"),
    _query("queue", _STR, "work queue"),
    _query("search", _STR, "a task id, or text in the name, args or kwargs"),
    _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "page size"),
    _query("offset", {"type": "integer", "minimum": 0, "maximum": 10000000}, "rows to skip"),
    _query("sort_by", {"type": "string", "enum": ["received", "-received"]}, "order"),
]
_COMMAND = {
    "type": "object",
    "required": ["message"],
    "properties": {"message": _STR, "replies": {"type": "object"}},
}


def _post(summary: str, params: list[dict[str, Any]], ok: dict[str, Any], *codes: int,
          body: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    op: dict[str, Any] = {
        "summary": summary,
        "parameters": params,
        "responses": {"200": _json(ok), **_errors(*codes)},
    }
    if body is not None:
        op["requestBody"] = body
    return {"post": op}


def _get(summary: str, params: list[dict[str, Any]], ok: dict[str, Any], *codes: int,
         content: str = "application/json") -> dict[str, Any]:  # fmt: skip
    good = _json(ok) if content == "application/json" else {
        "description": "OK", "content": {content: {"schema": _STR}}}  # fmt: skip
    return {
        "get": {
            "summary": summary,
            "parameters": params,
            "responses": {"200": good, **_errors(*codes)},
        }
    }


def _worker(summary: str, extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return _post(
        summary, [_path("name", "worker name"), *(extra or [])], _COMMAND, 400, 404, 501, 502
    )


def document() -> dict[str, Any]:
    """The OpenAPI document."""
    letter = {
        "type": "object",
        "properties": {
            k: _STR for k in ("id", "task", "reason", "detail", "exception", "worker", "traceback")
        }
        | {"attempts": {"type": "integer"}},
    }
    paths: dict[str, Any] = {
        "/healthcheck": {
            "get": {
                "summary": "liveness; the only path without credentials",
                "security": [],
                "responses": {
                    "200": {"description": "OK", "content": {"text/plain": {"schema": _STR}}}
                },
            }
        },
        "/metrics": _get("Prometheus metrics of the fleet", [], _STR, content="text/plain"),
        "/openapi.json": _get("this document", [], _OBJ),
        "/api/task/async-apply/{name}": _post(
            "send a task a worker registered (Flower)",
            [_path("name", "task name")],
            _SENT,
            400,
            404,
            502,
            body=_SEND_BODY,
        ),
        "/api/task/send-task/{name}": _post(
            "send a task by name, registered or not (Flower)",
            [_path("name", "task name")],
            _SENT,
            400,
            502,
            body=_SEND_BODY,
        ),
        "/api/task/result/{id}": _get(
            "a task's state and result (Flower)",
            [
                _path("id", "task id"),
                _query(
                    "timeout", {"type": "number", "minimum": 0, "maximum": 10}, "seconds to wait"
                ),
            ],
            {
                "type": "object",
                "required": ["task-id", "state"],
                "properties": {"task-id": _STR, "state": _STR},
            },
            400,
            502,
        ),
        "/api/task/info/{id}": _get(
            "everything the history knows of a task (Flower)",
            [_path("id", "task id")],
            {
                "type": "object",
                "required": ["id", "state", "timeline"],
                "properties": {"id": _STR, "state": _STR, "timeline": {"type": "array"}},
            },
            404,
        ),
        "/api/tasks": _get(
            "tasks, newest first, keyed by id (Flower)",
            [
                *_LIST_FILTERS,
                _query("taskname", _STR, "task name"),
                _query("workername", _STR, "worker"),
                _query("received_start", _TIME, "ISO 8601 time (UTC when no offset)"),
                _query("received_end", _TIME, "ISO 8601 time (UTC when no offset)"),
            ],
            _OBJ,
            400,
        ),
        "/api/task-list": _get(
            "one page of tasks with a cursor to the next",
            [
                *_LIST_FILTERS,
                _query("name", _STR, "task name"),
                _query("worker", _STR, "worker"),
                _query("since", _TIME, "ISO 8601 time (UTC when no offset)"),
                _query("until", _TIME, "ISO 8601 time (UTC when no offset)"),
                _query(
                    "before",
                    {"type": "string", "pattern": "^[^,]+,[0-9]{1,18}$"},
                    "cursor: 'next' of the previous page",
                ),
            ],
            {
                "type": "object",
                "required": ["tasks", "total", "capped", "next"],
                "properties": {
                    "tasks": {"type": "array"},
                    "total": {"type": "integer"},
                    "capped": {"type": "boolean"},
                    "next": {"type": "string", "nullable": True},
                },
            },
            400,
        ),
        "/api/task/types": _get(
            "task names the workers registered or the history saw (Flower)",
            [],
            {
                "type": "object",
                "required": ["task-types"],
                "properties": {"task-types": {"type": "array", "items": _STR}},
            },
        ),
        "/api/task/revoke/{id}": _post(
            "revoke a task (Flower)",
            [_path("id", "task id"), _query("terminate", _STR, "true to terminate")],
            _COMMAND,
            400,
            404,
            501,
            502,
        ),
        "/api/task/rate-limit/{name}": _post(
            "set a task's rate limit (Flower)",
            [
                _path("name", "task name"),
                _query(
                    "ratelimit",
                    {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?(/[smh])?$"},
                    "N/s, N/m, N/h, or 0 for none",
                    required=True,
                ),
                _query("workername", _STR, "worker"),
            ],
            _COMMAND,
            400,
            404,
            501,
            502,
        ),
        "/api/task/timeout/{name}": _post(
            "set a task's time limits (Flower)",
            [
                _path("name", "task name"),
                _query("soft", {"type": "number", "minimum": 0}, "seconds (0 or absent: none)"),
                _query("hard", {"type": "number", "minimum": 0}, "seconds (0 or absent: none)"),
                _query("workername", _STR, "worker"),
            ],
            _COMMAND,
            400,
            404,
            501,
            502,
        ),
        "/api/workers": _get(
            "workers by name, from their events (Flower)",
            [
                _query("refresh", _STR, "1: also ask inspect stats"),
                _query("workername", _STR, "one worker"),
                _query("status", _STR, "online or offline"),
            ],
            _OBJ,
        ),
        "/api/worker/shutdown/{name}": _worker("warm shutdown of a worker (Flower)"),
        "/api/worker/pool/grow/{name}": _worker(
            "grow a worker's pool (Flower)",
            [_query("n", {"type": "integer", "minimum": 1, "maximum": 10000}, "by")],
        ),
        "/api/worker/pool/shrink/{name}": _worker(
            "shrink a worker's pool (Flower)",
            [_query("n", {"type": "integer", "minimum": 1, "maximum": 10000}, "by")],
        ),
        "/api/worker/pool/autoscale/{name}": _worker(
            "autoscale a worker's pool (Flower)",
            [
                _query("min", {"type": "integer", "minimum": 1, "maximum": 10000}, "min"),
                _query("max", {"type": "integer", "minimum": 1, "maximum": 10000}, "max"),
            ],
        ),
        "/api/worker/queue/add-consumer/{name}": _worker(
            "start consuming a queue (Flower)",
            [_query("queue", {"type": "string", "minLength": 1}, "queue", required=True)],
        ),
        "/api/worker/queue/cancel-consumer/{name}": _worker(
            "stop consuming a queue (Flower)",
            [_query("queue", {"type": "string", "minLength": 1}, "queue", required=True)],
        ),
        "/api/queues/length": _get(
            "messages in each work queue (Flower)",
            [],
            {
                "type": "object",
                "required": ["active_queues"],
                "properties": {"active_queues": {"type": "array"}},
            },
            502,
        ),
        "/api/queues": _get(
            "every queue of the vhost: depth, ready, unacked, consumers, rates",
            [],
            {"type": "object", "required": ["queues"], "properties": {"queues": {"type": "array"}}},
            502,
        ),
        "/api/broker": _get("the broker overview", [], _OBJ, 502),
        "/api/dlq": _get(
            "the dead-letter queues and their depth",
            [],
            {"type": "object", "required": ["queues"], "properties": {"queues": {"type": "array"}}},
        ),
        "/api/dlq/{queue}": _get(
            "browse dead letters (none is removed)",
            [
                _path("queue", "work queue or its .dlq"),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "at most"),
            ],
            {
                "type": "object",
                "required": ["queue", "letters"],
                "properties": {"queue": _STR, "letters": {"type": "array", "items": letter}},
            },
            400,
            404,
            502,
        ),
        "/api/dlq/{queue}/replay": _post(
            "replay dead letters to their original route",
            [_path("queue", "work queue or its .dlq")],
            {
                "type": "object",
                "required": ["replayed", "problems", "skipped"],
                "properties": {
                    "replayed": {"type": "integer"},
                    "problems": {"type": "array"},
                    "skipped": _OBJ,
                },
            },
            400,
            404,
            502,
            body={
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "ids": {"type": "array", "items": _STR},
                                "all": {"type": "boolean"},
                                "force": {"type": "boolean"},
                            },
                        }
                    }
                },
            },
        ),
        "/api/dlq/{queue}/purge": _post(
            "delete every dead letter of a queue (confirm with its name)",
            [_path("queue", "work queue or its .dlq")],
            {
                "type": "object",
                "required": ["purged"],
                "properties": {"purged": {"type": "integer"}},
            },
            400,
            404,
            502,
            body={
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["confirm"],
                            "properties": {"confirm": _STR},
                        }
                    }
                },
            },
        ),
        "/api/schedules": _get(
            "schedules and their next fire times",
            [],
            {
                "type": "object",
                "required": ["schedules"],
                "properties": {"source": _STR, "schedules": {"type": "array"}},
            },
        ),
        "/api/stats": _get("ingest figures and history size", [], _OBJ),
        "/api/charts": _get(
            "per-minute counts and queue depth samples",
            [],
            {
                "type": "object",
                "required": ["minutes", "depth"],
                "properties": {"minutes": {"type": "array"}, "depth": {"type": "array"}},
            },
        ),
        "/api/live": _get(
            "server-sent events: one 'tick' per half second with changes",
            [],
            _STR,
            content="text/event-stream",
        ),
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "amqptasks dashboard",
            "version": "1",
            "description": "Flower-compatible paths plus amqptasks' own (docs/dashboard.md).",
        },
        "paths": paths,
        "security": [{"basic": []}, {"token": []}],
        "components": {
            "securitySchemes": {
                "basic": {"type": "http", "scheme": "basic"},
                "token": {"type": "http", "scheme": "bearer"},
            },
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": _STR}}
            },
        },
    }
