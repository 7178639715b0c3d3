"""The training loop: plain PyTorch on `accelerate`, readable top to bottom.

accelerate does device placement, mixed precision (bf16 autocast on CPU where it pays, CUDA
bf16/fp16), gradient accumulation and distributed wrapping. The loop's parts are next to it:
`step` (one micro-batch, the loss normalised over units, the optimizer update), `cadence` (when to
log, evaluate and save; resumable batches; the checkpoint writer), `evaluation` (streamed
evaluation, best-model tracking, early stopping), `optimizer`, `progress` and `state`.

A model sharded with FSDP2 (`train.fsdp`, see `distributed`) arrives here already sharded and is
not passed to `accelerate.prepare` (which would wrap it in DDP too); its weights are read and
written only through the sharding-aware, collective functions of `distributed`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from accelerate import Accelerator
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader

from tunesmith.config import TrainConfig
from tunesmith.data.batching import padding_share
from tunesmith import distributed
from tunesmith.loop.cadence import Cadence, Checkpointer, ResumableBatches
from tunesmith.loop.checkpoint import Checkpoint, any_process, remove_partial, restore_checkpoint
from tunesmith.loop.evaluation import BestModel, restore_best
from tunesmith.loop.interrupt import StopSignals, interrupt, stopping_notice
from tunesmith.loop.optimizer import make_optimizer, make_scheduler
from tunesmith.loop.progress import progress_line
from tunesmith.loop.state import LoopResult, restore_log, saved_position
from tunesmith.loop.step import TrainStep
from tunesmith.runs.rundir import JsonlLog
from tunesmith.speed.cpu import math_attention_max_length
from tunesmith.speed.embedding_rows import decay_unseen_rows

log = logging.getLogger("tunesmith")


def train_loop(
    *,
    model: nn.Module,
    task,
    state,
    train_cfg: TrainConfig,
    train_loader: DataLoader,
    eval_loader: DataLoader | None,
    loss_fn: Callable,
    accelerator: Accelerator,
    run_dir: Path,
    metric: str,
    bigger_better: bool,
    show_progress: bool = True,
    resume: Checkpoint | None = None,
    fingerprint: dict | None = None,
    eval_references=None,
    tokenizer=None,
) -> LoopResult:
    """Train; with `resume`, continue from that checkpoint exactly where the run stopped.

    `fingerprint` (config and data hashes) is stored in every checkpoint so a resume can check it
    continues the same run."""
    cadence = Cadence(train_cfg, len(train_loader))
    optimizer = make_optimizer(model, train_cfg)
    decay_unseen_rows(model, optimizer)  # where the embedding trains only the data's rows (`embedding_rows`)
    scheduler = make_scheduler(optimizer, train_cfg, cadence.total_steps)
    sampler_generator = getattr(train_loader.sampler, "generator", None)
    sharded = distributed.sharding(model, accelerator) == "fsdp2"
    model, optimizer, train_loader, scheduler, eval_loader = _prepare(
        accelerator, sharded, model, optimizer, train_loader, scheduler, eval_loader)
    checkpoints_dir = run_dir / "checkpoints"
    if accelerator.is_main_process:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        remove_partial(checkpoints_dir)
    result = _starting_point(resume, model, optimizer, scheduler, accelerator, run_dir)
    logbook = JsonlLog(run_dir / "log.jsonl", enabled=accelerator.is_main_process)
    step = TrainStep(model=model, task=task, loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler,
                     accelerator=accelerator, train_cfg=train_cfg, logbook=logbook, checkpoints_dir=checkpoints_dir,
                     sharded=sharded, deepspeed=distributed.deepspeed_requested(accelerator),
                     # Compiled graphs keep torch's kernel choice (switching kernels per batch would recompile).
                     math_attention_max=math_attention_max_length(train_cfg))
    saver = Checkpointer(folder=checkpoints_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                         scaler=step.scaler, accelerator=accelerator, train_cfg=train_cfg, logbook=logbook,
                         fingerprint=fingerprint, started=time.perf_counter() - result.train_seconds)
    console = Console(stderr=True)
    best = None if eval_loader is None else BestModel(
        model=model, loader=eval_loader, task=task, state=state, loss_fn=loss_fn, accelerator=accelerator,
        references=eval_references, metric=metric, bigger_better=bigger_better,
        patience=train_cfg.early_stopping_patience, path=checkpoints_dir / "best.safetensors", logbook=logbook,
        announce=console.log if show_progress else log.info, tokenizer=tokenizer)
    eval_on_start = train_cfg.eval_on_start if train_cfg.eval_on_start is not None else task.evaluate_before_training
    if best is not None and resume is None and eval_on_start:
        best.before_training(result)
    batches = ResumableBatches(train_loader, sampler_generator, resume, accelerator)
    progress = progress_line(console, disable=not show_progress or not accelerator.is_main_process)
    meter = _Throughput()
    model.train()
    with progress, StopSignals(notice=stopping_notice if accelerator.is_main_process else None) as signals:
        # loss, lr and speed stay unset (not shown) until the first logging step measures them
        bar = progress.add_task("train", total=cadence.total_steps, completed=result.global_step, epoch=float(result.epoch))

        def stop_if_asked(last_batch: bool = False) -> None:
            # Every process stops at the same step (a signal may reach them at different moments).
            if not last_batch and any_process(accelerator, signals.received is not None):
                interrupt(signals, saver.save(result), run_dir, result.global_step)

        while not result.stopped_early and not cadence.done(result):
            for batch in batches.epoch(result):
                inputs, labels, _ = task.split_batch(batch)
                _count_tokens(result, inputs)
                step(result, inputs, labels)
                meter.samples += len(labels)
                result.train_samples += len(labels) * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                result.global_step += 1
                epoch = cadence.fractional_epoch(result)
                if cadence.log_due(result.global_step):
                    _log_training(result, epoch, scheduler, meter, logbook, progress, bar)
                progress.update(bar, completed=result.global_step, epoch=epoch)
                evaluated = best is not None and cadence.eval_due(result.global_step)
                result.stopped_early = evaluated and best.evaluate(result, epoch)
                if result.stopped_early or cadence.done(result):
                    break
                last_batch = result.batches_in_epoch == len(batches)  # the epoch-end checkpoint follows
                if (evaluated or cadence.save_due(result.global_step)) and not last_batch:
                    saver.save(result)
                stop_if_asked(last_batch)
            batches.end_epoch(result, cadence.steps_per_epoch)
            if best is not None and not result.stopped_early and cadence.eval_at_epoch_end(result):
                result.stopped_early = best.evaluate(result, float(result.epoch))
            if not result.stopped_early and not cadence.done(result):
                saver.save(result)
                stop_if_asked()
        result.train_seconds = saver.seconds()
        saver.save(result)  # training is done, the final evaluation and saving are not: a crash there resumes from here
    return _finish(result, model, accelerator, checkpoints_dir, logbook, train_cfg)


def _prepare(accelerator: Accelerator, sharded: bool, model, optimizer, train_loader, scheduler, eval_loader):
    if sharded:  # already sharded in place (FSDP2): accelerate must not wrap it in DDP as well
        optimizer, train_loader, scheduler = accelerator.prepare(optimizer, train_loader, scheduler)
    else:
        model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    return model, optimizer, train_loader, scheduler, eval_loader


def _starting_point(resume: Checkpoint | None, model, optimizer, scheduler, accelerator: Accelerator, run_dir: Path) -> LoopResult:
    """A new run's counters, or those of the checkpoint it resumes (weights, optimizer, schedule and log restored)."""
    if resume is None:
        return LoopResult()
    restore_checkpoint(resume, model=accelerator.unwrap_model(model), optimizer=optimizer, scheduler=scheduler,
                       scaler=getattr(accelerator, "scaler", None), accelerator=accelerator)
    position = saved_position(resume.state["loop"])
    result = LoopResult(**{f.name: position[f.name] for f in fields(LoopResult) if f.name in position})
    if accelerator.is_main_process:  # the log restarts from the checkpoint: lines written after it are replayed
        restore_log(run_dir / "log.jsonl", position)
    log.info("resuming from %s (step %d, epoch %d, batch %d)", resume.path, result.global_step, result.epoch, result.batches_in_epoch)
    return result


class _Throughput:
    """Samples since the last logged step, and since when."""

    def __init__(self) -> None:
        self.start, self.samples = time.perf_counter(), 0

    def per_second(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.samples / elapsed if elapsed else 0.0

    def restart(self) -> None:
        self.start, self.samples = time.perf_counter(), 0


def _count_tokens(result: LoopResult, inputs: dict) -> None:
    real, padded = padding_share(inputs)
    result.real_tokens, result.padded_tokens = result.real_tokens + real, result.padded_tokens + padded


def _log_training(result: LoopResult, epoch: float, scheduler, meter: _Throughput, logbook: JsonlLog, progress, bar) -> None:
    record = {
        "type": "train",
        "step": result.global_step,
        "epoch": round(epoch, 4),
        "loss": result.running_loss / result.running_count if result.running_count else 0.0,
        "learning_rate": scheduler.get_last_lr()[0],
        "samples_per_second": meter.per_second(),
    }
    logbook.write(record)
    progress.update(bar, loss=record["loss"], lr=record["learning_rate"], sps=record["samples_per_second"])
    result.running_loss, result.running_count = 0.0, 0.0
    meter.restart()


def _finish(result: LoopResult, model, accelerator: Accelerator, checkpoints_dir: Path, logbook: JsonlLog,
            train_cfg: TrainConfig) -> LoopResult:
    """Restore the best weights into the model on every process and close the log."""
    if result.stopped_early:
        log.info("early stopping after %d evaluations without improvement", train_cfg.early_stopping_patience)
    unwrapped = accelerator.unwrap_model(model)
    accelerator.wait_for_everyone()  # the main process wrote the best checkpoint; everyone restores it
    restore_best(unwrapped, checkpoints_dir / "best.safetensors", accelerator)
    logbook.close()
    # DeepSpeed's engine holds the fp32 master weights the final save reads (`distributed.plain_model`):
    # `api` frees it after that.
    if distributed.deepspeed_engine(accelerator) is None:
        accelerator.free_memory()
    return result
