"""A real Celery 5 producer for the Celery ingest tests.

``celery_python`` is the interpreter of a virtualenv with the latest Celery from PyPI, built
once by the benchmarks' peer-venv mechanism (``bench.frameworks.ensure_venv``) in
``.amqptasks/venvs/celery`` and reused afterwards. ``celery_call`` runs
``celery_producer.py`` there — Celery's own code, unmodified — against a test's vhost.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from broker_fixtures import ROOT, SUPPORT, Broker

CELERY_VENV = ROOT / ".amqptasks" / "venvs" / "celery"


@pytest.fixture(scope="session")
def celery_python() -> str:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench.frameworks import ensure_venv

    CELERY_VENV.parent.mkdir(parents=True, exist_ok=True)
    # Two test runs must not build the same virtualenv at once.
    with (CELERY_VENV.parent / "celery.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return ensure_venv(
            "celery", "celery", "celery", lambda m: print(m, file=sys.stderr), venv=CELERY_VENV
        )


@pytest.fixture
def celery_call(celery_python: str, broker: Broker) -> Callable[..., dict[str, Any]]:
    """``celery_call({"call": ...})`` -> what the producer printed (its ``RESULT`` line)."""

    def call(spec: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "CELERY_BROKER_URL": broker.url,
            "PYTHONUNBUFFERED": "1",
        }
        done = subprocess.run(
            [celery_python, str(SUPPORT / "celery_producer.py"), json.dumps(spec)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        assert done.returncode == 0 and lines, (
            f"the Celery producer exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
        result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
        return result

    return call
