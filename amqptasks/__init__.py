"""amqptasks: a task framework that lives natively on RabbitMQ (AMQP 0-9-1).

Publishes are confirmed and mandatory, deliveries are acked only once their outcome is safe,
and whatever cannot run lands in a dead-letter queue with its reason.
"""

from .app import App
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
    ResultTimeout,
    TaskError,
    UnroutableError,
)
from .results import AsyncResult
from .tasks import Task

__all__ = [
    "AmqpTasksError",
    "App",
    "AsyncResult",
    "BrokerError",
    "BrokerRefused",
    "ConfigError",
    "PublishError",
    "PublishNacked",
    "PublishTimeout",
    "ResultTimeout",
    "ResultsDisabled",
    "Settings",
    "Task",
    "TaskError",
    "UnroutableError",
    "load_config",
]
__version__ = "0.1.0"
