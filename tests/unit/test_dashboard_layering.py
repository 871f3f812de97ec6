"""The dashboard is one room: its web stack is imported nowhere else, and it reaches the
rest of amqptasks only through public modules (never the worker or a pika transport)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "amqptasks"


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            out.add(base)
    return out


def test_aiohttp_and_prometheus_client_are_imported_only_where_they_belong():
    """aiohttp only by the dashboard; prometheus-client by the dashboard and the worker's
    metrics module (``worker --metrics-port``), nowhere else."""
    allowed = {"aiohttp": set(), "prometheus_client": {("worker", "metrics.py")}}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        for name in _imports(path):
            lib = name.split(".")[0]
            if lib in allowed and "dashboard" not in parts and parts not in allowed[lib]:
                offenders.append((str(path.relative_to(PACKAGE)), name))
    assert offenders == []


def test_the_dashboard_uses_no_worker_module_and_no_pika_transport():
    for path in (PACKAGE / "dashboard").glob("*.py"):
        for name in _imports(path):
            assert "worker" not in name.split("."), (path.name, name)
            assert "pika" not in name, (path.name, name)
            assert not name.startswith("click"), (path.name, name)
