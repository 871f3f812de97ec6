"""The dashboard's error answers (``server.error_answers``): what a handler did not answer
becomes a JSON error with the right status, and a stream that already started ends instead
of having a second response written into it. An in-process aiohttp server on loopback; no
broker (the errors are raised by the handlers)."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from amqptasks.dashboard.server import STREAMING, error_answers
from amqptasks.errors import BrokerError, RoutingError


async def _broker_down(_request: web.Request) -> web.Response:
    raise BrokerError("cannot connect to broker amqp://guest:***@localhost:5999/")


async def _no_route(_request: web.Request) -> web.Response:
    raise RoutingError("no route for task 'nope'")


async def _bug(_request: web.Request) -> web.Response:
    raise KeyError("oops")


async def _stream_then_fail(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    request[STREAMING] = response
    await response.write(b"data: one\n\n")
    raise RuntimeError("the stream's source broke")


async def _answers() -> dict[str, tuple[int, str]]:
    app = web.Application(middlewares=[error_answers])
    app.router.add_get("/broker", _broker_down)
    app.router.add_get("/route", _no_route)
    app.router.add_get("/bug", _bug)
    app.router.add_get("/stream", _stream_then_fail)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        out = {}
        for path in ("/broker", "/route", "/bug", "/stream"):
            r = await client.get(path)
            try:
                body = await r.text()
            except aiohttp.ClientPayloadError:  # a stream cut short: still a finished answer
                body = "<cut>"
            out[path] = (r.status, body)
        return out


def test_errors_become_json_and_a_started_stream_just_ends(caplog):
    with caplog.at_level(logging.ERROR, logger="amqptasks.dashboard"):
        out = asyncio.run(_answers())
    assert out["/broker"][0] == 502 and "cannot connect to broker" in out["/broker"][1]
    assert "guest:***@" in out["/broker"][1]
    assert out["/route"] == (400, '{"error": "no route for task \'nope\'"}')
    assert out["/bug"][0] == 500 and "internal error (KeyError)" in out["/bug"][1]
    status, body = out["/stream"]
    # The headers said 200 before the failure; the client gets the stream so far, no JSON.
    assert status == 200 and body in ("data: one\n\n", "<cut>")
    assert '"error"' not in body
    logged = [r.getMessage() for r in caplog.records]
    assert any("GET /stream failed mid-stream" in m for m in logged), logged
    assert any("GET /bug failed" in m for m in logged), logged
