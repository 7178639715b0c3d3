"""One writer per run directory: an advisory lock (`RUN_DIR/.lock`) held for the whole run.

`flock` locks die with their process, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from pathlib import Path

from tunesmith.errors import ConfigError

LOCK_NAME = ".lock"

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are then not protected against each other
    fcntl = None


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        if fcntl is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                f"output.dir: '{self.path.parent}' is being written by another tunesmith run ({holder}); "
                "wait for it to finish, stop it, or choose another output.dir"
            ) from None
        os.ftruncate(fd, 0)
        stamp = dt.datetime.now().isoformat(timespec="seconds")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_unlocked(run_dir: Path) -> None:
    """Fail fast (before data and model load) if a live run holds `run_dir`."""
    if (Path(run_dir) / LOCK_NAME).exists():
        RunLock(run_dir).acquire().release()


def is_locked(run_dir: Path) -> bool:
    """Whether a live run holds `run_dir` now."""
    try:
        check_unlocked(run_dir)
    except ConfigError:
        return True
    return False
