"""Who may use the dashboard: passwords (plain or hashed), API tokens, browser sessions and
their CSRF tokens. Standard library only, no I/O.

Flower's default was no authentication at all, and its OAuth check could be bypassed
(CVE-2022-30034): so every comparison here is constant-time (``hmac.compare_digest`` on
digests of equal length), an unknown user costs the same as a wrong password, and nothing
here ever formats a secret into a message.

Password formats (``USER:<password or hash>`` in ``--basic-auth``, ``dashboard.basic_auth``
or ``$AMQPTASKS_DASHBOARD_AUTH``):

* ``scrypt$<n>$<r>$<p>$<salt>$<base64 hash>`` — what ``amqptasks dashboard --hash-password``
  writes (``hashlib.scrypt``, n=2**14, r=8, p=1, 64-byte hash);
* ``pbkdf2_sha256$<iterations>$<salt>$<base64 hash>`` — Django's format, so existing hashes
  can be reused;
* anything else is a plain password.

A hash is slow on purpose, so a verified ``(user, password)`` pair is remembered for the
life of the process as an HMAC under a per-process random key (never the password itself):
a script sending the same Basic credentials with every request pays for one hash.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field

__all__ = [
    "Credentials",
    "Session",
    "SessionStore",
    "hash_password",
    "hash_problem",
    "new_token",
    "parse_basic",
    "verify_password",
]

_SCRYPT = (2**14, 8, 1)
#: Sessions kept at most (clients that never send their cookie back create one per page).
MAX_SESSIONS = 10_000
_DUMMY = "scrypt$16384$8$1$dummysalt$" + base64.b64encode(b"\0" * 64).decode()


def hash_password(password: str, *, salt: str | None = None) -> str:
    """``scrypt$16384$8$1$<salt>$<hash>`` for ``password``."""
    n, r, p = _SCRYPT
    salt = salt or secrets.token_urlsafe(16)
    digest = hashlib.scrypt(password.encode(), salt=salt.encode(), n=n, r=r, p=p, dklen=64)
    return f"scrypt${n}${r}${p}${salt}${base64.b64encode(digest).decode()}"


def _is_hash(stored: str) -> bool:
    return stored.startswith(("scrypt$", "pbkdf2_sha256$"))


def hash_problem(stored: str) -> str | None:
    """What is wrong with ``stored`` if it starts like a hash but is not one, else None (a
    well-formed hash, or a plain password). Checked at start-up: a malformed hash never
    matches, and its user would otherwise be locked out with nothing said why."""
    if not _is_hash(stored):
        return None
    parts = stored.split("$")
    if parts[0] == "scrypt":
        form, fields = "scrypt$<n>$<r>$<p>$<salt>$<base64 hash>", 6
    else:
        form, fields = "pbkdf2_sha256$<iterations>$<salt>$<base64 hash>", 4
    why = f"starts like a {parts[0]} hash but is not {form}"
    if len(parts) != fields or not all(parts[1:]):
        return why
    try:
        numbers = [int(x) for x in parts[1 : fields - 2]]
        digest = base64.b64decode(parts[-1], validate=True)
    except ValueError:
        return why
    if not digest or min(numbers) < 1:
        return why
    if parts[0] == "scrypt" and (numbers[0] < 2 or numbers[0] & (numbers[0] - 1)):
        return f"{why} (n must be a power of 2 above 1)"
    return None


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (a hash in one of the formats above, or a plain
    password), compared in constant time. A malformed hash never matches."""
    if not _is_hash(stored):
        return hmac.compare_digest(
            hashlib.sha256(password.encode()).digest(), hashlib.sha256(stored.encode()).digest()
        )
    parts = stored.split("$")
    try:
        if parts[0] == "scrypt" and len(parts) == 6:
            n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
            expected = base64.b64decode(parts[5])
            got = hashlib.scrypt(
                password.encode(),
                salt=parts[4].encode(),
                n=n,
                r=r,
                p=p,
                dklen=len(expected),
                maxmem=256 * 1024 * 1024,
            )
        elif parts[0] == "pbkdf2_sha256" and len(parts) == 4:
            expected = base64.b64decode(parts[3])
            got = hashlib.pbkdf2_hmac(
                "sha256", password.encode(), parts[2].encode(), int(parts[1]), len(expected)
            )
        else:
            return False
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def new_token() -> tuple[str, str]:
    """A new API token and the digest to configure: ``(token, "sha256$<hex>")``."""
    token = secrets.token_urlsafe(32)
    return token, "sha256$" + hashlib.sha256(token.encode()).hexdigest()


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """``Authorization: Basic <base64 user:password>`` -> (user, password), else None."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        return None
    try:
        text = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    user, sep, password = text.partition(":")
    return (user, password) if sep else None


class Credentials:
    """The configured users (``USER:SECRET``) and API token digests (``NAME:sha256$hex``)."""

    def __init__(self, users: tuple[str, ...] = (), tokens: tuple[str, ...] = ()) -> None:
        self._users: dict[str, str] = {}
        for entry in users:
            user, _, secret = entry.partition(":")
            # A plain password is kept as a scrypt hash made now (in memory only), so that a
            # known user's check costs what an unknown user's does (one scrypt against the
            # dummy): the time of a 401 must not tell which user names exist.
            self._users[user] = secret if _is_hash(secret) else hash_password(secret)
        self._tokens: list[tuple[str, bytes]] = []
        for entry in tokens:
            name, _, digest = entry.partition(":")
            self._tokens.append((name, digest.removeprefix("sha256$").encode()))
        self._key = secrets.token_bytes(32)
        self._verified: set[bytes] = set()

    @property
    def required(self) -> bool:
        """Whether anything is configured: without it only loopback is allowed (cli)."""
        return bool(self._users or self._tokens)

    def _mark(self, user: str, password: str) -> bytes:
        return hmac.new(self._key, f"{user}\0{password}".encode(), hashlib.sha256).digest()

    def remembered(self, user: str, password: str) -> bool:
        """Whether this pair was verified before (no hash to compute: safe on an event loop)."""
        return self._mark(user, password) in self._verified

    def check_password(self, user: str, password: str) -> bool:
        """Constant-time check; an unknown user costs a hash like a known one. Slow on
        purpose (scrypt): call it off the event loop unless :meth:`remembered`."""
        mark = self._mark(user, password)
        if mark in self._verified:
            return True
        stored = self._users.get(user)
        ok = verify_password(password, stored if stored is not None else _DUMMY)
        ok = ok and stored is not None
        if ok and len(self._verified) < 1024:
            self._verified.add(mark)
        return ok

    def check_token(self, token: str) -> str | None:
        """The name of the API token ``token``, or None; every digest is compared."""
        digest = hashlib.sha256(token.encode()).hexdigest().encode()
        found = None
        for name, expected in self._tokens:
            if hmac.compare_digest(digest, expected) and found is None:
                found = name
        return found


@dataclass
class Session:
    """A logged-in browser: who, its CSRF token, when it ends."""

    user: str
    expires: float
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    def csrf_ok(self, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(
            (presented or "").encode(), self.csrf.encode()
        )


class SessionStore:
    """Sessions in memory: a restart logs every browser out (and loses no data: the history
    is in SQLite). Each session ends ``ttl`` seconds after its login, whatever happens."""

    def __init__(self, ttl: float, clock: object = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._sessions: dict[str, Session] = {}

    def _now(self) -> float:
        return self._clock()  # type: ignore[operator, no-any-return]

    def create(self, user: str) -> tuple[str, Session]:
        now = self._now()
        for sid in [k for k, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[sid]
        while len(self._sessions) >= MAX_SESSIONS:  # the oldest go first
            del self._sessions[next(iter(self._sessions))]
        sid = secrets.token_urlsafe(32)
        session = self._sessions[sid] = Session(user, now + self.ttl)
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        session = self._sessions.get(sid)
        if session is None:
            return None
        if session.expires <= self._now():
            del self._sessions[sid]
            return None
        return session

    def end(self, sid: str | None) -> None:
        if sid:
            self._sessions.pop(sid, None)
