"""``amqptasks worker|beat --pidfile PATH``: one process per pid file.

A supervisor that is not systemd (or a script) finds the process by its pid file, so two
workers given the same file must not both run: the second one refuses to start while the
pid written there is alive. A file left by a process that died (killed, a crash, a reboot)
is *stale* and replaced.

* written atomically: the pid goes to a temporary file in the same directory, which is then
  linked to ``PATH`` (``link`` fails when ``PATH`` exists, so of two processes starting at
  once one wins and the other sees its pid) — or renamed over a stale one;
* removed at exit, only while it still holds our pid;
* "alive" is ``kill(pid, 0)``: a pid reused by an unrelated process after a reboot also
  counts as alive, and the error says which pid to check.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from types import TracebackType

__all__ = ["PidFile", "PidFileError"]


class PidFileError(Exception):
    """The pid file names a live process, or cannot be written."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    return True


def _read(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


class PidFile:
    """Holds ``path`` for this process (a context manager: acquire, then release at exit)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.pid = os.getpid()
        self._held = False

    def acquire(self) -> None:
        """Write our pid, replacing a stale file; :class:`PidFileError` when the pid in it
        is alive or the file cannot be written."""
        where = self.path.parent if str(self.path.parent) else Path(".")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=where)
        except OSError as exc:
            raise PidFileError(
                f"--pidfile {self.path}: cannot write there: {exc.strerror}"
            ) from None
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(f"{self.pid}\n")
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                self._refuse_if_alive()
                os.replace(tmp, self.path)  # stale (dead pid) or unreadable: ours now
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
                    raise
                self._refuse_if_alive()  # a file system without hard links: rename
                os.replace(tmp, self.path)
            if _read(self.path) != self.pid:  # another process replaced the stale file too
                self._refuse_if_alive()
        except OSError as exc:
            raise PidFileError(f"--pidfile {self.path}: cannot write it: {exc.strerror}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._held = True

    def _refuse_if_alive(self) -> None:
        pid = _read(self.path)
        if pid is not None and pid != self.pid and _alive(pid):
            raise PidFileError(
                f"--pidfile {self.path}: process {pid} is running (a worker with this pid "
                f"file is already started; stop it, or remove the file if pid {pid} is not "
                "ours)"
            )

    def release(self) -> None:
        """Remove the file if it still holds our pid (a successor's file is left alone)."""
        if self._held and _read(self.path) == self.pid:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._held = False

    def __enter__(self) -> PidFile:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
