"""Dashboard credentials: password hashes, tokens, Basic headers, sessions, and the
``dashboard:`` config section (which must never show a secret)."""

from __future__ import annotations

import base64
import hashlib

import pytest

from amqptasks.config import Settings
from amqptasks.dashboard.auth import (
    Credentials,
    SessionStore,
    hash_password,
    hash_problem,
    new_token,
    parse_basic,
    verify_password,
)
from amqptasks.errors import ConfigError


def test_a_scrypt_hash_verifies_its_password_and_nothing_else():
    stored = hash_password("correct horse")
    assert stored.startswith("scrypt$16384$8$1$")
    assert "correct horse" not in stored
    assert verify_password("correct horse", stored)
    assert not verify_password("correct hors", stored)
    assert hash_password("correct horse") != stored  # a fresh salt each time


def test_a_django_pbkdf2_hash_is_accepted():
    digest = hashlib.pbkdf2_hmac("sha256", b"s3cret", b"salty", 1000)
    stored = f"pbkdf2_sha256$1000$salty${base64.b64encode(digest).decode()}"
    assert verify_password("s3cret", stored)
    assert not verify_password("s3cre", stored)


@pytest.mark.parametrize(
    "stored", ["scrypt$x$8$1$s$AAAA", "scrypt$16384$8", "pbkdf2_sha256$nope$s$AAAA"]
)
def test_a_malformed_hash_never_matches(stored):
    assert not verify_password("", stored)
    assert not verify_password("anything", stored)


@pytest.mark.parametrize(
    "stored",
    [
        "scrypt$x$8$1$s$AAAA",
        "scrypt$16384$8",
        "scrypt$16384$8$1$$AAAA",
        "scrypt$16383$8$1$salt$AAAA",
        "scrypt$16384$8$1$salt$not-base64!",
        "pbkdf2_sha256$nope$s$AAAA",
        "pbkdf2_sha256$0$s$AAAA",
    ],
)
def test_a_malformed_hash_is_named_at_start_up(stored):
    problem = hash_problem(stored)
    assert problem is not None and "starts like a" in problem
    assert stored not in problem


def test_good_hashes_and_plain_passwords_have_no_problem():
    digest = base64.b64encode(hashlib.pbkdf2_hmac("sha256", b"pw", b"salt", 1000)).decode()
    for stored in (hash_password("pw"), f"pbkdf2_sha256$1000$salt${digest}", "plain", "a$b"):
        assert hash_problem(stored) is None


def _dashboard_cli(tmp_path, env, *args):
    from click.testing import CliRunner

    from amqptasks.cli import main

    cfg = tmp_path / "amqptasks.yaml"
    if not cfg.exists():
        cfg.write_text("broker: {url: 'amqp://guest:guest@127.0.0.1:1/'}\n")
    return CliRunner().invoke(main, ["dashboard", "--config", str(cfg), *args], env=env)


def test_a_malformed_hash_stops_the_dashboard_naming_where_it_came_from(tmp_path):
    env = {"AMQPTASKS_DASHBOARD_AUTH": "ops:scrypt$16384$8$1$salt"}
    r = _dashboard_cli(tmp_path, env)
    assert r.exit_code == 2, r.output
    assert "$AMQPTASKS_DASHBOARD_AUTH[0] (user 'ops')" in r.output
    assert "scrypt$16384$8$1$salt" not in r.output
    r = _dashboard_cli(tmp_path, {}, "--basic-auth", "ann:pbkdf2_sha256$x$s$AAAA")
    assert r.exit_code == 2 and "--basic-auth[0] (user 'ann')" in r.output


def test_an_empty_environment_login_beyond_loopback_gets_the_refusal(tmp_path):
    """docker-compose passes AMQPTASKS_DASHBOARD_AUTH through, empty when it is not set."""
    r = _dashboard_cli(tmp_path, {"AMQPTASKS_DASHBOARD_AUTH": ""}, "--address", "0.0.0.0")
    assert r.exit_code == 2
    assert "refusing to listen on 0.0.0.0 without credentials" in r.output
    r = _dashboard_cli(tmp_path, {}, "--basic-auth", "")
    assert r.exit_code == 2 and "entry 1 is empty" in r.output


def test_a_plain_password_is_compared_whole():
    assert verify_password("pw", "pw")
    assert not verify_password("pw", "pw2")
    assert not verify_password("", "pw")


def test_credentials_check_users_and_tokens():
    token, digest = new_token()
    creds = Credentials(("ann:" + hash_password("a-pass"), "bob:plain"), (f"ci:{digest}",))
    assert creds.required
    assert creds.check_password("ann", "a-pass")
    assert creds.check_password("ann", "a-pass")  # the remembered pair
    assert not creds.check_password("ann", "plain")
    assert creds.check_password("bob", "plain")
    assert not creds.check_password("bob", "plain ")
    assert not creds.check_password("nobody", "plain")
    # A plain password is held as a scrypt hash: a known user's check costs one scrypt, as an
    # unknown user's does (the dummy), so a 401's timing does not tell who exists.
    held = creds._users["bob"]
    assert held.startswith("scrypt$") and "plain" not in held
    assert not creds.check_password("", "")
    assert creds.check_token(token) == "ci"
    assert creds.check_token(token + "x") is None
    assert creds.check_token("") is None
    assert not Credentials().required


def test_parse_basic():
    header = "Basic " + base64.b64encode(b"u:p:with:colons").decode()
    assert parse_basic(header) == ("u", "p:with:colons")
    assert parse_basic("basic " + base64.b64encode(b"u:").decode()) == ("u", "")
    assert parse_basic("Basic !!!") is None
    assert parse_basic("Basic " + base64.b64encode(b"no-colon").decode()) is None
    assert parse_basic("Bearer abc") is None
    assert parse_basic(None) is None


def test_sessions_end_after_their_ttl_whatever_happens():
    now = [1000.0]
    store = SessionStore(60, clock=lambda: now[0])
    sid, session = store.create("ann")
    assert store.get(sid) is session
    assert session.csrf_ok(session.csrf)
    # Change the first character to one it is not (a fixed "x" matched a token starting with x).
    forged = ("y" if session.csrf[0] == "x" else "x") + session.csrf[1:]
    assert not session.csrf_ok(forged)
    assert not session.csrf_ok(None)
    now[0] += 59
    assert store.get(sid) is session
    now[0] += 2
    assert store.get(sid) is None
    assert store.get("forged") is None
    sid2, _ = store.create("bob")
    store.end(sid2)
    assert store.get(sid2) is None


def test_the_dashboard_section_parses_with_defaults():
    d = Settings.from_mapping({}).dashboard
    assert (d.address, d.port, d.basic_auth, d.max_tasks) == ("127.0.0.1", 5555, (), 1_000_000)
    d = Settings.from_mapping(
        {
            "dashboard": {
                "address": "0.0.0.0",
                "port": 8080,
                "basic_auth": ["ann:pw1", "bob:scrypt$1$2$3$s$h"],
                "retention": "2d",
                "session_ttl": "30m",
                "max_tasks": 5000,
                "metrics_public": True,
                "management_url": "http://admin:mgmt-secret@rabbit:15672",
            }
        }
    ).dashboard
    assert d.basic_auth == ("ann:pw1", "bob:scrypt$1$2$3$s$h")
    assert (d.retention, d.session_ttl, d.max_tasks, d.metrics_public) == (
        172800.0,
        1800.0,
        5000,
        True,
    )
    shown = repr(d)
    assert "pw1" not in shown and "mgmt-secret" not in shown and "scrypt" not in shown
    assert "<2 credential(s)>" in shown


def test_the_environment_overrides_basic_auth_flower_style():
    s = Settings.from_mapping(
        {"dashboard": {"basic_auth": ["yaml:pw"]}},
        env={"AMQPTASKS_DASHBOARD_AUTH": "ann:one, bob:two"},
    )
    assert s.dashboard.basic_auth == ("ann:one", "bob:two")
    assert s.dashboard.basic_auth_source == "$AMQPTASKS_DASHBOARD_AUTH"


@pytest.mark.parametrize(
    ("section", "key", "secret"),
    [
        ({"basic_auth": ["justapasswordnocolon"]}, "dashboard.basic_auth[0]", "justapassword"),
        ({"basic_auth": ["ann:"]}, "dashboard.basic_auth[0]", "ann"),
        ({"api_tokens": ["ci:rawtokenvalue"]}, "dashboard.api_tokens[0]", "rawtokenvalue"),
        ({"basic_auth": 5}, "dashboard.basic_auth", None),
        ({"retention": "forever"}, "dashboard.retention", None),
        ({"session_ttl": 0}, "dashboard.session_ttl", None),
        ({"port": 70000}, "dashboard.port", None),
        ({"events_queue": "bad name!"}, "dashboard.events_queue", None),
        ({"management_url": "ftp://x"}, "dashboard.management_url", None),
        ({"colour": "blue"}, "dashboard.colour", None),
    ],
)
def test_a_bad_dashboard_key_names_its_path_and_never_its_secret(section, key, secret):
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping({"dashboard": section}, source="cfg.yaml")
    assert info.value.key == key
    assert str(info.value).startswith(f"cfg.yaml: {key}: ")
    if secret is not None:
        assert secret not in str(info.value)


def test_a_history_it_cannot_open_stops_the_start_naming_the_file(tmp_path):
    """It once said "cannot listen on 127.0.0.1:5555: No such file or directory"."""
    (tmp_path / "notes.txt").write_text("not a database")
    for database, why in (
        (str(tmp_path / "notes.txt"), "file is not a database"),
        ("/proc/no-such/h.sqlite3", "No such file or directory"),
    ):
        r = _dashboard_cli(tmp_path, {}, "--database", database)
        assert r.exit_code == 2, r.output
        assert "dashboard.database (or --database): cannot open the history" in r.output
        assert database in r.output and why in r.output
        assert "cannot listen" not in r.output


def test_serve_itself_refuses_an_open_address_without_credentials():
    """Code that embeds the dashboard (not only the CLI) cannot listen beyond loopback open."""
    import asyncio

    from amqptasks.dashboard.server import serve

    settings = Settings.from_mapping(
        {"broker": {"url": "amqp://127.0.0.1:1/"}, "dashboard": {"address": "0.0.0.0"}}
    )
    with pytest.raises(ConfigError, match=r"dashboard\.address: 0\.0\.0\.0 is beyond loopback"):
        asyncio.run(serve(settings, print))


def test_password_checks_beyond_the_kdf_slots_are_refused_not_queued(monkeypatch):
    """With every slot busy a new (never verified) pair gets None (the handlers answer 429)
    at once instead of queueing a scrypt behind the others; a verified pair still passes."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from amqptasks.dashboard import server

    release, entered = threading.Event(), threading.Event()

    class Slow(Credentials):
        def check_password(self, user: str, password: str) -> bool:
            if password == "hold":
                entered.set()
                release.wait(10)
            return super().check_password(user, password)

    async def scenario() -> list[bool | None]:
        dash = SimpleNamespace(
            credentials=Slow(("ann:pw",)), kdf=ThreadPoolExecutor(max_workers=1), kdf_busy=0
        )
        assert await server.check_password(dash, "ann", "pw") is True  # now remembered
        held = asyncio.ensure_future(server.check_password(dash, "ann", "hold"))
        await asyncio.to_thread(entered.wait, 10)
        busy = await server.check_password(dash, "bob", "guess")
        known = await server.check_password(dash, "ann", "pw")
        release.set()
        first = await held
        dash.kdf.shutdown()
        return [first, busy, known, dash.kdf_busy]

    monkeypatch.setattr(server, "KDF_SLOTS", 1)
    assert asyncio.run(scenario()) == [False, None, True, 0]
