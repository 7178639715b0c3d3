"""The training loop: plain PyTorch on `accelerate`, readable top to bottom.

accelerate does device placement, mixed precision (bf16 autocast on CPU where it pays, CUDA
bf16/fp16), gradient accumulation and distributed wrapping; this file does the rest: AdamW with
no decay on biases and norms, warmup + schedule, clipping, periodic evaluation, early stopping
and keeping the best checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from transformers import get_scheduler

from .config import TrainConfig
from .data.batching import padding_share
from .methods import load_trainable_state, trainable_state
from .run import JsonlLog

log = logging.getLogger("tunesmith")

LOWER_IS_BETTER = ("loss", "mse", "rmse", "mae", "hamming_loss", "perplexity")


@dataclass
class LoopResult:
    global_step: int = 0
    epochs_completed: float = 0.0
    best_metric: float | None = None
    best_step: int | None = None
    stopped_early: bool = False
    train_samples: int = 0
    train_seconds: float = 0.0
    real_tokens: int = 0
    padded_tokens: int = 0
    history: list[dict] = field(default_factory=list)

    @property
    def samples_per_second(self) -> float:
        return self.train_samples / self.train_seconds if self.train_seconds else 0.0

    @property
    def padding_share(self) -> float:
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0


def greater_is_better(metric: str, configured: bool | None) -> bool:
    if configured is not None:
        return configured
    return not metric.removeprefix("eval_").startswith(LOWER_IS_BETTER)


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: never on biases or normalisation layers."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        is_norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()
        for name, param in module.named_parameters(recurse=False):
            # Tied weights (BART/T5 shared embeddings) appear under several modules: add them once,
            # or AdamW would update them several times per step.
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if is_norm or name.endswith("bias") or param.ndim < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.inference_mode()
def run_evaluation(model: nn.Module, loader: DataLoader, task, state: dict, loss_fn: Callable, accelerator: Accelerator):
    """One pass over `loader`; returns (metrics, accumulator). Only per-example scores are kept."""
    model.eval()
    accumulator = task.new_accumulator(state)
    for batch in loader:
        inputs, labels, extras = task.split_batch(batch)
        with accelerator.autocast():
            logits = task.logits(model(**inputs))
        # Under DDP, gather the batch first (one batch at a time: memory stays bounded). accelerate
        # pads the last global batch with repeated samples and `gather_for_metrics` drops them, so
        # metrics and loss cover each validation example exactly once.
        logits, labels, extras = accelerator.gather_for_metrics((logits, labels, extras))
        task.update(accumulator, logits, labels, loss_fn(logits, labels), extras, state)
    model.train()
    return task.compute_metrics(accumulator, state), accumulator


def _progress(console: Console | None, disable: bool) -> Progress:
    return Progress(
        TextColumn("[bold]epoch {task.fields[epoch]:.2f}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[sps]:.1f} samples/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
        transient=False,
    )


def save_best(model: nn.Module, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in trainable_state(model).items()}, str(tmp))
    os.replace(tmp, path)


def restore_best(model: nn.Module, path: Path) -> None:
    load_trainable_state(model, load_file(str(path)))


def train_loop(
    *,
    model: nn.Module,
    task,
    state: dict,
    train_cfg: TrainConfig,
    train_loader: DataLoader,
    eval_loader: DataLoader | None,
    loss_fn: Callable,
    accelerator: Accelerator,
    run_dir: Path,
    metric: str,
    bigger_better: bool,
    show_progress: bool = True,
) -> LoopResult:
    steps_per_epoch = max(1, math.ceil(len(train_loader) / train_cfg.gradient_accumulation_steps))
    total_steps = train_cfg.max_steps if train_cfg.max_steps > 0 else math.ceil(train_cfg.num_train_epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(optimizer_groups(model, train_cfg.weight_decay), lr=train_cfg.learning_rate)
    scheduler = get_scheduler(
        train_cfg.lr_scheduler_type,
        optimizer,
        num_warmup_steps=math.ceil(train_cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)

    result = LoopResult()
    best_path = run_dir / "checkpoints" / "best.safetensors"
    if accelerator.is_main_process:
        best_path.parent.mkdir(parents=True, exist_ok=True)
    evaluations_without_improvement = 0
    logbook = JsonlLog(run_dir / "log.jsonl", enabled=accelerator.is_main_process)
    running_loss, running_count, window_start, window_samples = 0.0, 0, time.perf_counter(), 0
    train_start = time.perf_counter()
    model.train()

    def evaluate_and_track(epoch: float) -> bool:
        """Evaluate, keep the best checkpoint; returns True when early stopping triggers."""
        nonlocal evaluations_without_improvement
        eval_start = time.perf_counter()
        metrics, _ = run_evaluation(model, eval_loader, task, state, loss_fn, accelerator)
        value = metrics.get(metric)
        if value is None:
            from .errors import ConfigError

            available = ", ".join(k for k, v in metrics.items() if isinstance(v, (int, float)))
            raise ConfigError(f"train.metric_for_best_model: '{metric}' is not computed for this task; choose one of: {available}")
        improved = result.best_metric is None or (value > result.best_metric if bigger_better else value < result.best_metric)
        if improved:
            result.best_metric, result.best_step = value, result.global_step
            evaluations_without_improvement = 0
            if accelerator.is_main_process:
                save_best(accelerator.unwrap_model(model), best_path)
        else:
            evaluations_without_improvement += 1
        record = {"type": "eval", "step": result.global_step, "epoch": round(epoch, 4), **_scalars(metrics),
                  "eval_seconds": round(time.perf_counter() - eval_start, 3), "is_best": improved}
        logbook.write(record)
        result.history.append(record)
        summary = "  ".join(f"{k} {v:.4f}" for k, v in _scalars(metrics).items() if k in (metric, "loss", "accuracy", "f1_macro", "f1_micro"))
        if accelerator.is_main_process:
            (console.log if show_progress else log.info)(f"eval @ step {result.global_step}: {summary}{'  (best)' if improved else ''}")
        patience = train_cfg.early_stopping_patience
        return patience is not None and evaluations_without_improvement >= patience

    console = Console(stderr=True)
    progress = _progress(console, disable=not show_progress or not accelerator.is_main_process)
    with progress:
        bar = progress.add_task("train", total=total_steps, epoch=0.0, loss=0.0, lr=train_cfg.learning_rate, sps=0.0)
        stop = False
        epoch = 0
        while not stop and result.global_step < total_steps:
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            for batch in train_loader:
                inputs, labels, _ = task.split_batch(batch)
                real, padded = padding_share(inputs)
                result.real_tokens, result.padded_tokens = result.real_tokens + real, result.padded_tokens + padded
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        logits = task.logits(model(**inputs))
                    loss = loss_fn(logits, labels)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and train_cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), train_cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                batch_size = len(labels)
                step_loss = loss.detach()
                if accelerator.num_processes > 1:  # log the global batch's loss, not this shard's
                    step_loss = accelerator.reduce(step_loss, reduction="mean")
                running_loss += float(step_loss) * batch_size
                running_count += batch_size
                window_samples += batch_size
                result.train_samples += batch_size * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                result.global_step += 1
                fractional_epoch = epoch + min(1.0, (result.global_step - epoch * steps_per_epoch) / steps_per_epoch)
                if result.global_step % train_cfg.logging_steps == 0 or result.global_step == total_steps:
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "type": "train",
                        "step": result.global_step,
                        "epoch": round(fractional_epoch, 4),
                        "loss": running_loss / max(running_count, 1),
                        "learning_rate": scheduler.get_last_lr()[0],
                        "samples_per_second": window_samples / elapsed if elapsed else 0.0,
                    }
                    logbook.write(record)
                    result.history.append(record)
                    progress.update(bar, loss=record["loss"], lr=record["learning_rate"], sps=record["samples_per_second"])
                    running_loss, running_count, window_start, window_samples = 0.0, 0, time.perf_counter(), 0
                progress.update(bar, completed=result.global_step, epoch=fractional_epoch)
                steps_due = train_cfg.eval_strategy == "steps" and result.global_step % (train_cfg.eval_steps or 1) == 0
                if eval_loader is not None and steps_due and evaluate_and_track(fractional_epoch):
                    result.stopped_early, stop = True, True
                if stop or result.global_step >= total_steps:
                    break
            epoch += 1
            result.epochs_completed = min(epoch, result.global_step / steps_per_epoch)
            epoch_end_eval = train_cfg.eval_strategy == "epoch" or (train_cfg.eval_strategy == "steps" and result.global_step >= total_steps)
            if eval_loader is not None and not stop and epoch_end_eval and not _just_evaluated(result):
                if evaluate_and_track(float(epoch)):
                    result.stopped_early, stop = True, True
    result.train_seconds = time.perf_counter() - train_start
    if result.stopped_early:
        log.info("early stopping after %d evaluations without improvement", train_cfg.early_stopping_patience)
    unwrapped = accelerator.unwrap_model(model)
    accelerator.wait_for_everyone()  # the main process wrote the best checkpoint; everyone restores it
    if best_path.exists():
        restore_best(unwrapped, best_path)
    logbook.close()
    accelerator.free_memory()
    return result


def _just_evaluated(result: LoopResult) -> bool:
    return bool(result.history) and result.history[-1]["type"] == "eval" and result.history[-1]["step"] == result.global_step


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
