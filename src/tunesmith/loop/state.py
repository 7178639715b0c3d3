"""The loop's resumable state (counters and position in the data), as a checkpoint stores it, and the
log's restoration on resume."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tunesmith.runs.rundir import truncate_file, write_jsonl

log = logging.getLogger("tunesmith")


@dataclass
class LoopResult:
    """Counters of a run; together with the position fields it is the loop's resumable state."""

    global_step: int = 0
    epochs_completed: float = 0.0
    best_metric: float | None = None
    best_step: int | None = None
    stopped_early: bool = False
    train_samples: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0  # evaluations inside the loop (part of train_seconds)
    real_tokens: int = 0
    padded_tokens: int = 0
    # log.jsonl's size at the checkpoint (a resume cuts it back to that) and the last evaluation's step:
    # the checkpoint holds these, not the log's records, which grow with the run.
    log_bytes: int = 0
    last_eval_step: int | None = None
    # Position: the epoch, batches of it consumed, and the sampler's RNG when the epoch began.
    epoch: int = 0
    batches_in_epoch: int = 0
    epoch_sampler_state: list[int] | None = None
    evaluations_without_improvement: int = 0
    running_loss: float = 0.0  # the loss summed over those units
    running_count: float = 0.0  # the loss's units (examples or target tokens) since the last logged step
    nonfinite_steps: int = 0  # consecutive skipped updates (fp16 scaler overflows aside)
    start_metrics: dict | None = None  # the evaluation before the first step (`train.eval_on_start`)

    @property
    def samples_per_second(self) -> float:
        """Training throughput: evaluations inside the loop are not counted (as when Trainer runs without them)."""
        seconds = self.train_seconds - self.eval_seconds
        return self.train_samples / seconds if seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Real (not padding) input tokens per training second on this process, evaluations not counted."""
        seconds = self.train_seconds - self.eval_seconds
        return self.real_tokens / seconds if seconds > 0 else 0.0

    @property
    def padding_share(self) -> float:
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0


def saved_position(position: dict) -> dict:
    """A checkpoint's loop state; one written before log offsets were stored holds the log's records
    (`history`) instead: the last evaluation's step is read from them."""
    history = position.get("history")
    if history is None or "last_eval_step" in position:
        return position
    last = history[-1] if history else None
    return {**position, "last_eval_step": last["step"] if last is not None and last["type"] == "eval" else None}


def restore_log(path: Path, position: dict) -> None:
    """Cut log.jsonl back to where it stood at the checkpoint (the steps after it run again)."""
    if "log_bytes" not in position:  # an older checkpoint: it holds the records themselves
        write_jsonl(path, position.get("history", []))
        return
    size = truncate_file(path, position["log_bytes"]) if path.exists() else 0
    if size < position["log_bytes"]:
        log.warning("'%s' is shorter than when the checkpoint was written (%d of %d bytes): records before the "
                    "checkpoint are missing from it; training resumes exactly all the same", path, size, position["log_bytes"])
