import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))

from broker_fixtures import broker, broker_up, worker_factory  # noqa: F401
from store_fixtures import (  # noqa: F401
    redis_store,
    redis_store_factory,
    redis_up,
    sqlite_store,
    sqlite_store_factory,
)
