"""The pages: small HTML shells (navigation, the CSRF token, which page this is) rendered
here, filled in by ``static/app.js`` from the JSON API; the login form; the static assets.

Everything a task carries (args, results, tracebacks, names) is put into the page by the
script with ``textContent``, never as HTML, so a task argument cannot become markup. What
this module writes into HTML itself is escaped (``html.escape``).

Static files are served from a fixed table read from the package at start-up: a request
names one of those files or gets 404, so no path ever reaches the file system.
"""

from __future__ import annotations

import html
import mimetypes
import secrets
from importlib import resources

from aiohttp import web

from .server import (
    DASHBOARD,
    LOGIN_COOKIE,
    LOGIN_STYLE,
    PRINCIPAL,
    SESSION_COOKIE,
    Principal,
    check_password,
)

__all__ = ["PAGES", "add_routes", "login_page"]

#: path -> (page name, title)
PAGES = {
    "/": ("overview", "Overview"),
    "/workers": ("workers", "Workers"),
    "/tasks": ("tasks", "Tasks"),
    "/queues": ("queues", "Queues"),
    "/dlq": ("dlq", "Dead letters"),
    "/schedules": ("schedules", "Schedules"),
    "/broker": ("broker", "Broker"),
}
_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}


def _static_files() -> dict[str, tuple[bytes, str]]:
    root = resources.files("amqptasks.dashboard") / "static"
    out = {}
    for entry in root.iterdir():
        if entry.is_file() and not entry.name.startswith("."):
            suffix = "." + entry.name.rsplit(".", 1)[-1]
            kind = _TYPES.get(suffix) or mimetypes.guess_type(entry.name)[0] or "text/plain"
            out[entry.name] = (entry.read_bytes(), kind)
    return out


STATIC = _static_files()


def _cookie_secure(request: web.Request) -> bool:
    return request.secure or request.headers.get("X-Forwarded-Proto") == "https"


def login_page(
    request: web.Request, *, status: int = 200, error: str | None = None
) -> web.Response:
    # Reuse the browser's token: its other requests (a favicon) must not replace the cookie
    # behind the form it shows.
    token = request.cookies.get(LOGIN_COOKIE, "")
    if len(token) != 43 or not token.replace("-", "").replace("_", "").isalnum():
        token = secrets.token_urlsafe(32)
    message = f'<p class="err" role="alert">{html.escape(error)}</p>' if error else ""
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>amqptasks dashboard: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{LOGIN_STYLE}</style></head>
<body><form method="post" action="/login">
<h1>amqptasks dashboard</h1>{message}
<input type="hidden" name="csrf" value="{token}">
<label for="username">User</label>
<input id="username" name="username" autocomplete="username" required>
<label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password" required>
<button type="submit">Sign in</button></form></body></html>"""
    response = web.Response(text=body, content_type="text/html", status=status)
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        httponly=True,
        samesite="Strict",
        secure=_cookie_secure(request),
        max_age=3600,
        path="/",
    )
    return response


async def login(request: web.Request) -> web.StreamResponse:
    dash = request.app[DASHBOARD]
    if request.method == "GET":
        if not dash.auth_required:
            raise web.HTTPSeeOther("/")
        return login_page(request, status=401)
    form = await request.post()
    expected = request.cookies.get(LOGIN_COOKIE, "")
    presented = str(form.get("csrf", ""))
    if not expected or not secrets.compare_digest(expected.encode(), presented.encode()):
        return login_page(request, status=403, error="The form expired: please sign in again.")
    user, password = str(form.get("username", "")), str(form.get("password", ""))
    ok = dash.auth_required and await check_password(dash, user, password)
    if ok is None:
        return login_page(request, status=429, error="Too many sign-ins at once: try again.")
    if not ok:
        return login_page(request, status=401, error="Wrong user or password.")
    sid, _session = dash.sessions.create(user)
    response = web.HTTPSeeOther("/")
    response.set_cookie(
        SESSION_COOKIE,
        sid,
        httponly=True,
        samesite="Strict",
        secure=_cookie_secure(request),
        max_age=int(dash.options.session_ttl),
        path="/",
    )
    response.del_cookie(LOGIN_COOKIE, path="/")
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    principal: Principal = request[PRINCIPAL]
    request.app[DASHBOARD].sessions.end(principal.session_id)
    response = web.HTTPSeeOther("/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response


def _shell(request: web.Request, page: str, title: str, item: str = "") -> web.Response:
    dash = request.app[DASHBOARD]
    principal: Principal = request[PRINCIPAL]
    response = web.Response(content_type="text/html")
    if principal.session is None:  # no login (loopback without credentials): a session
        # for the CSRF token all the same
        sid, session = dash.sessions.create(principal.user)
        response.set_cookie(
            SESSION_COOKIE, sid, httponly=True, samesite="Strict", path="/",
            max_age=int(dash.options.session_ttl),
        )  # fmt: skip
        csrf = session.csrf
    else:
        csrf = principal.session.csrf
    nav = "".join(
        f'<a href="{path}"{" aria-current=page" if name == page else ""}>{label}</a>'
        for path, (name, label) in PAGES.items()
    )
    logout_form = (
        '<form method="post" action="/logout" class="logout">'
        f'<input type="hidden" name="csrf" value="{html.escape(csrf)}">'
        f"<span>{html.escape(principal.user)}</span> <button>Sign out</button></form>"
        if dash.auth_required
        else '<span class="logout">loopback, no login</span>'
    )
    response.text = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)} · amqptasks</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf-token" content="{html.escape(csrf)}">
<link rel="stylesheet" href="/static/style.css">
<script src="/static/app.js" defer></script></head>
<body><header><strong>amqptasks</strong><nav>{nav}</nav>{logout_form}</header>
<div id="events-hint" class="hint" hidden>No worker events arrive. Workers publish events
only when started with <code>-E</code> (or <code>events.enabled: true</code>):
<code>amqptasks worker -E</code>.</div>
<main id="app" data-page="{html.escape(page)}" data-item="{html.escape(item)}">
<h1>{html.escape(title)}</h1><p class="muted">Loading…</p></main></body></html>"""
    return response


def _page(page: str, title: str) -> object:
    async def handler(request: web.Request) -> web.Response:
        return _shell(request, page, title)

    return handler


async def task_page(request: web.Request) -> web.Response:
    task_id = request.match_info["id"]
    return _shell(request, "task", "Task", task_id)


async def static(request: web.Request) -> web.Response:
    found = STATIC.get(request.match_info["name"])
    if found is None:
        raise web.HTTPNotFound()
    body, kind = found
    return web.Response(body=body, content_type=kind, headers={"Cache-Control": "no-cache"})


def add_routes(app: web.Application) -> None:
    r = app.router
    for path, (page, title) in PAGES.items():
        r.add_get(path, _page(page, title))  # type: ignore[arg-type]
    r.add_get("/task/{id}", task_page)
    r.add_get("/static/{name}", static)
    r.add_route("GET", "/login", login)
    r.add_post("/login", login)
    r.add_post("/logout", logout)
