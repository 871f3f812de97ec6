"""RedisStore: results shared by many hosts, on Redis (redis-py; the only module importing it).

Keys (``<ns>`` is the namespace, ``amqptasks`` by default), each with a TTL of ``expires``:

* ``<ns>:result:<id>`` — a hash ``{status, meta}``: the status alone lets the save script apply
  the "ready wins" rule without decoding the JSON record ``meta``;
* ``<ns>:group:<id>`` — the group's member ids as a JSON list;
* ``<ns>:chord:<id>`` — a hash ``{size, done, failed, body_sent, m:<index>...}``.

Every write is one Lua script, so it is atomic, and :meth:`RedisStore.save` publishes on
``<ns>:ready:<id>`` *in the same script* when a record becomes READY: ``wait`` subscribes to
those channels, then reads, then waits for messages — no polling, and no window between
"read: not ready" and "subscribed" in which a result could land unseen.

Connection trouble: commands are retried (3 times, 50 ms → 500 ms backoff) on a fresh
connection, which reconnects transparently after a Redis restart; when Redis stays away a
:class:`~amqptasks.errors.ResultStoreError` names the URL (password redacted) and the cause.
Every script is safe to re-run (the retry of a write whose reply was lost changes nothing).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from ..config import redact_url
from ..errors import ResultStoreError
from ..protocol import dumps, loads
from .meta import READY_STATES, ResultMeta, StoredRecord
from .store import (
    DEFAULT_EXPIRES,
    ChordMember,
    ChordProgress,
    check_chord_member,
    check_expires,
)

__all__ = ["RedisStore"]

_READY_LUA = "{" + ", ".join(f"{s}=true" for s in sorted(READY_STATES)) + "}"

# KEYS: (result key, ready channel) per record; ARGV[1]: ttl in ms (0: none), then
# (status, meta) per record. The rule of store.replaceable: nothing replaces a READY record.
_SAVE = f"""
local READY = {_READY_LUA}
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS, 2 do
  local key, channel = KEYS[i], KEYS[i + 1]
  local status, meta = ARGV[i + 1], ARGV[i + 2]
  local stored = redis.call('HGET', key, 'status')
  if not stored or not READY[stored] then
    redis.call('HSET', key, 'status', status, 'meta', meta)
    if ttl > 0 then redis.call('PEXPIRE', key, ttl) else redis.call('PERSIST', key) end
    if READY[status] then redis.call('PUBLISH', channel, status) end
  end
end
return 0
"""

# KEYS[1]: chord hash; ARGV: size, index, failed ('1'/'0'), member meta, ttl ms (0: none).
# Returns {recorded, done, first failed member's meta or nil, body_sent, results-in-order}.
_CHORD_ADD = """
local key = KEYS[1]
local size, index, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[5])
local stored = redis.call('HGET', key, 'size')
if stored and tonumber(stored) ~= size then
  return redis.error_reply('CHORDSIZE ' .. stored)
end
local recorded = redis.call('HSETNX', key, 'm:' .. index, ARGV[4])
local done
if recorded == 1 then
  if not stored then redis.call('HSET', key, 'size', size) end
  done = redis.call('HINCRBY', key, 'done', 1)
  if ARGV[3] == '1' then redis.call('HSETNX', key, 'failed', index) end
  if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
else
  done = tonumber(redis.call('HGET', key, 'done'))
end
local failed = redis.call('HGET', key, 'failed')
local failed_meta = false
if failed then failed_meta = redis.call('HGET', key, 'm:' .. failed) end
local results = {}
if done == size and not failed then
  for i = 0, size - 1 do results[i + 1] = redis.call('HGET', key, 'm:' .. i) end
end
return {recorded, done, failed_meta, redis.call('HEXISTS', key, 'body_sent'), results}
"""

# KEYS[1]: chord hash; ARGV[1]: token. 1: this token holds the flag, 0: another does,
# -1: no such chord.
_MARK_BODY_SENT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HSETNX', KEYS[1], 'body_sent', ARGV[1]) == 1 then return 1 end
if redis.call('HGET', KEYS[1], 'body_sent') == ARGV[1] then return 1 end
return 0
"""

_TRANSIENT = (RedisConnectionError, RedisTimeoutError)
#: Ids per command when a call names very many (keeps one reply, and Redis's pause, small).
_CHUNK = 1000


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisStore:
    """A :class:`~amqptasks.results.store.ResultStore` on Redis; safe from many threads."""

    def __init__(
        self,
        url: str,
        *,
        expires: float | None = DEFAULT_EXPIRES,
        namespace: str = "amqptasks",
        connect_timeout: float = 5.0,
        socket_timeout: float = 10.0,
        retries: int = 3,
        client_name: str = "amqptasks-results",
    ) -> None:
        if not namespace or any(c.isspace() for c in namespace):
            raise ValueError(f"namespace must be non-empty and without spaces: {namespace!r}")
        self.url = url
        self.expires = check_expires(expires)
        self.namespace = namespace
        self._safe_url = redact_url(url)
        self._retries = retries
        common: dict[str, Any] = {
            "socket_connect_timeout": connect_timeout,
            "socket_timeout": socket_timeout,
            "client_name": client_name,
        }
        try:
            self._client = redis.Redis.from_url(
                url,
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries, _TRANSIENT),
                **common,
            )
            # wait() handles its own reconnection (it must re-read after one), so its pub/sub
            # connections never retry behind its back.
            self._subscriber = redis.Redis.from_url(
                url, retry=Retry(NoBackoff(), 0, _TRANSIENT), **common
            )
        except (ValueError, TypeError) as exc:
            raise ValueError(f"results backend {self._safe_url!r}: {exc}") from exc
        self._save_script = self._client.register_script(_SAVE)
        self._chord_script = self._client.register_script(_CHORD_ADD)
        self._mark_script = self._client.register_script(_MARK_BODY_SENT)
        self._closed = False

    def __repr__(self) -> str:
        return f"<RedisStore {self._safe_url} namespace={self.namespace!r}>"

    # -- keys ------------------------------------------------------------------------------
    def _result_key(self, task_id: str) -> str:
        return f"{self.namespace}:result:{task_id}"

    def _channel(self, task_id: str) -> str:
        return f"{self.namespace}:ready:{task_id}"

    def _group_key(self, group_id: str) -> str:
        return f"{self.namespace}:group:{group_id}"

    def _chord_key(self, chord_id: str) -> str:
        return f"{self.namespace}:chord:{chord_id}"

    def _ttl_ms(self) -> int:
        return 0 if self.expires is None else max(1, round(self.expires * 1000))

    # -- errors ----------------------------------------------------------------------------
    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        if self._closed:
            raise ResultStoreError(f"result store {self._safe_url}: {what}: the store is closed")
        try:
            yield
        except _TRANSIENT as exc:
            raise ResultStoreError(
                f"result store {self._safe_url}: {what}: Redis unreachable: {exc}"
            ) from exc
        except RedisError as exc:
            raise ResultStoreError(f"result store {self._safe_url}: {what}: {exc}") from exc

    def _decode(self, task_id: str, raw: bytes) -> ResultMeta:
        try:
            return ResultMeta.from_json(raw)
        except ValueError as exc:
            raise ResultStoreError(
                f"result store {self._safe_url}: record {task_id!r} is corrupt: {exc}"
            ) from exc

    # -- records ---------------------------------------------------------------------------
    def save(self, metas: Sequence[StoredRecord]) -> None:
        if not metas:
            return
        keys: list[str] = []
        args: list[Any] = [self._ttl_ms()]
        for meta in metas:
            keys += (self._result_key(meta.id), self._channel(meta.id))
            args += (meta.status, meta.to_json())
        with self._errors(f"saving {len(metas)} record(s)"):
            self._save_script(keys=keys, args=args)

    def get(self, task_id: str) -> ResultMeta | None:
        return self.get_many([task_id])[0]

    def get_many(self, task_ids: Sequence[str]) -> list[ResultMeta | None]:
        # MULTI/EXEC: one snapshot, so a reader never sees half of a batch save() wrote.
        with self._errors("reading results"):
            pipe = self._client.pipeline(transaction=True)
            for tid in task_ids:
                pipe.hget(self._result_key(tid), "meta")
            raws: list[bytes | None] = pipe.execute()
        return [
            None if raw is None else self._decode(tid, raw)
            for tid, raw in zip(task_ids, raws, strict=True)
        ]

    def forget(self, task_ids: Sequence[str]) -> None:
        with self._errors(f"forgetting {len(task_ids)} record(s)"):
            for start in range(0, len(task_ids), _CHUNK):
                chunk = task_ids[start : start + _CHUNK]
                if chunk:
                    self._client.delete(*(self._result_key(t) for t in chunk))

    # -- waiting ---------------------------------------------------------------------------
    def wait(self, task_ids: Sequence[str], timeout: float | None) -> bool:
        """Read; subscribe to each missing id's ready channel; read again; wait for messages.

        The second read happens only after Redis confirmed every subscription, so a record
        saved after it is announced to this subscriber, and one saved before it is read:
        nothing lands unseen, and nothing is polled. A lost connection ends the
        subscription; the wait then starts over (a record may have landed while it was
        away), up to ``retries`` times in a row before it raises ResultStoreError.
        """
        pending = set(task_ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        failures = 0
        while True:
            try:
                return self._wait_once(pending, deadline)
            except _TRANSIENT as exc:
                failures += 1
                if failures > self._retries or _left(deadline) == 0:
                    raise ResultStoreError(
                        f"result store {self._safe_url}: waiting for {len(pending)} "
                        f"result(s): Redis unreachable: {exc}"
                    ) from exc
                time.sleep(min(0.05 * 2**failures, _left(deadline, 0.5)))
            except RedisError as exc:
                raise ResultStoreError(
                    f"result store {self._safe_url}: waiting for results: {exc}"
                ) from exc

    def _wait_once(self, pending: set[str], deadline: float | None) -> bool:
        if self._closed:
            raise ResultStoreError(f"result store {self._safe_url}: the store is closed")
        self._drop_ready(pending)  # the common case: already there, no subscription needed
        if not pending:
            return True
        if _left(deadline) == 0:
            return False
        channels = {self._channel(t).encode(): t for t in pending}
        pubsub = self._subscriber.pubsub()
        try:
            pubsub.subscribe(*channels)
            confirmed = 0
            while confirmed < len(channels):
                message = pubsub.get_message(timeout=_left(deadline, 60.0))
                if message is None:
                    if _left(deadline) == 0:
                        return False
                elif message["type"] == "subscribe":
                    confirmed += 1
                elif message["type"] == "message":
                    pending.discard(channels[message["channel"]])
            # Subscribed to every channel: whatever lands from now on is announced to us, so
            # reading once more closes the window between the first read and the subscribe.
            self._drop_ready(pending)
            while pending:
                left = _left(deadline, 60.0)
                if left == 0:
                    return False
                message = pubsub.get_message(timeout=left)
                if message is not None and message["type"] == "message":
                    pending.discard(channels[message["channel"]])
            return True
        finally:
            pubsub.close()

    def _drop_ready(self, pending: set[str]) -> None:
        """Remove the ids whose record is READY, reading their statuses in one round trip.

        Through the non-retrying client: a connection error here must restart the whole
        read-subscribe-read sequence, not retry the read alone.
        """
        ids = sorted(pending)
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            pipe = self._subscriber.pipeline(transaction=False)
            for tid in chunk:
                pipe.hget(self._result_key(tid), "status")
            for tid, status in zip(chunk, pipe.execute(), strict=True):
                if status is not None and status in _READY_B:
                    pending.discard(tid)

    # -- groups and chords -----------------------------------------------------------------
    def save_group(self, group_id: str, task_ids: Sequence[str]) -> None:
        ttl = self._ttl_ms()
        with self._errors(f"saving group {group_id!r}"):
            self._client.set(self._group_key(group_id), dumps(list(task_ids)), px=ttl or None)

    def get_group(self, group_id: str) -> list[str] | None:
        with self._errors(f"reading group {group_id!r}"):
            raw = self._client.get(self._group_key(group_id))
        if raw is None:
            return None
        members = loads(raw)
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise ResultStoreError(
                f"result store {self._safe_url}: group {group_id!r} is corrupt: {members!r}"
            )
        return members

    def chord_add(self, chord_id: str, size: int, index: int, meta: ResultMeta) -> ChordProgress:
        [progress] = self.chord_add_many([(chord_id, size, index, meta)])
        if isinstance(progress, ValueError):
            raise progress
        return progress

    def chord_add_many(self, members: Sequence[ChordMember]) -> list[ChordProgress | ValueError]:
        """Several :meth:`chord_add` calls, one script call each, in one round trip (a
        pipeline without MULTI: each script is atomic on its own). A lost connection fails
        them all (the caller retries; every call is idempotent per index)."""
        out: list[ChordProgress | ValueError | None] = [None] * len(members)
        pipe = self._client.pipeline(transaction=False)
        sent: list[int] = []
        for i, (chord_id, size, index, meta) in enumerate(members):
            try:
                failed = check_chord_member(chord_id, size, index, meta)
                record = meta.to_json()
            except ValueError as exc:
                out[i] = exc
                continue
            except TypeError as exc:  # this member's alone: never a retry of the whole batch
                out[i] = ValueError(f"chord {chord_id!r} member {index}: {exc}")
                continue
            args = [size, index, "1" if failed else "0", record, self._ttl_ms()]
            self._chord_script(keys=[self._chord_key(chord_id)], args=args, client=pipe)
            sent.append(i)
        if sent:
            if len(members) == 1:
                chord_id, _size, index, _meta = members[0]
                what = f"adding member {index} to chord {chord_id!r}"
            else:
                what = f"adding {len(sent)} chord member(s)"
            with self._errors(what):
                replies = pipe.execute(raise_on_error=False)
            for i, reply in zip(sent, replies, strict=True):
                out[i] = self._progress(members[i], reply)
        return [p for p in out if p is not None]

    def _progress(self, member: ChordMember, reply: Any) -> ChordProgress | ValueError:
        chord_id, size, index, _meta = member
        if isinstance(reply, ResponseError) and str(reply).startswith("CHORDSIZE"):
            stored = str(reply).split()[1]
            return ValueError(f"chord {chord_id!r} has size {stored}, not {size} (member {index})")
        if isinstance(reply, Exception):
            raise ResultStoreError(
                f"result store {self._safe_url}: adding member {index} to chord "
                f"{chord_id!r}: {reply}"
            ) from reply
        recorded, done, failed_raw, body_sent, raws = reply
        failed_meta = None if failed_raw is None else self._decode(chord_id, failed_raw)
        results = None
        if raws:
            results = [self._decode(chord_id, raw).result for raw in raws]
        return ChordProgress(
            done=int(done),
            size=size,
            complete=int(done) == size,
            failed=failed_meta,
            results=results,
            body_sent=bool(body_sent),
            recorded=bool(recorded),
        )

    def chord_mark_body_sent(self, chord_id: str, token: str | None = None) -> bool:
        token = token or uuid.uuid4().hex
        with self._errors(f"marking chord {chord_id!r} body sent"):
            won = self._mark_script(keys=[self._chord_key(chord_id)], args=[token])
        if won == -1:
            raise ResultStoreError(
                f"result store {self._safe_url}: chord {chord_id!r} does not exist "
                "(no member was added, or it expired)"
            )
        return bool(won == 1)

    # -- housekeeping ----------------------------------------------------------------------
    def purge_expired(self, now: datetime | None = None) -> int:
        """Redis removes expired keys itself (every key carries a TTL): nothing to do, 0."""
        del now
        return 0

    def stats(self) -> dict[str, int]:
        """Keys per kind in this namespace (a SCAN: for tests and dashboards, not hot paths)."""
        ns = _glob_escape(self.namespace)
        out: dict[str, int] = {}
        with self._errors("counting keys"):
            for kind, plural in (("result", "results"), ("group", "groups"), ("chord", "chords")):
                out[plural] = sum(
                    1 for _ in self._client.scan_iter(match=f"{ns}:{kind}:*", count=1000)
                )
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._client.close()
        self._subscriber.close()


_READY_B = frozenset(s.encode() for s in READY_STATES)


def _left(deadline: float | None, cap: float | None = None) -> float:
    """Seconds until ``deadline`` (0 when past), at most ``cap``; None means forever."""
    if deadline is None:
        return cap if cap is not None else float("inf")
    left = max(0.0, deadline - time.monotonic())
    return left if cap is None else min(left, cap)
