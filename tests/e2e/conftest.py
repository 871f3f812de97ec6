import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))

from broker_fixtures import broker, broker_up, worker_factory  # noqa: F401
from celery_fixtures import celery_call, celery_python  # noqa: F401
from dashboard_fixtures import broker_user, dashboard_factory  # noqa: F401
