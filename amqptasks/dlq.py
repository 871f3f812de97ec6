"""Dead letters as a person reads them, and how one is prepared for replay. Pure: no I/O.

A dead letter is the original body with the original properties plus ``x-amqptasks-*``
headers written by the worker (see docs/protocol.md). Messages that the broker dead-lettered
itself (quorum ``delivery_limit``, a rejection after a failed dead-letter publish) carry only
RabbitMQ's ``x-death``; :func:`describe` reads those too. A Celery protocol v2 dead letter is
named by its ``task`` and ``id`` headers (its body is ``[args, kwargs, embed]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .celery_compat import celery_task_of, message_id_of
from .protocol import BROKER_DEATH_HEADERS, DL_PREFIX, Properties, dumps, loads

__all__ = [
    "REPLAY_HEADER",
    "REPLAY_SKIPPED",
    "DeadLetter",
    "describe",
    "replay_message",
    "replay_skip_reason",
]

#: Header on a replayed copy: a digest of the dead letter it came from. The same dead letter
#: always gives the same marker, so a copy published twice by an interrupted replay (a kill
#: between the broker's confirm and the replay ledger's line) is recognisable as a copy.
REPLAY_HEADER = DL_PREFIX + "replay"

#: Dead-letter reasons whose message fails the same way when replayed unchanged (the body and
#: properties are sent back as they are): ``dlq replay`` skips these unless ``--force``. Every
#: other reason is replayed: ``unknown-task`` (the task may be deployed now), ``task-failed``,
#: ``time-limit``, ``worker-lost`` and the broker's own (``broker:*``). The table of all reasons
#: is docs/protocol.md section 8; a unit test keeps the two in step.
REPLAY_SKIPPED: Mapping[str, str] = {
    "decode-error": "the body decodes the same way again",
    "content-type-refused": "its content type is still refused",
    "too-large": "the body is as large as before",
    "expired": "its expiry time has passed for good",
    "celery-unsupported": "it is refused the same way again (unless the config changed)",
}


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    task: str
    reason: str
    detail: str
    exception: str
    attempts: int
    first_failed_at: str
    last_failed_at: str
    original_exchange: str
    original_routing_key: str
    worker: str
    traceback: str


def _h(headers: dict[str, Any], name: str, default: Any = "") -> Any:
    value = headers.get(DL_PREFIX + name, default)
    return value.decode() if isinstance(value, bytes) else value


def describe(
    body: bytes, props: Properties, exchange: str = "", routing_key: str = ""
) -> DeadLetter:
    headers = dict(props.headers or {})
    task = ""
    celery = celery_task_of(props)
    if celery is not None:
        task = celery[0]
    else:
        try:
            obj = loads(body)
            if isinstance(obj, dict):
                task = str(obj.get("task", ""))
        except Exception:  # undecodable bodies are exactly what a DLQ holds
            task = "<undecodable>"
    deaths = headers.get("x-death") or []
    death = deaths[0] if deaths and isinstance(deaths[0], dict) else {}
    reason = _h(headers, "reason") or (f"broker:{death.get('reason')}" if death else "unknown")
    exc_type = _h(headers, "exception-type")
    exc_msg = _h(headers, "exception-message")
    broker_keys = death.get("routing-keys") or [routing_key]
    return DeadLetter(
        # The decoder's rule, so list/show/replay name the message as the worker's log did:
        # the body's id, else message_id (which the worker writes onto the dead-letter copy
        # when it had to generate the id).
        id=message_id_of(body, props) or "",
        task=task,
        reason=str(reason),
        detail=str(_h(headers, "detail")),
        exception=f"{exc_type}: {exc_msg}" if exc_type else "",
        attempts=int(_h(headers, "attempts", 0) or int(death.get("count", 0) or 0)),
        first_failed_at=str(_h(headers, "first-failed-at")),
        last_failed_at=str(_h(headers, "last-failed-at")),
        original_exchange=str(_h(headers, "original-exchange", death.get("exchange", exchange))),
        original_routing_key=str(_h(headers, "original-routing-key", broker_keys[0])),
        worker=str(_h(headers, "worker")),
        traceback=str(_h(headers, "traceback")),
    )


def replay_skip_reason(letter: DeadLetter) -> str | None:
    """Why replaying ``letter`` unchanged cannot succeed (:data:`REPLAY_SKIPPED`), or None."""
    return REPLAY_SKIPPED.get(letter.reason)


def replay_message(
    body: bytes, props: Properties, marker: str | None = None
) -> tuple[bytes, Properties]:
    """The message to republish: attempts reset (``retries`` removed from a JSON body, or set
    to 0 in a Celery message's header), the dead-letter and broker death headers dropped (an
    earlier replay's marker too), everything else as the producer sent it, plus ``marker`` as
    :data:`REPLAY_HEADER` when given."""
    celery = celery_task_of(props) is not None
    try:
        obj = None if celery else loads(body)
    except Exception:
        obj = None
    if isinstance(obj, dict) and "retries" in obj:
        obj = {k: v for k, v in obj.items() if k != "retries"}
        body = dumps(obj)
    headers = {
        k: v
        for k, v in (props.headers or {}).items()
        if not k.startswith((DL_PREFIX, *BROKER_DEATH_HEADERS))
    }
    if celery and headers.get("retries"):
        headers["retries"] = 0
    if marker is not None:
        headers[REPLAY_HEADER] = marker
    # reply_to dropped: the original caller's reply channel is long gone.
    return body, replace(props, reply_to=None, headers=headers or None, delivery_mode=2)
