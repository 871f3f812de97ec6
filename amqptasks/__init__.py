"""amqptasks: a task framework that lives natively on RabbitMQ (AMQP 0-9-1).

Publishes are confirmed and mandatory, deliveries are acked only once their outcome is safe,
and whatever cannot run lands in a dead-letter queue with its reason.
"""

from .app import App
from .canvas import Signature, chain, chord, group, signature
from .config import Settings, load_config
from .errors import (
    AmqpTasksError,
    BrokerError,
    BrokerRefused,
    ConfigError,
    PublishError,
    PublishNacked,
    PublishTimeout,
    ResultsDisabled,
    ResultsUnavailable,
    ResultTimeout,
    TaskError,
    UnroutableError,
)
from .results import AsyncResult, GroupResult
from .tasks import Task

__all__ = [
    "AmqpTasksError",
    "App",
    "AsyncResult",
    "BrokerError",
    "BrokerRefused",
    "ConfigError",
    "GroupResult",
    "PublishError",
    "PublishNacked",
    "PublishTimeout",
    "ResultTimeout",
    "ResultsDisabled",
    "ResultsUnavailable",
    "Settings",
    "Signature",
    "Task",
    "TaskError",
    "UnroutableError",
    "chain",
    "chord",
    "group",
    "load_config",
    "signature",
]
__version__ = "0.1.0"
