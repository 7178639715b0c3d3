"""When the loop logs, evaluates and saves, where it is in the data (resumable batches), and the
checkpoint writer that saves each position once."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator

from tunesmith.config import TrainConfig
from tunesmith.loop.checkpoint import Checkpoint, restore_rng, save_checkpoint
from tunesmith.loop.state import LoopResult
from tunesmith.runs.rundir import JsonlLog


class Cadence:
    """The schedule of optimizer steps: how many, and at which of them the loop logs, evaluates and saves."""

    def __init__(self, train_cfg: TrainConfig, batches_per_epoch: int):
        self.cfg = train_cfg
        self.steps_per_epoch = max(1, math.ceil(batches_per_epoch / train_cfg.gradient_accumulation_steps))
        self.total_steps = (train_cfg.max_steps if train_cfg.max_steps > 0
                            else math.ceil(train_cfg.num_train_epochs * self.steps_per_epoch))

    def fractional_epoch(self, result: LoopResult) -> float:
        return result.epoch + min(1.0, (result.global_step - result.epoch * self.steps_per_epoch) / self.steps_per_epoch)

    def done(self, result: LoopResult) -> bool:
        return result.global_step >= self.total_steps

    def log_due(self, step: int) -> bool:
        return step % self.cfg.logging_steps == 0 or step == self.total_steps

    def eval_due(self, step: int) -> bool:
        return self.cfg.eval_strategy == "steps" and step % (self.cfg.eval_steps or 1) == 0

    def save_due(self, step: int) -> bool:
        return bool(self.cfg.save_steps) and step % self.cfg.save_steps == 0

    def eval_at_epoch_end(self, result: LoopResult) -> bool:
        """Each epoch under "epoch"; under "steps" once at the end of training (unless its last step just did)."""
        due = self.cfg.eval_strategy == "epoch" or (self.cfg.eval_strategy == "steps" and self.done(result))
        return due and result.last_eval_step != result.global_step


class ResumableBatches:
    """The training batches of each epoch from where the run stands: a resumed run skips the batches trained on
    before its checkpoint and replays the same order. The sampler's own generator orders each epoch; its state
    at the epoch's start is kept in the loop's state (accelerate keeps the sampler object when it wraps the
    loader)."""

    def __init__(self, loader, sampler_generator: torch.Generator | None, resume: Checkpoint | None, accelerator: Accelerator):
        self.loader, self.generator, self.resume, self.accelerator = loader, sampler_generator, resume, accelerator

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, result: LoopResult):
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(result.epoch)
        # Before the iterator starts (workers copy the collator then): a collator drawing per epoch (masking).
        collate_epoch = getattr(getattr(self.loader, "collate_fn", None), "set_epoch", None)
        if collate_epoch is not None:
            collate_epoch(result.epoch)
        skip = result.batches_in_epoch  # > 0 only when resuming mid-epoch
        if self.generator is not None:
            if result.epoch_sampler_state is not None:
                self.generator.set_state(torch.tensor(result.epoch_sampler_state, dtype=torch.uint8))
            result.epoch_sampler_state = self.generator.get_state().tolist()
        result.batches_in_epoch = 0
        if self.resume is not None and skip == 0:
            # Written between epochs: before this epoch's iterator started, which draws from the global RNG.
            self._restore_rng(skip)
        for batch in self.loader:
            result.batches_in_epoch += 1
            if result.batches_in_epoch <= skip:
                continue  # trained on before the checkpoint
            if self.resume is not None:
                # Written mid-epoch, after the iterator had started (drawing from the global RNG): the
                # checkpoint's RNG states are set only now, right before the first new batch, so dropout matches.
                self._restore_rng(skip)
            yield batch

    def _restore_rng(self, skip: int) -> None:
        restore_rng(self.resume, self.accelerator.process_index)
        self.accelerator.step = skip
        self.resume = None

    def end_epoch(self, result: LoopResult, steps_per_epoch: int) -> None:
        result.epoch += 1
        result.batches_in_epoch = 0
        # The sampler's state the next epoch starts from: a run resumed between epochs starts a new process,
        # whose generator would otherwise replay the first epoch's order.
        result.epoch_sampler_state = None if self.generator is None else self.generator.get_state().tolist()
        result.epochs_completed = min(result.epoch, result.global_step / steps_per_epoch)


class Checkpointer:
    """Writes a resumable checkpoint of the loop's current state, once per position. `fingerprint` (config
    and data hashes) goes into each, so a resume can check it continues the same run."""

    def __init__(self, *, folder: Path, model, optimizer, scheduler, scaler, accelerator: Accelerator, train_cfg: TrainConfig,
                 logbook: JsonlLog, fingerprint: dict | None, started: float):
        self.folder, self.model, self.optimizer, self.scheduler, self.scaler = folder, model, optimizer, scheduler, scaler
        self.accelerator, self.train_cfg, self.logbook = accelerator, train_cfg, logbook
        self.fingerprint, self.started = fingerprint or {}, started
        self._written: dict[str, Path] = {}

    def seconds(self) -> float:
        """Training time so far, a resumed run's earlier attempts included."""
        return time.perf_counter() - self.started

    def save(self, result: LoopResult) -> Path:
        position = f"{result.global_step}/{result.epoch}/{result.batches_in_epoch}"
        if position not in self._written:
            result.train_seconds = self.seconds()
            result.log_bytes = self.logbook.sync()
            loop_state = {"global_step": result.global_step, "loop": asdict(result), **self.fingerprint}
            self._written[position] = save_checkpoint(
                self.folder, step=result.global_step, model=self.accelerator.unwrap_model(self.model),
                optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler, loop_state=loop_state,
                accelerator=self.accelerator, save_total_limit=self.train_cfg.save_total_limit, keep_step=result.best_step,
            )
        return self._written[position]
