"""Evaluation inside the loop: one streamed pass over the validation set, the best-model tracking
(the best weights kept in `checkpoints/best.safetensors`) and early stopping."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from tunesmith import distributed
from tunesmith.errors import ConfigError
from tunesmith.loop.checkpoint import any_process, fsync_file
from tunesmith.loop.state import LoopResult
from tunesmith.runs.rundir import JsonlLog

log = logging.getLogger("tunesmith")

LOWER_IS_BETTER = ("loss", "mse", "rmse", "mae", "hamming_loss", "perplexity")


def greater_is_better(metric: str, configured: bool | None) -> bool:
    if configured is not None:
        return configured
    return not metric.removeprefix("eval_").startswith(LOWER_IS_BETTER)


@torch.inference_mode()
def run_evaluation(model: nn.Module, loader: DataLoader, task, state: dict, loss_fn: Callable, accelerator: Accelerator,
                   references=None, tokenizer=None):
    """One pass over `loader`; returns (metrics, accumulator). Each batch is reduced by the task on its own
    process (per-example scores, generated text) before anything is gathered: never per-token logits.
    `tokenizer`: for tasks that generate (decoding, stop strings)."""
    model.eval()
    accumulator = task.new_accumulator(state, references)
    for batch in loader:
        inputs, labels, extras = task.split_batch(batch)
        with accelerator.autocast():
            reduced = task.evaluation_batch(model, inputs, labels, extras, loss_fn, state, tokenizer=tokenizer)
        task.update(accumulator, _gathered(reduced, accelerator), state)
    model.train()
    return task.compute_metrics(accumulator, state), accumulator


def _gathered(reduced: dict, accelerator: Accelerator) -> dict:
    """A reduced batch from every process. Under DDP, gathered one batch at a time (memory stays bounded);
    accelerate pads the last global batch with repeated samples and `gather_for_metrics` drops them, so
    metrics and loss cover each example exactly once. Tensors are gathered as tensors (2-D and larger padded
    along dimension 1 with -100 first); lists (generated text) as objects, in the same order."""
    if accelerator.num_processes == 1:
        return reduced
    tensors = {k: v for k, v in reduced.items() if isinstance(v, torch.Tensor)}
    tensors = {k: accelerator.pad_across_processes(v, dim=1, pad_index=-100) if v.ndim >= 2 else v for k, v in tensors.items()}
    gathered = accelerator.gather_for_metrics(tensors)
    for key, value in reduced.items():
        if key not in tensors:
            gathered[key] = accelerator.gather_for_metrics(list(value), use_gather_object=True)
    return gathered


@dataclass
class BestModel:
    """Evaluates, keeps the best weights and counts evaluations without improvement (early stopping)."""

    model: nn.Module
    loader: DataLoader
    task: object
    state: object
    loss_fn: Callable
    accelerator: Accelerator
    references: object
    metric: str
    bigger_better: bool
    patience: int | None
    path: Path
    logbook: JsonlLog
    announce: Callable[[str], None]
    tokenizer: object = None  # for tasks that generate

    def evaluate(self, result: LoopResult, epoch: float) -> bool:
        """Evaluate at the current step; returns True when early stopping triggers."""
        start = time.perf_counter()
        metrics, accumulator = run_evaluation(self.model, self.loader, self.task, self.state, self.loss_fn, self.accelerator,
                                              self.references, self.tokenizer)
        value = metrics.get(self.metric)
        if value is None:
            available = ", ".join(k for k, v in metrics.items() if isinstance(v, (int, float)))
            raise ConfigError(f"train.metric_for_best_model: '{self.metric}' is not computed for this task; "
                              f"choose one of: {available}")
        improved = result.best_metric is None or (value > result.best_metric if self.bigger_better else value < result.best_metric)
        if improved:
            result.best_metric, result.best_step = value, result.global_step
            result.evaluations_without_improvement = 0
            save_best(self.accelerator.unwrap_model(self.model), self.path, self.accelerator)
        else:
            result.evaluations_without_improvement += 1
        seconds = time.perf_counter() - start
        result.eval_seconds += seconds
        self.logbook.write({"type": "eval", "step": result.global_step, "epoch": round(epoch, 4), **scalars(metrics),
                            "eval_seconds": round(seconds, 3), "is_best": improved,
                            **self.task.evaluation_log_fields(accumulator, self.state)})
        result.last_eval_step = result.global_step
        if self.accelerator.is_main_process:
            self.announce(f"eval @ step {result.global_step}: {self._summary(metrics)}{'  (best)' if improved else ''}")
        return self.patience is not None and result.evaluations_without_improvement >= self.patience

    def before_training(self, result: LoopResult) -> None:
        """The evaluation before the first step: logged and kept in `result.start_metrics`, never a best model."""
        start = time.perf_counter()
        metrics, accumulator = run_evaluation(self.model, self.loader, self.task, self.state, self.loss_fn, self.accelerator,
                                              self.references, self.tokenizer)
        seconds = time.perf_counter() - start
        result.eval_seconds += seconds
        result.start_metrics = scalars(metrics)
        self.logbook.write({"type": "eval", "step": 0, "epoch": 0.0, **result.start_metrics, "eval_seconds": round(seconds, 3),
                            "is_best": False, "before_training": True,
                            **self.task.evaluation_log_fields(accumulator, self.state)})
        if self.accelerator.is_main_process:
            self.announce(f"eval before training: {self._summary(metrics)}")

    def _summary(self, metrics: dict) -> str:
        """The metric the best model is chosen by, the loss, then the task's headline metrics."""
        shown = dict.fromkeys((self.metric, "loss", *self.task.summary_metrics(self.state)))
        values = scalars(metrics)
        return "  ".join(f"{k} {values[k]:.4f}" for k in shown if k in values)


def scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def save_best(model: nn.Module, path: Path, accelerator: Accelerator) -> None:
    """Every process calls it (under sharding or DeepSpeed the weights are gathered together); the main process writes."""
    if not distributed.collective_weights(model, accelerator) and not accelerator.is_main_process:
        return
    weights = distributed.gather_state(model, accelerator, keep=accelerator.is_main_process)
    if accelerator.is_main_process:
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp))
        fsync_file(tmp)  # on disk before the rename, so a crash leaves the old best or the new one
        os.replace(tmp, path)


def restore_best(model: nn.Module, path: Path, accelerator: Accelerator) -> None:
    """Every process calls it. Under FSDP2 the main process reads the file and scatters the weights;
    under DeepSpeed each process reads it one tensor at a time; otherwise each process reads it.
    Under sharding or DeepSpeed the main process decides whether there is one (loading is a
    collective then)."""
    if not distributed.collective_weights(model, accelerator):
        if path.exists():
            distributed.load_trainable_state(model, load_file(str(path)), accelerator)
        return
    if not any_process(accelerator, accelerator.is_main_process and path.exists()):
        return
    if distributed.deepspeed_engine(accelerator) is not None:  # every process reads, one tensor at a time
        with distributed.TensorFile(path) as state:
            distributed.load_trainable_state(model, state, accelerator)
        return
    everyone = distributed.sharding(model, accelerator) != "fsdp2"
    state = load_file(str(path)) if accelerator.is_main_process or everyone else None
    distributed.load_trainable_state(model, state, accelerator)
