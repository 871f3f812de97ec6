"""``amqptasks dashboard``: the web UI and REST API (docs/dashboard.md).

One room of the house, talking to the rest only through public APIs: ``App`` (publishing,
``app.AsyncResult``, ``app.control``), the events format read from a durable queue
(``transport/event_listener``), :mod:`amqptasks.deadletters` and the broker's management
HTTP API. The web stack (aiohttp) and prometheus-client are imported here and nowhere else.

| module | owns |
|---|---|
| ``auth`` | passwords (plain, scrypt, pbkdf2), API tokens, sessions, CSRF tokens |
| ``history`` | the SQLite history: schema, folding events, queries, retention |
| ``ingest`` | the thread that reads the events queue, commits, then acks |
| ``broker_api`` | the management API client (queues, overview, depth samples) |
| ``live`` | server-sent events to open pages |
| ``server`` | the aiohttp app: wiring, security middleware, lifecycle |
| ``api`` | the REST handlers (Flower's paths and ours) |
| ``pages`` | HTML shells, login, static assets |
| ``openapi`` | ``/openapi.json`` |
| ``metrics`` | ``/metrics`` |
"""
