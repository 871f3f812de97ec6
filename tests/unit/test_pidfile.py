"""``--pidfile``: written atomically, a live pid refuses, a stale one is replaced, removed at
exit only while it is ours (real files, real processes)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from amqptasks.cli.pidfile import PidFile, PidFileError


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_written_and_removed(tmp_path: Path) -> None:
    path = tmp_path / "w.pid"
    with PidFile(path):
        assert path.read_text() == f"{os.getpid()}\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pid"]
    assert not path.exists()


def test_a_live_pid_refuses_and_keeps_its_file(tmp_path: Path) -> None:
    path = tmp_path / "w.pid"
    live = subprocess.Popen(["sleep", "30"])
    try:
        path.write_text(f"{live.pid}\n")
        with pytest.raises(PidFileError, match=f"process {live.pid} is running"):
            PidFile(path).acquire()
        assert path.read_text() == f"{live.pid}\n"
    finally:
        live.kill()
        live.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pid"]


@pytest.mark.parametrize("left", ["dead", "garbage", "empty"])
def test_a_stale_or_unreadable_file_is_replaced(tmp_path: Path, left: str) -> None:
    path = tmp_path / "w.pid"
    path.write_text({"dead": f"{dead_pid()}\n", "garbage": "not a pid\n", "empty": ""}[left])
    pid = PidFile(path)
    pid.acquire()
    assert path.read_text() == f"{os.getpid()}\n"
    pid.release()
    assert not path.exists()


def test_release_leaves_a_successors_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "w.pid"
    pid = PidFile(path)
    pid.acquire()
    path.write_text("12345\n")  # someone else took it over meanwhile
    pid.release()
    assert path.read_text() == "12345\n"


def test_a_directory_that_cannot_be_written_is_said(tmp_path: Path) -> None:
    with pytest.raises(PidFileError, match="cannot write there: No such file or directory"):
        PidFile(tmp_path / "missing" / "w.pid").acquire()
