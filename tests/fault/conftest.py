import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))

from broker_fixtures import broker, broker_up, worker_factory  # noqa: F401

FIGURES: list[str] = []


@pytest.fixture
def report():
    """Tests append their measured figures; they are printed at the end of the run."""
    return FIGURES.append


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("fault-injection figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
