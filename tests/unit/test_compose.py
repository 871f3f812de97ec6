"""docker-compose.yml without a Docker engine: the YAML itself (profiles, loopback-only ports,
the cluster's shared cookie and peer list, the stack's commands), and ``docker compose
config`` (or ``docker-compose config``) when a client that can check it without a daemon is
installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_default_services_are_the_broker_and_redis() -> None:
    default = [name for name, s in SERVICES.items() if not s.get("profiles")]
    assert default == ["rabbitmq", "redis"]


def test_cluster_profile_has_three_nodes_like_cluster_sh() -> None:
    nodes = {n: s for n, s in SERVICES.items() if "cluster" in s.get("profiles", [])}
    assert sorted(nodes) == ["rabbit1", "rabbit2", "rabbit3"]
    conf = (ROOT / "deploy" / "compose" / "cluster.conf").read_text()
    for i, (name, s) in enumerate(sorted(nodes.items()), start=1):
        assert s["hostname"] == name
        assert f"127.0.0.1:{5680 + i}:5672" in s["ports"]  # deploy/cluster.sh's ports
        assert f"127.0.0.1:{15680 + i}:15672" in s["ports"]
        assert (
            "./deploy/compose/cluster.conf:/etc/rabbitmq/conf.d/20-cluster.conf:ro" in s["volumes"]
        )
        assert f"rabbit@{name}" in conf
        assert "AMQPTASKS_CLUSTER_COOKIE" in s["command"][0]  # one cookie for the three
    cookies = {s["environment"]["AMQPTASKS_CLUSTER_COOKIE"] for s in nodes.values()}
    assert len(cookies) == 1
    urls = (ROOT / "deploy" / "compose" / "cluster-urls").read_text().strip().split(",")
    assert [u.split("@")[1].split(":")[0] for u in urls] == ["rabbit1", "rabbit2", "rabbit3"]


def test_stack_profile_runs_worker_beat_and_dashboard() -> None:
    stack = {n: s for n, s in SERVICES.items() if "stack" in s.get("profiles", [])}
    assert sorted(stack) == ["beat", "dashboard", "worker"]
    assert stack["worker"]["command"][0] == "worker"
    assert stack["beat"]["command"] == ["beat"]
    # The login comes from the environment, which the dashboard reads itself: an unset or
    # empty AMQPTASKS_DASHBOARD_AUTH gets its refusal message, not "--basic-auth ''".
    assert stack["dashboard"]["command"] == ["dashboard", "--address", "0.0.0.0"]
    assert "entrypoint" not in stack["dashboard"]
    assert "AMQPTASKS_DASHBOARD_AUTH" in stack["dashboard"]["environment"]
    for s in stack.values():
        assert s["build"]["dockerfile"] == "deploy/Dockerfile"
        assert "AMQPTASKS_BROKER_URL" in s["environment"]
        assert set(s["depends_on"]) == {"rabbitmq", "redis"}
    assert (ROOT / "deploy" / "Dockerfile").exists()


def test_every_published_port_is_on_loopback() -> None:
    for name, s in SERVICES.items():
        for port in s.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)


def _client() -> list[str] | None:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.mark.parametrize("profiles", [[], ["cluster"], ["stack"], ["cluster", "stack"]])
def test_compose_client_accepts_the_file(profiles: list[str]) -> None:
    client = _client()
    if client is None:
        pytest.skip("no docker compose client here (the YAML-level tests above still ran)")
    args = [*client, "-f", str(ROOT / "docker-compose.yml")]
    for p in profiles:
        args += ["--profile", p]
    out = subprocess.run([*args, "config", "-q"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
