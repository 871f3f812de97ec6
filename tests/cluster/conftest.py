"""The cluster suite: a real 3-node RabbitMQ cluster (``deploy/cluster.sh``) on this machine.

The session fixture starts the cluster (if it is not running) and stops it at the end; each
test gets its own vhost on it. Tests kill nodes with SIGKILL through the script, the way a
crash looks to the other nodes and to the clients. Figures are printed at the end of the run
("cluster figures"), like the fault suite's.
"""

import json
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))

from broker_fixtures import _AUTH, BASE_CONFIG, ROOT, worker_factory  # noqa: F401

SCRIPT = ROOT / "deploy" / "cluster.sh"
AMQP_PORTS = (5681, 5682, 5683)
MGMT_PORTS = (15681, 15682, 15683)
FIGURES: list[str] = []


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.cluster)


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("cluster figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture
def report():
    return FIGURES.append


def script(*args: str, timeout: float = 240) -> str:
    out = subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if out.returncode != 0:
        raise AssertionError(f"cluster.sh {' '.join(args)} failed:\n{out.stdout}{out.stderr}")
    return out.stdout


def mgmt(method: str, path: str, body: Any = None, nodes: tuple[int, ...] = (1, 2, 3)) -> Any:
    """The management API of the first of ``nodes`` that answers (a node may be down)."""
    data = json.dumps(body).encode() if body is not None else None
    last: Exception | None = None
    for n in nodes:
        req = urllib.request.Request(
            f"http://127.0.0.1:{MGMT_PORTS[n - 1]}/api{path}",
            data=data,
            method=method,
            headers={"Authorization": _AUTH, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw = resp.read()
                return json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            if method == "DELETE" and exc.code == 404:
                return None
            raise
        except OSError as exc:
            last = exc
    raise AssertionError(f"no management API answered: {last}")


@dataclass
class Cluster:
    """The running cluster and one test's vhost on it."""

    vhost: str

    def urls(self, order: tuple[int, ...] = (1, 2, 3)) -> list[str]:
        vh = urllib.parse.quote(self.vhost, safe="")
        return [f"amqp://guest:guest@localhost:{AMQP_PORTS[n - 1]}/{vh}" for n in order]

    def kill(self, node: int) -> None:
        script("kill", str(node))

    def restart(self, node: int) -> None:
        script("restart", str(node))

    def queue(self, name: str) -> dict[str, Any]:
        vh = urllib.parse.quote(self.vhost, safe="")
        return mgmt("GET", f"/queues/{vh}/{urllib.parse.quote(name, safe='')}")  # type: ignore[no-any-return]

    def leader(self, name: str) -> str:
        info = self.queue(name)
        return str(info.get("leader") or info.get("node"))

    def config(self, tmp_path: Path, name: str, order: tuple[int, ...], **overrides: Any) -> Path:
        """A config for this vhost: broker.url lists the nodes in ``order``; quorum queues
        everywhere; one work queue ('default', the shipped default route's) plus overrides."""
        data = json.loads(json.dumps(BASE_CONFIG))
        data["broker"] = {"url": self.urls(order), "publish_timeout": 10, "reconnect_max_delay": 2}
        data["imports"] = ["testtasks", "ledgertasks"]
        data["topology"] = {"default_queue_type": "quorum", "replicas": 3}
        data["queues"] = {"default": BASE_CONFIG["queues"]["default"]}
        data["routes"] = {}
        data["results"] = {"backend": f"sqlite:///{tmp_path}/results.db", "ignore_result": True}
        data.update(overrides)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path


@pytest.fixture(scope="session")
def cluster_up():
    if not SCRIPT.exists():
        pytest.fail("deploy/cluster.sh is missing")
    script("start", timeout=300)
    try:
        yield
    finally:
        script("stop", timeout=300)


@pytest.fixture
def cluster(cluster_up, request):
    script("start", timeout=300)  # a node a previous test left down comes back
    name = f"test.{request.node.name[:40]}.{uuid.uuid4().hex[:8]}"
    vh = urllib.parse.quote(name, safe="")
    mgmt("PUT", f"/vhosts/{vh}", {})
    mgmt("PUT", f"/permissions/{vh}/guest", {"configure": ".*", "write": ".*", "read": ".*"})
    try:
        yield Cluster(name)
    finally:
        mgmt("DELETE", f"/vhosts/{vh}")
