"""The training loop: plain PyTorch on `accelerate`, readable top to bottom.

accelerate does device placement, mixed precision (bf16 autocast on CPU where it pays, CUDA
bf16/fp16), gradient accumulation and distributed wrapping; this file does the rest: AdamW with
no decay on biases and norms, warmup + schedule, clipping, periodic evaluation, early stopping
and keeping the best checkpoint.

A model sharded with FSDP2 (`train.fsdp`, see `distributed`) arrives here already sharded and is
not passed to `accelerator.prepare` (which would wrap it in DDP too); its weights are read and
written only through the sharding-aware, collective functions of `distributed`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from rich.console import Console
from rich.measure import Measurement
from rich.progress import Progress, ProgressColumn, Task, TimeElapsedColumn, TimeRemainingColumn
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from transformers import get_scheduler

from tunesmith.config import TrainConfig
from tunesmith.speed.cpu import attention_kernel, math_attention_max_length
from tunesmith.data.batching import padding_share
from tunesmith.speed.embedding_rows import decay_unseen_rows
from tunesmith import distributed
from tunesmith.loop.checkpoint import Checkpoint, any_process, fsync_file, remove_partial, restore_checkpoint, restore_rng, save_checkpoint
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.loop.interrupt import StopSignals, TrainingInterrupted
from tunesmith.methods.apply import parameter_shape
from tunesmith.runs.rundir import JsonlLog, truncate_file, write_jsonl

log = logging.getLogger("tunesmith")

LOWER_IS_BETTER = ("loss", "mse", "rmse", "mae", "hamming_loss", "perplexity")


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
    running_loss: float = 0.0
    running_count: int = 0
    nonfinite_steps: int = 0  # consecutive skipped updates (fp16 scaler overflows aside)

    @property
    def samples_per_second(self) -> float:
        """Training throughput: evaluations inside the loop are not counted (as when Trainer runs without them)."""
        seconds = self.train_seconds - self.eval_seconds
        return self.train_samples / seconds if seconds > 0 else 0.0

    @property
    def padding_share(self) -> float:
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0


class TrainingDiverged(TunesmithError):
    """Too many consecutive steps with a non-finite loss or gradient."""


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
            (no_decay if is_norm or name.endswith("bias") or len(parameter_shape(param)) < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.inference_mode()
def run_evaluation(model: nn.Module, loader: DataLoader, task, state: dict, loss_fn: Callable, accelerator: Accelerator,
                   references=None):
    """One pass over `loader`; returns (metrics, accumulator). Each batch is reduced by the task on its own
    process (per-example scores, generated ids) before anything is gathered: never per-token logits."""
    model.eval()
    accumulator = task.new_accumulator(state, references)
    for batch in loader:
        inputs, labels, extras = task.split_batch(batch)
        with accelerator.autocast():
            reduced = task.evaluation_batch(model, inputs, labels, extras, loss_fn, state)
        # Under DDP, gather the batch first (one batch at a time: memory stays bounded). accelerate
        # pads the last global batch with repeated samples and `gather_for_metrics` drops them, so
        # metrics and loss cover each validation example exactly once.
        if accelerator.num_processes > 1:
            reduced = {k: accelerator.pad_across_processes(v, dim=1, pad_index=-100) if v.ndim >= 2 else v
                       for k, v in reduced.items()}
        task.update(accumulator, accelerator.gather_for_metrics(reduced), state)
    model.train()
    return task.compute_metrics(accumulator, state), accumulator


class _FittedLine:
    """One progress line laid out for the width it is given. As separate columns, rich's table cuts every
    text column alike when a line is too wide (at 80 columns the times came out as "0:0… ETA 0:0…"); here the
    times are never cut: the bar shrinks first, then the metrics are dropped whole, last first."""

    MIN_BAR, MAX_BAR = 5, 40

    def __init__(self, epoch: Text, steps: Text, metrics: list[Text], times: Text, bar: Callable[[int], ProgressBar]):
        self.epoch, self.steps, self.metrics, self.times, self.bar = epoch, steps, metrics, times, bar

    def _width(self, metrics: list[Text]) -> int:  # without the bar; cells are one space apart
        cells = [self.epoch, self.steps, *metrics, self.times]
        return sum(cell.cell_len for cell in cells) + len(cells) - 1

    def __rich_measure__(self, console: Console, options) -> Measurement:
        return Measurement(self._width([]), self._width(self.metrics) + 1 + self.MAX_BAR)

    def __rich_console__(self, console: Console, options):
        metrics = list(self.metrics)
        while metrics and self._width(metrics) + 1 + self.MIN_BAR > options.max_width:
            metrics.pop()
        bar_width = min(self.MAX_BAR, options.max_width - self._width(metrics) - 1)
        bar = [self.bar(bar_width)] if bar_width >= self.MIN_BAR else []  # under ~40 columns: no bar
        cells = [self.epoch, *bar, self.steps, *metrics, self.times]
        grid = Table.grid(padding=(0, 1))
        for _ in cells:
            grid.add_column(no_wrap=True)
        grid.add_row(*cells)
        yield grid


class _TrainingLineColumn(ProgressColumn):
    """`epoch 0.42 ━━━━ 12/100 loss 0.6931 lr 4.9e-05 212/s 0:01:02<0:05:00` (speed in samples/s; elapsed<remaining
    as tqdm writes it, 4 columns shorter than "ETA"). loss, lr and speed are the task's fields set at each logging
    step: before the first there is nothing to show, so nothing is (not a made-up "loss 0.0000")."""

    def __init__(self) -> None:
        super().__init__()
        self._elapsed, self._remaining = TimeElapsedColumn(), TimeRemainingColumn()

    def render(self, task: Task) -> _FittedLine:
        fields = task.fields
        metrics = []  # short of width, dropped from the end: speed first (the ETA tells it), loss last
        if fields.get("loss") is not None:
            metrics.append(Text(f"loss {fields['loss']:.4f}"))
        if fields.get("lr") is not None:
            metrics.append(Text(f"lr {fields['lr']:.1e}"))
        if fields.get("sps") is not None:
            sps = fields["sps"]
            metrics.append(Text(f"{sps:.0f}/s" if sps >= 10 else f"{sps:.1f}/s"))
        total = None if task.total is None else max(0, task.total)

        def bar(width: int) -> ProgressBar:  # as rich's BarColumn draws it, at the width the line leaves
            return ProgressBar(total=total, completed=max(0, task.completed), width=width, pulse=not task.started,
                               animation_time=task.get_time())

        return _FittedLine(
            Text(f"epoch {fields.get('epoch', 0.0):.2f}", style="bold"),
            Text(f"{task.completed:.0f}" + ("" if total is None else f"/{total:.0f}")),
            metrics,
            Text.assemble(self._elapsed(task), "<", self._remaining(task)),
            bar,
        )


def _progress(console: Console | None, disable: bool) -> Progress:
    return Progress(_TrainingLineColumn(), console=console, disable=disable, transient=False)


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


def make_optimizer(model: nn.Module, train_cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; the fused kernel (one pass over each parameter, CPU and CUDA since torch 2.4) where
    available: on a 22M-parameter MiniLM it cut the optimizer step ~3.5x on CPU (benchmarks/speed.py)."""
    groups = optimizer_groups(model, train_cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    fusable = params and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) and p.device.type in ("cpu", "cuda") for p in params)
    if fusable:
        try:
            return torch.optim.AdamW(groups, lr=train_cfg.learning_rate, fused=True)
        except (RuntimeError, TypeError, ValueError):  # an older torch or an unsupported device
            pass
    return torch.optim.AdamW(groups, lr=train_cfg.learning_rate)


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
    resume: Checkpoint | None = None,
    fingerprint: dict | None = None,
    eval_references=None,
) -> LoopResult:
    """Train; with `resume`, continue from that checkpoint exactly where the run stopped.

    `fingerprint` (config and data hashes) is stored in every checkpoint so a resume can check it
    continues the same run."""
    steps_per_epoch = max(1, math.ceil(len(train_loader) / train_cfg.gradient_accumulation_steps))
    total_steps = train_cfg.max_steps if train_cfg.max_steps > 0 else math.ceil(train_cfg.num_train_epochs * steps_per_epoch)
    optimizer = make_optimizer(model, train_cfg)
    decay_unseen_rows(model, optimizer)  # where the embedding trains only the data's rows (`embedding_rows`)
    scheduler = get_scheduler(
        train_cfg.lr_scheduler_type,
        optimizer,
        num_warmup_steps=train_cfg.warmup_steps or math.ceil(train_cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    # The sampler's own generator orders each epoch; its state at the epoch's start is saved so a
    # resumed run replays the same order (accelerate keeps the sampler object when it wraps the loader).
    sampler_generator = getattr(train_loader.sampler, "generator", None)
    sharded = distributed.sharding(model, accelerator) == "fsdp2"
    deepspeed = distributed.deepspeed_requested(accelerator)
    # Compiled graphs keep torch's kernel choice (a context switching kernels per batch would recompile).
    math_attention_max = math_attention_max_length(train_cfg)
    if sharded:  # already sharded in place (FSDP2): accelerate must not wrap it in DDP as well
        optimizer, train_loader, scheduler = accelerator.prepare(optimizer, train_loader, scheduler)
    else:
        model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    scaler = getattr(accelerator, "scaler", None)

    checkpoints_dir = run_dir / "checkpoints"
    best_path = checkpoints_dir / "best.safetensors"
    if accelerator.is_main_process:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        remove_partial(checkpoints_dir)
    result = LoopResult()
    if resume is not None:
        restore_checkpoint(resume, model=accelerator.unwrap_model(model), optimizer=optimizer, scheduler=scheduler,
                           scaler=scaler, accelerator=accelerator)
        position = _saved_position(resume.state["loop"])
        result = LoopResult(**{f.name: position[f.name] for f in fields(LoopResult) if f.name in position})
        if accelerator.is_main_process:  # the log restarts from the checkpoint: lines written after it are replayed
            _restore_log(run_dir / "log.jsonl", position)
        log.info("resuming from %s (step %d, epoch %d, batch %d)", resume.path, result.global_step, result.epoch, result.batches_in_epoch)
    logbook = JsonlLog(run_dir / "log.jsonl", enabled=accelerator.is_main_process)
    losses = _LossWindow(accelerator)
    window_start, window_samples = time.perf_counter(), 0
    train_start = time.perf_counter() - result.train_seconds
    model.train()

    written: dict[str, Path] = {}

    def checkpoint() -> Path:
        """Write a resumable checkpoint of the current state (once per position)."""
        position = f"{result.global_step}/{result.epoch}/{result.batches_in_epoch}"
        if position not in written:
            result.train_seconds = time.perf_counter() - train_start
            result.log_bytes = logbook.sync()
            loop_state = {"global_step": result.global_step, "loop": asdict(result), **(fingerprint or {})}
            written[position] = save_checkpoint(
                checkpoints_dir, step=result.global_step, model=accelerator.unwrap_model(model), optimizer=optimizer,
                scheduler=scheduler, scaler=scaler, loop_state=loop_state, accelerator=accelerator,
                save_total_limit=train_cfg.save_total_limit, keep_step=result.best_step,
            )
        return written[position]

    def evaluate_and_track(epoch: float) -> bool:
        """Evaluate, keep the best weights; returns True when early stopping triggers."""
        eval_start = time.perf_counter()
        metrics, _ = run_evaluation(model, eval_loader, task, state, loss_fn, accelerator, eval_references)
        value = metrics.get(metric)
        if value is None:
            available = ", ".join(k for k, v in metrics.items() if isinstance(v, (int, float)))
            raise ConfigError(f"train.metric_for_best_model: '{metric}' is not computed for this task; choose one of: {available}")
        improved = result.best_metric is None or (value > result.best_metric if bigger_better else value < result.best_metric)
        if improved:
            result.best_metric, result.best_step = value, result.global_step
            result.evaluations_without_improvement = 0
            save_best(accelerator.unwrap_model(model), best_path, accelerator)
        else:
            result.evaluations_without_improvement += 1
        result.eval_seconds += time.perf_counter() - eval_start
        record = {"type": "eval", "step": result.global_step, "epoch": round(epoch, 4), **_scalars(metrics),
                  "eval_seconds": round(time.perf_counter() - eval_start, 3), "is_best": improved}
        logbook.write(record)
        result.last_eval_step = result.global_step
        summary = "  ".join(f"{k} {v:.4f}" for k, v in _scalars(metrics).items() if k in (metric, "loss", "accuracy", "f1_macro", "f1_micro"))
        if accelerator.is_main_process:
            (console.log if show_progress else log.info)(f"eval @ step {result.global_step}: {summary}{'  (best)' if improved else ''}")
        patience = train_cfg.early_stopping_patience
        return patience is not None and result.evaluations_without_improvement >= patience

    console = Console(stderr=True)
    progress = _progress(console, disable=not show_progress or not accelerator.is_main_process)
    signals = StopSignals(notice=_stopping_notice if accelerator.is_main_process else None)
    with progress, signals:
        # loss, lr and speed stay unset (not shown) until the first logging step measures them
        bar = progress.add_task("train", total=total_steps, completed=result.global_step, epoch=float(result.epoch))
        stop = result.stopped_early
        while not stop and result.global_step < total_steps:
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(result.epoch)
            skip = result.batches_in_epoch  # > 0 only when resuming mid-epoch
            if sampler_generator is not None:
                if result.epoch_sampler_state is not None:
                    sampler_generator.set_state(torch.tensor(result.epoch_sampler_state, dtype=torch.uint8))
                result.epoch_sampler_state = sampler_generator.get_state().tolist()
            result.batches_in_epoch = 0
            for batch in train_loader:
                result.batches_in_epoch += 1
                if result.batches_in_epoch <= skip:
                    continue  # trained on before the checkpoint
                if resume is not None:
                    # Starting the loader's iterator draws from the global RNG, so the checkpoint's RNG
                    # states are set only now, right before the first new batch: dropout then matches.
                    restore_rng(resume, accelerator.process_index)
                    accelerator.step = skip
                    resume = None
                inputs, labels, _ = task.split_batch(batch)
                real, padded = padding_share(inputs)
                result.real_tokens, result.padded_tokens = result.real_tokens + real, result.padded_tokens + padded
                with accelerator.accumulate(model):
                    if sharded:  # FSDP2: reduce-scatter gradients only on the micro-batch that steps
                        model.set_requires_gradient_sync(accelerator.sync_gradients)
                    with accelerator.autocast(), attention_kernel(inputs, accelerator.device.type, math_attention_max):
                        step_losses = task.training_losses(model, inputs, labels, loss_fn)
                    loss = step_losses.sums.sum() / step_losses.units.sum().clamp_min(1)
                    losses.add(loss, len(labels))
                    # DeepSpeed's engine updates the weights inside accelerate's backward, before the
                    # check below could skip the update: a non-finite loss must not reach it (every
                    # process sees the same global loss, so all skip together). Only there is each
                    # micro-batch's loss read before its backward.
                    if not deepspeed or losses.last_finite():
                        accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        window = losses.close()
                        _add_to_running_loss(result, window)
                        step_loss = _reported_loss(window)
                        finite = _finite_update(accelerator, model, train_cfg, step_loss)
                        # The fp16 loss scaler skips non-finite updates itself and must see every step.
                        if finite or scaler is not None:
                            optimizer.step()
                            scheduler.step()
                        _note_update(result, train_cfg, finite, step_loss, scaler, scheduler, logbook, checkpoints_dir)
                    optimizer.zero_grad(set_to_none=True)
                batch_size = len(labels)
                window_samples += batch_size
                result.train_samples += batch_size * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                result.global_step += 1
                fractional_epoch = result.epoch + min(1.0, (result.global_step - result.epoch * steps_per_epoch) / steps_per_epoch)
                if result.global_step % train_cfg.logging_steps == 0 or result.global_step == total_steps:
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "type": "train",
                        "step": result.global_step,
                        "epoch": round(fractional_epoch, 4),
                        "loss": result.running_loss / max(result.running_count, 1),
                        "learning_rate": scheduler.get_last_lr()[0],
                        "samples_per_second": window_samples / elapsed if elapsed else 0.0,
                    }
                    logbook.write(record)
                    progress.update(bar, loss=record["loss"], lr=record["learning_rate"], sps=record["samples_per_second"])
                    result.running_loss, result.running_count, window_start, window_samples = 0.0, 0, time.perf_counter(), 0
                progress.update(bar, completed=result.global_step, epoch=fractional_epoch)
                steps_due = train_cfg.eval_strategy == "steps" and result.global_step % (train_cfg.eval_steps or 1) == 0
                evaluated = eval_loader is not None and steps_due
                if evaluated and evaluate_and_track(fractional_epoch):
                    result.stopped_early, stop = True, True
                if stop or result.global_step >= total_steps:
                    break
                last_batch = result.batches_in_epoch == len(train_loader)  # the epoch-end checkpoint follows
                periodic = train_cfg.save_steps and result.global_step % train_cfg.save_steps == 0
                if (evaluated or periodic) and not last_batch:
                    checkpoint()
                if _stop_requested(signals, accelerator) and not last_batch:
                    _interrupt(signals, checkpoint(), run_dir, result)
            result.epoch += 1
            result.batches_in_epoch, result.epoch_sampler_state = 0, None  # the next epoch starts from the sampler's state
            result.epochs_completed = min(result.epoch, result.global_step / steps_per_epoch)
            epoch_end_eval = train_cfg.eval_strategy == "epoch" or (train_cfg.eval_strategy == "steps" and result.global_step >= total_steps)
            if eval_loader is not None and not stop and epoch_end_eval and not _just_evaluated(result):
                if evaluate_and_track(float(result.epoch)):
                    result.stopped_early, stop = True, True
            if not stop and result.global_step < total_steps:
                checkpoint()
                if _stop_requested(signals, accelerator):
                    _interrupt(signals, checkpoint(), run_dir, result)
        result.train_seconds = time.perf_counter() - train_start
        # Training is done, the final evaluation and saving are not: a crash there resumes from here.
        checkpoint()
    if result.stopped_early:
        log.info("early stopping after %d evaluations without improvement", train_cfg.early_stopping_patience)
    unwrapped = accelerator.unwrap_model(model)
    accelerator.wait_for_everyone()  # the main process wrote the best checkpoint; everyone restores it
    restore_best(unwrapped, best_path, accelerator)
    logbook.close()
    # DeepSpeed's engine holds the fp32 master weights the final save reads (`distributed.plain_model`):
    # `api` frees it after that.
    if distributed.deepspeed_engine(accelerator) is None:
        accelerator.free_memory()
    return result


class _LossWindow:
    """The losses of an accumulation window's micro-batches, as the global batch's (averaged over processes).

    They stay on the device until the window's optimizer step is due, then are read at once: one
    all-reduce and one host sync per optimizer step, not per micro-batch (a host sync stalls the
    accelerator's queue). Checking them then still catches a NaN loss: its backward made the gradients,
    and their norm, NaN too. Only DeepSpeed reads each loss before its backward (`last_finite`)."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self._pending: list[torch.Tensor] = []
        self._values: list[float] = []
        self._sizes: list[int] = []

    def add(self, loss: torch.Tensor, batch_size: int) -> None:
        self._pending.append(loss.detach().reshape(()))
        self._sizes.append(batch_size)

    def last_finite(self) -> bool:
        self._read()
        return math.isfinite(self._values[-1])

    def close(self) -> list[tuple[float, int]]:
        """(global loss, this process's batch size) per micro-batch of the window; the next window starts empty."""
        self._read()
        window = list(zip(self._values, self._sizes))
        self._values, self._sizes = [], []
        return window

    def _read(self) -> None:
        if not self._pending:
            return
        stacked = torch.stack(self._pending)
        if self.accelerator.num_processes > 1:  # the global batch's loss, not this shard's
            stacked = self.accelerator.reduce(stacked, reduction="mean")
        self._values += stacked.tolist()
        self._pending = []


def _add_to_running_loss(result: LoopResult, window: list[tuple[float, int]]) -> None:
    """The logged loss is averaged per example; a micro-batch with a non-finite loss is left out of it."""
    for value, batch_size in window:
        if math.isfinite(value):
            result.running_loss += value * batch_size
            result.running_count += batch_size


def _reported_loss(window: list[tuple[float, int]]) -> float:
    """The window's first non-finite loss, else its last: the loss a skipped step is checked and logged with."""
    return next((value for value, _ in window if not math.isfinite(value)), window[-1][0])


# Where every process holds whole, unscaled gradients (no FSDP shards, no DeepSpeed-owned clipping).
_PLAIN_GRADIENTS = (DistributedType.NO, DistributedType.MULTI_CPU)


def clip_cpu_gradients(parameters, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for CPU gradients, bit for bit, in less time: torch's foreach
    kernels (torch calls them only on accelerators; on CPU it loops over the tensors in Python, two
    calls per tensor), and no multiply when the coefficient is clamped to 1 (torch multiplies by 1.0
    anyway to spare a GPU a sync). MiniLM's 106 gradient tensors: 4.1 ms -> 3.7 ms when clipping,
    2.2 ms when not. Mixed dtypes go to torch's function (foreach kernels take one dtype)."""
    with_grads = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in with_grads]
    if not grads or len({g.dtype for g in grads}) > 1:
        return torch.nn.utils.clip_grad_norm_(with_grads, max_norm)
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    coefficient = max_norm / (total + 1e-6)
    if coefficient < 1:  # False for NaN too: the update is skipped then, the gradients are left as they are
        torch._foreach_mul_(grads, coefficient)  # torch clamps it to 1 first: below 1 that changes nothing
    return total


def _finite_update(accelerator: Accelerator, model: nn.Module, train_cfg: TrainConfig, loss: float) -> bool:
    """Clip gradients; False when the loss or the gradient norm is NaN/inf (the update is skipped:
    one bad batch must not turn every weight into NaN)."""
    max_norm = train_cfg.max_grad_norm if train_cfg.max_grad_norm > 0 else float("inf")
    parameters = list(model.parameters())
    plain = accelerator.device.type == "cpu" and accelerator.scaler is None and accelerator.distributed_type in _PLAIN_GRADIENTS
    # tunesmith's own FSDP2 sharding (`train.fsdp`) runs under a plain distributed type with DTensor gradients.
    if plain and all(type(p.grad) is torch.Tensor for p in parameters if p.grad is not None):
        norm = clip_cpu_gradients(parameters, max_norm)
    else:
        # accelerate clips DTensor (FSDP2) gradients too; their norm is then a DTensor, the same full value on every process.
        norm = accelerator.clip_grad_norm_(parameters, max_norm)
    if norm is not None:
        norm = distributed.full_value(norm)
    return math.isfinite(loss) and (norm is None or bool(torch.isfinite(torch.as_tensor(norm))))


def _note_update(result: LoopResult, train_cfg: TrainConfig, finite: bool, loss: float, scaler, scheduler,
                 logbook: JsonlLog, checkpoints_dir: Path) -> None:
    """Count the optimizer step just taken or skipped. `train.max_nonfinite_steps` limits bad steps *in a row*:
    a run that recovers from a few isolated bad batches is healthy, however long it runs."""
    if finite:
        result.nonfinite_steps = 0
    elif _overflow_skip(scaler, loss):
        _note_overflow(result, loss, scaler, scheduler, logbook)
    else:
        _note_nonfinite(result, train_cfg, loss, scheduler, logbook, checkpoints_dir)


def _overflow_skip(scaler, loss: float) -> bool:
    """fp16: a finite loss with inf/NaN gradients is the loss scaler's overflow. The scaler skips that update
    and lowers its scale; that is its job (at the start of a run and each time the scale has grown past what
    fp16 holds), not divergence. A non-finite loss is divergence under any scaler."""
    return scaler is not None and scaler.is_enabled() and math.isfinite(loss)


def _note_overflow(result: LoopResult, loss: float, scaler, scheduler, logbook: JsonlLog) -> None:
    # Neither counted nor a reset: the update was skipped, so it shows nothing about whether training recovered.
    step = result.global_step + 1
    logbook.write({"type": "overflow", "step": step, "loss": loss, "loss_scale": scaler.get_scale(),
                   "learning_rate": scheduler.get_last_lr()[0]})
    log.info("step %d: fp16 gradient overflow; the loss scaler skipped the update (loss scale now %g)", step, scaler.get_scale())


def _note_nonfinite(result: LoopResult, train_cfg: TrainConfig, loss: float, scheduler, logbook: JsonlLog, checkpoints_dir: Path) -> None:
    result.nonfinite_steps += 1
    lr = scheduler.get_last_lr()[0]
    step = result.global_step + 1
    logbook.write({"type": "skipped", "step": step, "loss": loss if math.isfinite(loss) else str(loss), "learning_rate": lr})
    log.warning("step %d: non-finite %s (%s); update skipped (%d in a row, at most %d)", step,
                "loss" if not math.isfinite(loss) else "gradient", loss, result.nonfinite_steps, train_cfg.max_nonfinite_steps)
    if result.nonfinite_steps > train_cfg.max_nonfinite_steps:
        raise TrainingDiverged(
            f"training stopped at step {step}: {result.nonfinite_steps} consecutive steps had a NaN/inf loss or gradient "
            f"(limit train.max_nonfinite_steps={train_cfg.max_nonfinite_steps}); learning rate at the time {lr:.3g}. "
            "Likely causes: a learning rate too high (try a 10x smaller train.learning_rate or warmup_ratio 0.1), "
            "fp16 overflow (use precision bf16 or fp32), or NaN/inf values in the labels or inputs. "
            f"The last good checkpoint and the best weights are kept in '{checkpoints_dir}'"
        )


def _stopping_notice(signum: int) -> str:
    import signal as signal_module

    return (f"{signal_module.Signals(signum).name} received: stopping after this step, once a checkpoint is written "
            "(`tunesmith train --resume` continues from it); press Ctrl-C again to stop at once")


def _stop_requested(signals: StopSignals, accelerator: Accelerator) -> bool:
    # Every process must stop at the same step (a signal may reach them at different moments).
    return any_process(accelerator, signals.received is not None)


def _interrupt(signals: StopSignals, path: Path, run_dir: Path, result: LoopResult) -> None:
    import signal as signal_module

    signum = signals.received or signal_module.SIGTERM
    name = signal_module.Signals(signum).name
    raise TrainingInterrupted(
        f"{name} received: stopped after step {result.global_step}, checkpoint written to '{path}'. "
        f"Continue with: tunesmith train --resume {run_dir}", signum,
    )


def _just_evaluated(result: LoopResult) -> bool:
    return result.last_eval_step == result.global_step


def _saved_position(position: dict) -> dict:
    """A checkpoint's loop state; one written before log offsets were stored holds the log's records
    (`history`) instead: the last evaluation's step is read from them."""
    history = position.get("history")
    if history is None or "last_eval_step" in position:
        return position
    last = history[-1] if history else None
    return {**position, "last_eval_step": last["step"] if last is not None and last["type"] == "eval" else None}


def _restore_log(path: Path, position: dict) -> None:
    """Cut log.jsonl back to where it stood at the checkpoint (the steps after it run again)."""
    if "log_bytes" not in position:  # an older checkpoint: it holds the records themselves
        write_jsonl(path, position.get("history", []))
        return
    size = truncate_file(path, position["log_bytes"]) if path.exists() else 0
    if size < position["log_bytes"]:
        log.warning("'%s' is shorter than when the checkpoint was written (%d of %d bytes): records before the "
                    "checkpoint are missing from it; training resumes exactly all the same", path, size, position["log_bytes"])


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
