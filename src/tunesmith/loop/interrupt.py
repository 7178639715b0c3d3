"""Graceful stop on SIGINT/SIGTERM: the loop finishes its step, writes a checkpoint and exits.

A second Ctrl-C stops at once (the default behaviour), for a user who does not want to wait. The
first one is acknowledged on stderr (`notice`), so a user knows the stop is under way and what a
second Ctrl-C would cost.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable

from tunesmith.errors import TunesmithError

# Shell convention: 128 + signal number.
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class TrainingInterrupted(TunesmithError):
    """Training stopped on a signal after writing a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = EXIT_CODES.get(signum, 130)


class StopSignals:
    """Context manager: records SIGINT/SIGTERM instead of dying mid-step (main thread only;
    elsewhere, e.g. in a notebook's worker thread, signals keep their default behaviour)."""

    def __init__(self, notice: Callable[[int], str] | None = None):
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._notice = notice

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.received = signum
        if self._notice is not None:
            # A plain write: a signal handler must not take the logging module's locks.
            sys.stderr.write(f"\n{self._notice(signum)}\n")
            sys.stderr.flush()

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in EXIT_CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def stopping_notice(signum: int) -> str:
    return (f"{signal.Signals(signum).name} received: stopping after this step, once a checkpoint is written "
            "(`tunesmith train --resume` continues from it); press Ctrl-C again to stop at once")


def interrupt(signals: StopSignals, checkpoint_path, run_dir, global_step: int) -> None:
    """Raise the stop, naming the checkpoint just written and the command that continues."""
    signum = signals.received or signal.SIGTERM
    raise TrainingInterrupted(
        f"{signal.Signals(signum).name} received: stopped after step {global_step}, checkpoint written to "
        f"'{checkpoint_path}'. Continue with: tunesmith train --resume {run_dir}", signum,
    )
