"""The run directory: made only once the data and the model passed their checks; undone if the run fails."""

from __future__ import annotations

import contextlib
from pathlib import Path

from tunesmith.config import RunConfig
from tunesmith import distributed
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.loop.checkpoint import Checkpoint
from tunesmith.loop.interrupt import TrainingInterrupted
from tunesmith.runs.lock import RunLock
from tunesmith.runs.rundir import (
    check_run_dir, create_run_dir, discard_new_run_dir, put_back_previous_run, run_state, save_config,
)


class NewRun:
    """What this `train` call did to output.dir (main process), so that a run that fails or is stopped
    undoes exactly that: an `--overwrite` puts the previous run back; a new run stopped before its first
    checkpoint leaves no half-made folder behind. Entered as the last cleanup, after the run lock."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.started = self.created = self.saved = False
        self.outcome: str | None = None  # "put_back" | "removed"

    def begin(self, created: bool) -> "NewRun":
        self.started, self.created = True, created
        return self

    def __enter__(self) -> "NewRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None or self.saved or not self.started:
            return False
        if put_back_previous_run(self.run_dir):
            self.outcome = "put_back"
            note = (f"the previous run in '{self.run_dir}' is back as it was (the unfinished replacement was removed); "
                    "run the same command again to replace it")
            if isinstance(exc, TrainingInterrupted):
                exc.problems = [exc.problems[0].split(", checkpoint written")[0] + f" before the new run had saved; {note}"]
            elif isinstance(exc, TunesmithError):
                exc.problems.append(f"--overwrite: {note}")
        elif issubclass(exc_type, (KeyboardInterrupt, TrainingInterrupted)) and run_state(self.run_dir) == "unstarted":
            discard_new_run_dir(self.run_dir, self.created)
            self.outcome = "removed"
        return False

    def stopped_at_once(self, resuming: bool) -> str:
        """The message for a run stopped by KeyboardInterrupt (after `__exit__` ran)."""
        if self.outcome == "put_back":
            return (f"stopped at once (Ctrl-C) before the new run had saved; the previous run in '{self.run_dir}' is back as "
                    "it was; run the same command again to replace it")
        if self.outcome == "removed":
            return (f"stopped (Ctrl-C) before the run's first checkpoint, so nothing was kept (the new run directory "
                    f"'{self.run_dir}' was removed); run the same command again to start over")
        if not self.started and not resuming:
            return "stopped (Ctrl-C) before training started; nothing was written; run the same command again to start"
        if run_state(self.run_dir) == "finished":
            return f"stopped (Ctrl-C) after the run had saved: '{self.run_dir}' is complete"
        return f"stopped at once (Ctrl-C); the last checkpoint is kept: continue with `tunesmith train --resume {self.run_dir}`"


def open_run_dir(cfg: RunConfig, run_dir: Path, checkpoint: Checkpoint | None, accelerator,
                 cleanup: contextlib.ExitStack, new_run: NewRun) -> None:
    """Lock the run directory (main process) and, for a fresh run, create it with its config; then check
    that every process sees it. Called once every process has passed the data and memory checks."""
    accelerator.wait_for_everyone()
    created = not run_dir.exists()  # before the lock, which makes the folder to hold its file
    if accelerator.is_main_process:
        cleanup.enter_context(RunLock(run_dir))  # first: no other run may write here from now on
        if checkpoint is None:
            check_run_dir(cfg)  # again: another run may have finished in this folder since the first check
            cleanup.enter_context(new_run.begin(created))  # from here on a failure undoes what this run wrote
            create_run_dir(run_dir, cfg.output.overwrite)
            save_config(run_dir, cfg)
    accelerator.wait_for_everyone()
    try:
        distributed.check_shared_run_dir(run_dir, accelerator)  # several machines: one run directory for all
    except ConfigError:
        if accelerator.is_main_process and checkpoint is None:
            discard_new_run_dir(run_dir, created)  # nothing ran: leave no half-made run behind
        raise
