"""The web application: wiring, the security middleware, start-up and shutdown.

Security model (docs/dashboard.md):

* every path needs credentials except ``GET /healthcheck`` (and ``/metrics`` with
  ``metrics_public``): HTTP Basic (Flower's scripts), ``Authorization: Bearer <API token>``,
  or a session cookie from the login form. Without them: 401;
* without configured credentials the dashboard only runs on loopback (the CLI refuses
  anything else) and then also refuses a ``Host`` that is not a loopback name, so a web page
  cannot reach it through DNS rebinding;
* a state-changing request (POST) is refused when a browser says it comes from another site
  (``Origin`` not this host, ``Sec-Fetch-Site: cross-site|same-site``), and a session's POST
  must carry its CSRF token (``X-CSRF-Token`` or a ``csrf`` form field): the browser sends
  cookies and cached Basic credentials by itself, scripts send their own;
* every answer carries a CSP without inline scripts, ``frame-ancestors 'none'`` and
  ``X-Frame-Options: DENY``, ``nosniff``, ``Referrer-Policy: same-origin`` and ``no-store``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import signal
import sqlite3
from base64 import b64encode
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from ..app import App
from ..config import Settings, redact_url
from ..errors import AmqpTasksError, BrokerError, ConfigError, ResultStoreError
from ..results import AsyncResult
from .auth import Credentials, Session, SessionStore, parse_basic
from .broker_api import BrokerApi, BrokerApiError
from .history import History
from .ingest import Ingestor
from .live import LiveHub

__all__ = ["DASHBOARD", "Dashboard", "build_app", "is_loopback", "serve"]

log = logging.getLogger("amqptasks.dashboard")

SESSION_COOKIE = "amqptasks_session"
LOGIN_COOKIE = "amqptasks_login"
#: The login page's only style, inline (it is shown before any asset may be fetched) and
#: allowed by its hash in the CSP, so no other inline style is.
LOGIN_STYLE = (
    "body{font:15px system-ui,sans-serif;background:#f4f5f7;color:#1d2330}"
    "form{max-width:22em;margin:12vh auto;background:#fff;padding:2em;border-radius:8px;"
    "box-shadow:0 1px 4px #0002}label{display:block;margin:.8em 0 .3em}"
    "input{width:100%;padding:.5em;box-sizing:border-box}button{margin-top:1.2em;"
    "padding:.6em 1.4em}.err{color:#b3261e}"
)
_STYLE_HASH = b64encode(hashlib.sha256(LOGIN_STYLE.encode()).digest()).decode()
CSP = (
    "default-src 'none'; script-src 'self'; "
    f"style-src 'self' 'sha256-{_STYLE_HASH}'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: with no-referrer Chromium sends `Origin: null` on the
    # page's own form posts, which the cross-site check must refuse.
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}
_LOOPBACK_NAMES = ("localhost", "localhost.")


def is_loopback(address: str) -> bool:
    """Whether listening on ``address`` keeps the dashboard on this machine."""
    host = address.strip().strip("[]")
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Principal:
    """Who made a request, and how (``session`` requests need the CSRF token to change
    anything)."""

    user: str
    via: str  # basic | token | session | local
    session: Session | None = None
    session_id: str | None = None


#: Password checks (scrypt: tens of milliseconds of CPU each) run at most this many at once,
#: on threads of their own: a flood of made-up credentials costs that much CPU at most and
#: never takes the threads history reads run on; beyond it a request is answered 429 at once.
KDF_SLOTS = 2


class Dashboard:
    """Everything a request handler reaches: settings, the app (publishing, results,
    control), the history, the ingest thread, the broker's management API, the sessions."""

    def __init__(self, settings: Settings, *, app: App | None = None) -> None:
        self.settings = settings
        d = settings.dashboard
        self.options = d
        try:  # before anything that connects: a history it cannot open stops the start
            self.history = History(d.database, max_tasks=d.max_tasks, retention=d.retention)
        except (OSError, sqlite3.Error, ValueError) as exc:
            raise ConfigError(
                str(settings.source),
                "dashboard.database (or --database)",
                f"cannot open the history {str(d.database)!r}: {exc}",
            ) from None
        self.app = app or App(settings)
        self.credentials = Credentials(d.basic_auth, d.api_tokens)
        self.kdf = ThreadPoolExecutor(max_workers=KDF_SLOTS, thread_name_prefix="amqptasks-kdf")
        #: Password checks running now (loop thread only).
        self.kdf_busy = 0
        self.sessions = SessionStore(d.session_ttl)
        self.live = LiveHub()
        self.ingestor = Ingestor(
            settings.broker.urls,
            d.events_queue,
            self.history,
            on_batch=self._on_batch,
            queue_type=settings.topology.default_queue_type,
        )
        self.broker = BrokerApi(settings.broker.urls, d.management_url)
        self.broker_error = ""
        #: Handles of tasks submitted here: their direct reply-to answers land in them
        #: (the app's collector holds handles weakly).
        self.submitted: OrderedDict[str, AsyncResult] = OrderedDict()
        self.registered: tuple[float, set[str]] = (0.0, set())
        self.ledger = Path(d.database).with_name(Path(d.database).name + "-replay.log")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sampler: asyncio.Task[None] | None = None

    @property
    def auth_required(self) -> bool:
        return self.credentials.required

    def remember(self, handle: AsyncResult) -> None:
        self.submitted[handle.id] = handle
        while len(self.submitted) > 10_000:
            self.submitted.popitem(last=False)

    def _on_batch(self, applied: Any) -> None:  # on the ingest thread
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.live.batch, applied)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.ingestor.start()
        self.live.start()
        self._sampler = self._loop.create_task(self._sample_forever())
        log.info(
            "dashboard: broker %s, history %s, events queue %r, management API %s",
            redact_url(self.settings.broker.url),
            self.options.database,
            self.options.events_queue,
            self.broker.shown,
        )

    async def _sample_forever(self) -> None:
        while True:
            try:
                await self.broker.sample()
                self.broker_error = ""
            except BrokerApiError as exc:
                if str(exc) != self.broker_error:
                    log.warning("%s", exc)
                self.broker_error = str(exc)
            await asyncio.sleep(5)

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        await self.live.stop()
        await asyncio.to_thread(self.ingestor.stop)
        await self.broker.close()
        await self.app.aclose()
        await asyncio.to_thread(self.app.close)
        self.history.close()
        self.kdf.shutdown(wait=False, cancel_futures=True)


DASHBOARD = web.AppKey("dashboard", Dashboard)
# Typed request keys (aiohttp >= 3.14 warns once per process, on stderr, for a str key).
PRINCIPAL = web.RequestKey("amqptasks.principal", Principal)
#: Set by a streaming handler (the live event stream) to its response once its headers went
#: out: from then on an error can only end the stream, not become a JSON answer.
STREAMING = web.RequestKey("amqptasks.streaming", web.StreamResponse)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _host_allowed(request: web.Request) -> bool:
    host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
    return is_loopback(host)


def _cross_site(request: web.Request) -> bool:
    site = request.headers.get("Sec-Fetch-Site")
    if site in ("cross-site", "same-site"):
        return True
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    if origin == "null":
        return True
    return origin.split("://", 1)[-1] != request.host


async def check_password(dash: Dashboard, user: str, password: str) -> bool | None:
    """Whether ``user``/``password`` are right; None when :data:`KDF_SLOTS` checks run
    already (the caller answers 429: try again). A pair verified before costs nothing."""
    creds = dash.credentials
    if creds.remembered(user, password):
        return True
    if dash.kdf_busy >= KDF_SLOTS:
        return None
    dash.kdf_busy += 1
    try:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(dash.kdf, creds.check_password, user, password)
    finally:
        dash.kdf_busy -= 1


def too_many_checks() -> web.HTTPTooManyRequests:
    return web.HTTPTooManyRequests(
        text="too many password checks at once: try again in a moment",
        headers={"Retry-After": "1"},
    )


async def authenticate(dash: Dashboard, request: web.Request) -> Principal | None:
    """The request's principal, or None (401). A password not seen before is hashed on a
    thread: scrypt takes tens of milliseconds, which would stall every page stream."""
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        name = dash.credentials.check_token(header[7:].strip())
        return Principal(name, "token") if name else None
    basic = parse_basic(header) if header else None
    if basic is not None:
        user, password = basic
        ok = await check_password(dash, user, password)
        if ok is None:
            raise too_many_checks()
        return Principal(user, "basic") if ok else None
    if header:
        return None
    sid = request.cookies.get(SESSION_COOKIE)
    session = dash.sessions.get(sid)
    if session is not None:
        return Principal(session.user, "session", session, sid)
    if not dash.auth_required:
        return Principal("local", "local")
    return None


def _is_api(path: str) -> bool:
    return path.startswith("/api/") or path in ("/metrics", "/openapi.json")


def unauthorized(request: web.Request, message: str = "authentication required") -> web.Response:
    if _is_api(request.path):
        # The Basic challenge is for scripts. A browser (it sends Sec-Fetch-* headers) would
        # answer it with a password dialog that blocks the page's fetch and then caches the
        # password; pages sign in with the form instead.
        browser = "Sec-Fetch-Dest" in request.headers or "Sec-Fetch-Mode" in request.headers
        return web.json_response(
            {"error": message},
            status=401,
            headers={}
            if browser
            else {"WWW-Authenticate": 'Basic realm="amqptasks dashboard", charset="UTF-8"'},
        )
    from .pages import login_page

    return login_page(request, status=401, error=None if message.endswith("required") else message)


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
    for key, value in SECURITY_HEADERS.items():
        response.headers.setdefault(key, value)
    response.headers.setdefault("Cache-Control", "no-store")
    if isinstance(response, web.HTTPException):
        raise response
    return response


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    dash = request.app[DASHBOARD]
    path = request.path
    if path == "/healthcheck":
        return await handler(request)
    if not dash.auth_required and not _host_allowed(request):
        return web.json_response(
            {"error": "this dashboard has no credentials and answers only to a loopback host"},
            status=403,
        )
    if path == "/metrics" and dash.options.metrics_public:
        return await handler(request)  # after the Host check: DNS rebinding reads nothing
    changing = request.method not in ("GET", "HEAD", "OPTIONS")
    if (changing or request.headers.get("Sec-Fetch-Mode") != "navigate") and _cross_site(request):
        # A change never; a read only when the browser navigates to a page (a link from
        # elsewhere): another site's <img>/fetch() must not hold threads with long result
        # waits or mint sessions that push out the user's.
        return web.json_response({"error": "cross-site request refused"}, status=403)
    if path == "/login":
        return await handler(request)
    principal = await authenticate(dash, request)
    if principal is None:
        return unauthorized(request)
    if changing and principal.via == "session":
        assert principal.session is not None
        presented = request.headers.get("X-CSRF-Token")
        if presented is None and request.content_type == "application/x-www-form-urlencoded":
            presented = str((await request.post()).get("csrf", ""))
        if not principal.session.csrf_ok(presented):
            return web.json_response({"error": "missing or wrong CSRF token"}, status=403)
    request[PRINCIPAL] = principal
    return await handler(request)


@web.middleware
async def error_answers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """What a handler did not answer itself becomes a JSON error, never aiohttp's bare "500
    Server got itself in trouble": the broker's and the result store's errors are 502 with
    their text (it names the cause, never a password), our other errors 400 (the request
    asked for something that cannot be), anything else a 500 whose traceback is in the
    dashboard's log. A stream whose headers already went out cannot change its status: its
    error is logged and the stream ends."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as exc:
        started: web.StreamResponse | None = request.get(STREAMING)
        if started is not None and started.prepared:
            log.exception("%s %s failed mid-stream; the stream ends", request.method, request.path)
            return started
        return _error_json(request, exc)


def _error_json(request: web.Request, exc: Exception) -> web.Response:
    if isinstance(exc, BrokerError | ResultStoreError):  # what the dashboard stands in front of
        return web.json_response({"error": str(exc)}, status=502)
    if isinstance(exc, AmqpTasksError):  # e.g. a route the request asked for that does not exist
        return web.json_response({"error": str(exc)}, status=400)
    log.exception("%s %s failed", request.method, request.path)  # called in the except block
    return web.json_response(
        {"error": f"internal error ({type(exc).__name__}); the dashboard's log has why"},
        status=500,
    )


async def _startup(app: web.Application) -> None:
    await app[DASHBOARD].start()


async def _shutdown(app: web.Application) -> None:
    await app[DASHBOARD].live.stop()  # open event streams end now, not at a timeout


async def _cleanup(app: web.Application) -> None:
    await app[DASHBOARD].stop()


def build_app(dash: Dashboard) -> web.Application:
    """The aiohttp application: middlewares, routes (api, pages, static), lifecycle."""
    from . import api, pages

    app = web.Application(
        middlewares=[security_headers, guard, error_answers], client_max_size=1024**2
    )
    app[DASHBOARD] = dash
    api.add_routes(app)
    pages.add_routes(app)
    app.on_startup.append(_startup)
    app.on_shutdown.append(_shutdown)
    app.on_cleanup.append(_cleanup)
    return app


async def serve(settings: Settings, say: Callable[[str], None]) -> None:
    """Run the dashboard until SIGTERM/SIGINT; ``say`` prints the banner lines. Raises
    ``OSError`` when the address cannot be listened on, :class:`ConfigError` for an address
    beyond loopback without credentials (the rule holds for code that embeds the dashboard,
    not only for the CLI, which says it first)."""
    d = settings.dashboard
    if not is_loopback(d.address) and not (d.basic_auth or d.api_tokens):
        raise ConfigError(
            settings.source,
            "dashboard.address",
            f"{d.address} is beyond loopback and no credentials are configured "
            "(dashboard.basic_auth, dashboard.api_tokens): refusing to listen",
        )
    dash = Dashboard(settings)
    runner = web.AppRunner(build_app(dash), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, d.address, d.port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    auth = (
        f"login required ({len(d.basic_auth)} user(s) from {d.basic_auth_source}, "
        f"{len(d.api_tokens)} API token(s))"
        if d.basic_auth or d.api_tokens
        else "no login (loopback only)"
    )
    say(f"dashboard: http://{d.address}:{d.port}/ ({auth}); history {d.database}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if await asyncio.to_thread(dash.ingestor.wait_ready, 15.0):
        say(f"ready: reading events from {d.events_queue!r}")
    else:
        say(f"warning: events queue not ready yet: {dash.ingestor.stats.error or 'waiting'}")
    await stop.wait()
    say("dashboard: stopping")
    await runner.cleanup()
