"""The systemd units in deploy/systemd: what they promise (warm shutdown, restarts,
environment files, a dedicated user), and ``systemd-analyze verify`` finds nothing to say.

The units run ``/opt/amqptasks/bin/amqptasks`` (deploy/README.md installs it there); verify
insists that the executable exists, so the check runs on copies pointed at this checkout's
``amqptasks`` — every other line as shipped.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
SHIPPED_EXE = "/opt/amqptasks/bin/amqptasks"
NAMES = ("amqptasks-worker@.service", "amqptasks-beat.service", "amqptasks-dashboard.service")


def settings(name: str) -> dict[str, list[str]]:
    """``key -> values`` of a unit's ``[Service]`` section (keys may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_units_stop_warm_restart_on_failure_and_read_environment_files(name: str) -> None:
    s = settings(name)
    assert s["KillSignal"] == ["SIGTERM"]  # the worker's warm shutdown
    assert s["Restart"] == ["on-failure"]
    assert s["RestartPreventExitStatus"] == ["2"]  # a config error does not heal by restarting
    assert s["User"] == ["amqptasks"] and s["Group"] == ["amqptasks"]
    assert "/etc/amqptasks/amqptasks.env" in s["EnvironmentFile"]
    assert s["ExecStart"][0].startswith(SHIPPED_EXE + " ")
    assert int(s["TimeoutStopSec"][0]) >= 30


def test_the_worker_unit_waits_for_running_tasks_and_takes_its_queues_from_the_instance():
    s = settings("amqptasks-worker@.service")
    assert int(s["TimeoutStopSec"][0]) >= 300  # long tasks finish before systemd kills
    assert s["KillMode"] == ["mixed"]  # SIGTERM to the worker; its children are its own
    assert s["Environment"] == ["AMQPTASKS_QUEUES=%I"]
    assert "-Q ${AMQPTASKS_QUEUES} -n %i@%H" in s["ExecStart"][0]


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed here (Debian's systemd package has it)",
)
def test_systemd_analyze_verify_finds_nothing_to_say(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("amqptasks")
    assert exe.exists(), exe
    for name in NAMES:
        text = (UNITS / name).read_text()
        assert SHIPPED_EXE in text
        (tmp_path / name).write_text(text.replace(SHIPPED_EXE, str(exe)))
    paths = [str(tmp_path / n) for n in NAMES]
    paths.append(str(tmp_path / "amqptasks-worker@default.service"))  # an instance of it
    out = subprocess.run(
        ["systemd-analyze", "verify", *paths],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 even when it ignores a bad line, so what it says must be nothing.
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_verify_would_complain_about_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt setting is reported."""
    bad = tmp_path / "broken.service"
    bad.write_text("[Service]\nExecStart=/bin/true\nRestart=sometimes\nKillSignal=SIGBOGUS\n")
    out = subprocess.run(
        ["systemd-analyze", "verify", str(bad)], capture_output=True, text=True, check=False
    )
    assert "Failed to parse service restart specifier" in out.stderr
