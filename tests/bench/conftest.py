import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))

from broker_fixtures import broker, broker_up  # noqa: F401
