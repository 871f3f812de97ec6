"""The one exception tree of amqptasks.

Every error the package raises on purpose derives from :class:`AmqpTasksError`, so a caller can
catch "anything amqptasks says went wrong" in one clause. Client-library exceptions (pika,
aio-pika, aiormq) are translated at the transport boundary with ``raise ... from exc``.

::

    AmqpTasksError
    ├── ConfigError                 config file invalid: names file, key path, expectation
    │   └── TaskImportError         a module under ``imports`` is missing or raised on import
    ├── ProtocolError               a message body/properties that cannot become an envelope
    │   ├── DecodeError             not UTF-8 JSON object / missing or mistyped field
    │   ├── EncodeError             arguments that cannot be serialised
    │   ├── ContentTypeRefused      content type not in the accepted list (pickle by default)
    │   ├── MessageTooLarge         body over serialization.max_body_size
    │   └── CeleryUnsupported       a Celery message amqptasks cannot run as sent (or ingest off)
    ├── RoutingError                no route for a task name
    ├── TopologyError               broker objects differ from the config (which, what, values)
    ├── BrokerError                 the broker could not be reached or talked to
    │   ├── BrokerRefused           the broker refused the login, vhost or permission
    │   └── PublishError            a publish did not get a positive confirm
    │       ├── UnroutableError     mandatory publish returned: no queue bound
    │       ├── PublishNacked       the broker nacked the publish
    │       └── PublishTimeout      no confirm within the configured bound
    ├── TaskNotRegistered           a task name the app does not know
    ├── TaskExpired                 a message whose ``expires`` passed before it started
    ├── TaskRevoked                 a revoked task: not started, or stopped (``--terminate``)
    ├── Retry                       raised by ``task.retry()``: control flow, not a failure
    ├── SoftTimeLimitExceeded       raised inside a task at its soft time limit (catchable)
    ├── TimeLimitExceeded           a task outlived its hard time limit and was stopped
    ├── MaxRetriesExceeded          ``retry()`` with no retries left and no ``exc`` given
    ├── WorkerLost                  the process running a task died (killed, OOM, os._exit)
    ├── ResultError                 the result of a task cannot be given
    │   ├── ResultTimeout           ``get(timeout=)`` ran out
    │   ├── ResultsUnavailable      rpc:// cannot read a result by id, nor keep a chord
    │   ├── ResultsDisabled         the task ignores results
    │   └── ResultStoreError        the result store (SQLite, Redis) failed: names URL and cause
    └── TaskError                   a task raised remotely (re-raised by ``AsyncResult.get``)
"""

from __future__ import annotations

__all__ = [
    "AmqpTasksError",
    "BrokerError",
    "BrokerRefused",
    "CeleryUnsupported",
    "ConfigError",
    "ContentTypeRefused",
    "DecodeError",
    "EncodeError",
    "MaxRetriesExceeded",
    "MessageTooLarge",
    "ProtocolError",
    "PublishError",
    "PublishNacked",
    "PublishTimeout",
    "ResultError",
    "ResultStoreError",
    "ResultTimeout",
    "ResultsDisabled",
    "ResultsUnavailable",
    "Retry",
    "RoutingError",
    "SoftTimeLimitExceeded",
    "TaskError",
    "TaskExpired",
    "TaskImportError",
    "TaskNotRegistered",
    "TaskRevoked",
    "TimeLimitExceeded",
    "TopologyError",
    "UnroutableError",
    "WorkerLost",
]


class AmqpTasksError(Exception):
    """Root of every error amqptasks raises on purpose."""


class ConfigError(AmqpTasksError):
    """The configuration is invalid.

    ``str()`` is one line a person can act on: ``file: key.path: what was expected``.
    """

    def __init__(self, path: str, key: str, problem: str) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {problem}")


class TaskImportError(ConfigError):
    """A task module named under ``imports`` could not be imported: missing, or its code raised.

    A start-up error the user fixes like a config error (the CLI exits 2). ``str()`` names the
    module, where it is listed, the exception and the file:line that raised it::

        importing 'myapp.tasks' (imports[0] in config/amqptasks.yaml) failed:
        ZeroDivisionError: division by zero (at myapp/tasks.py:3)

    ``__cause__`` is the original exception (its traceback is printed with ``-l debug``).
    """

    def __init__(
        self, module: str, path: str, key: str, error: BaseException, where: str | None = None
    ) -> None:
        said = " ".join(str(error).split())
        what = f"{type(error).__name__}: {said}" if said else type(error).__name__
        super().__init__(path, key, what)
        self.module = module
        self.where = where
        listed = f"{key} in {path}" if path else key
        self.args = (
            f"importing {module!r} ({listed}) failed: {what}" + (f" (at {where})" if where else ""),
        )

    def __str__(self) -> str:
        return str(self.args[0])


class ProtocolError(AmqpTasksError):
    """A message could not be turned into an envelope.

    ``reason`` is a short machine-friendly token (``decode-error``, ``content-type-refused``)
    that the worker writes into the dead-letter headers next to the human message.
    """

    reason = "protocol-error"


class DecodeError(ProtocolError):
    """The body is not a UTF-8 JSON object of the documented shape."""

    reason = "decode-error"


class EncodeError(ProtocolError):
    """Task arguments cannot be serialised into the wire format."""

    reason = "encode-error"


class ContentTypeRefused(ProtocolError):
    """The message's content type is not accepted (pickle is refused unless enabled)."""

    reason = "content-type-refused"


class MessageTooLarge(ProtocolError):
    """The body is larger than ``serialization.max_body_size``; it is dead-lettered unread."""

    reason = "too-large"


class CeleryUnsupported(ProtocolError):
    """A Celery protocol v2 message that cannot be mapped as sent (a chord whose size only
    Celery's result backend knows, an option amqptasks cannot honour, a compressed body), or
    any Celery message while ``serialization.celery_ingest`` is off. Dead-lettered, never
    dropped; the detail names what (docs/migration.md)."""

    reason = "celery-unsupported"


class RoutingError(AmqpTasksError):
    """No exchange/routing key could be chosen for a task."""


class TopologyError(AmqpTasksError):
    """The broker holds an object that differs from what the config declares."""


class BrokerError(AmqpTasksError):
    """The broker could not be reached or refused an operation."""


class BrokerRefused(BrokerError):
    """The broker refused the login, the virtual host or a permission.

    Raised at once, without the retry a broker that is down gets: asking again gives the same
    answer. ``reason`` is the broker's own text (``ACCESS_REFUSED - Login was refused ...``,
    ``NOT_ALLOWED - vhost x not found``); ``str()`` names the broker with its password
    redacted (build it with :func:`amqptasks.transport.refusal.refused`).
    """

    def __init__(self, message: str, reason: str = "") -> None:
        self.reason = reason
        super().__init__(message)


class PublishError(BrokerError):
    """A publish did not end in a positive publisher confirm."""


class UnroutableError(PublishError):
    """A mandatory publish was returned: no queue is bound for its exchange and routing key."""

    def __init__(self, exchange: str, routing_key: str, reply_text: str = "NO_ROUTE") -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        where = f"exchange {exchange!r}" if exchange else "the default exchange (queue name)"
        super().__init__(
            f"message unroutable: {where} has no queue bound for routing key "
            f"{routing_key!r} ({reply_text})"
        )


class PublishNacked(PublishError):
    """The broker answered a publish with basic.nack (e.g. a full queue with reject-publish)."""


class PublishTimeout(PublishError):
    """No publisher confirm arrived within the configured bound."""


class TaskNotRegistered(AmqpTasksError):
    """A task name that no ``@app.task`` registered."""


class TaskExpired(AmqpTasksError):
    """The message's ``expires`` passed before the task started: it is not run, and lands in
    the dead-letter queue with reason ``expired``."""


class TaskRevoked(AmqpTasksError):
    """The task id was revoked: it is settled without running (state REVOKED), or, revoked
    with ``terminate``, stopped while it ran. Raised inside a thread-pool task that is
    terminated (at its next Python bytecode), so ``finally`` blocks still run."""


class Retry(AmqpTasksError):
    """Raised by ``task.retry()``: the worker republishes the task (confirmed) with one more
    retry and a broker-side delay, then acks the original."""

    def __init__(
        self,
        exc: BaseException | None = None,
        countdown: float | None = None,
        max_retries: int | None = None,
    ) -> None:
        self.exc = exc
        self.countdown = countdown
        self.max_retries = max_retries
        super().__init__(f"retry requested ({exc!r})" if exc else "retry requested")


class SoftTimeLimitExceeded(AmqpTasksError):
    """Raised inside a running task when its soft time limit passes; catch it to clean up."""


class TimeLimitExceeded(AmqpTasksError):
    """A task ran past its hard time limit and was stopped (or abandoned, see docs)."""


class MaxRetriesExceeded(AmqpTasksError):
    """A task asked to retry with no retries left."""


class WorkerLost(AmqpTasksError):
    """The process running the task died before reporting an outcome."""


class ResultError(AmqpTasksError):
    """The result of a task cannot be given."""


class ResultTimeout(ResultError):
    """``AsyncResult.get(timeout=...)`` ran out before a reply arrived."""


class ResultsUnavailable(ResultError):
    """No way to read this result here: ``results.backend`` is ``rpc://`` (only the publishing
    process hears a reply) and the handle was restored by id — or a chord was asked for,
    which needs a store."""


class ResultsDisabled(ResultError):
    """The task (or the config default) ignores results, so none will ever arrive."""


class ResultStoreError(ResultError):
    """The result store could not be reached or refused an operation.

    The message names the store's URL (password redacted) and the cause, e.g.
    ``result store redis://:***@cache:6379/0: cannot connect: Connection refused``; the client
    library's exception is chained as ``__cause__``.
    """


class TaskError(AmqpTasksError):
    """A task failed in a worker.

    ``AsyncResult.get()`` raises a subclass whose ``__name__`` is the remote exception's type
    name. No type named in a message is ever imported; only builtin exception types, and the
    outcome errors of this module a worker reports (``TaskRevoked``, ``TimeLimitExceeded``,
    ``WorkerLost``...: ``results.rpc.OWN_ERRORS``), are mixed in (so ``except
    ZeroDivisionError`` or ``except TaskRevoked`` works) because they are already loaded.
    """

    def __init__(self, exc_type: str, message: str, traceback: str | None = None) -> None:
        self.exc_type = exc_type
        self.message = message
        self.remote_traceback = traceback
        super().__init__(message)

    def __str__(self) -> str:
        return self.message
